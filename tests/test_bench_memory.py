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
