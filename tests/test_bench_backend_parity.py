"""benchmarks/bench_backend_parity.py: a whole CIPA-micro through one scan backend against the reference loop."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_backend_parity.py"


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_backend_matches_the_reference_through_the_network(tmp_path, backend):
    """float64 logits and every parameter's gradient; the gradients that are rounding noise are set apart (the
    convolution biases in front of DCIM's BatchNorm layers)."""
    if backend == "cpu":
        pytest.importorskip("numba")
    out = tmp_path / "parity.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--backend", backend, "--patch", "32", "--json", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["logits"] < 1e-12 and max(report["gradients"].values()) < 1e-8
    assert len(report["gradients"]) > 300 and "dcim.0.ct_stem.convs.0.conv.bias" in report["noise"]
    assert f"{backend} against reference" in result.stdout and "| logits |" in result.stdout
