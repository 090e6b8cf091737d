"""benchmarks/bench_memory.py against the memory model: CIPA-micro's measured per-sample training memory on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_memory.py"


def test_memory_model_predicts_micro_within_25_percent(tmp_path):
    """At two patch sizes other than the 512 x 512 the coefficients were measured at, in place and gathered."""
    out = tmp_path / "memory.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--models", "micro", "--sizes", "128", "256", "--backends",
                             "cpu", "cpu-gathered", "--dtypes", "float32", "--checkpointing", "off", "--batches", "2",
                             "4", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["size"], r["backend"]) for r in rows] == [(128, "cpu"), (128, "cpu-gathered"), (256, "cpu"),
                                                         (256, "cpu-gathered")]
    for row in rows:
        assert row["per_sample_bytes"] > 0
        assert abs(row["prediction_error"]) < 0.25, row
    assert "| 24 GB | 4 / 5 | 12 / 12 | 3 / 4 |" in result.stdout  # the GPU table of docs/usage.md


def test_16_bit_rows_run_layer_norm_in_float32_as_cuda_autocast_does(monkeypatch):
    """CUDA's autocast runs layer_norm in float32 (and the LayerNorm saves its input in 4 bytes), CPU's leaves it in
    bfloat16: the benchmark's 16-bit rows take CUDA's policy, outside autocast nothing changes."""
    import torch
    import torch.nn.functional as F

    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from bench_memory import float32_layer_norms_under_autocast

    layer_norm = F.layer_norm
    monkeypatch.setattr(F, "layer_norm", layer_norm)  # restored after the test
    norm, x = torch.nn.LayerNorm(8), torch.randn(4, 8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5)
    half = x.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm(half).dtype == torch.bfloat16
        float32_layer_norms_under_autocast()
        y = norm(half)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, layer_norm(half.float(), (8,), norm.weight, norm.bias), rtol=0, atol=0)
    assert norm(half).dtype == torch.bfloat16  # outside autocast: no cast, as before
    torch.testing.assert_close(norm(half), layer_norm(half, (8,), norm.weight, norm.bias), rtol=0, atol=0)
