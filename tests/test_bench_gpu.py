"""benchmarks/bench_gpu.py, the GPU checklist's benchmark, exercised on the CPU (cpu and torch backends, no AMP)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


def test_gpu_bench_runs_every_part_on_cpu(tmp_path):
    plan = tmp_path / "plan.json"
    subprocess.run([sys.executable, str(SCRIPT), "--write-plan", str(plan), "--size", "64"], check=True,
                   capture_output=True, timeout=300)
    assert json.loads(plan.read_text())["patch_size"] == [64, 64]
    result = subprocess.run([sys.executable, str(SCRIPT), "--plan", str(plan), "--device", "cpu", "--quick",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert report["backends"] == ["cpu", "torch"]
    for backend in report["backends"]:
        for op in ("directional", "selective"):
            errors = report["agreement"][backend][op]
            assert set(errors) == {"y", "u", "delta", "A", "B", "C", "D", "delta_bias"}
            assert max(errors.values()) < 1e-4, (backend, op, errors)
        assert [r["shape"] for r in report["scan"][backend]["rows"]] == [
            "4 x 16x16 x 192", "4 x 8x8 x 384", "4 x 4x4 x 768", "4 x 2x2 x 1536"]
    vanilla, *cipa = report["network"]
    assert vanilla["model"] == "vanilla" and [r["backend"] for r in cipa] == ["cpu", "torch"]
    assert all(r["losses_finite"] and r["step_s"] > 0 for r in report["network"])
    assert cipa[1]["max_logit_diff_vs_cpu"] < 1e-3
    assert "| micro | torch |" in result.stdout
    chosen, checkpointed = report["memory"]
    assert chosen["batch"] == chosen["planned_batch"] == 12 and not chosen["checkpointing"]  # a CPU: the planned batch
    assert checkpointed["checkpointing"] and checkpointed["step_s"] > 0 and checkpointed["predicted_gib"] > 0
