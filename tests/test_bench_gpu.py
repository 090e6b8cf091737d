"""benchmarks/bench_gpu.py, the GPU checklist's benchmark, exercised on the CPU (cpu and torch backends, no AMP)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
sys.path.insert(0, str(SCRIPT.parent))
from bench_memory import CUDA_CONTEXT_GIB  # noqa: E402


def test_gpu_bench_runs_every_part_on_cpu(tmp_path):
    plan = tmp_path / "plan.json"
    subprocess.run([sys.executable, str(SCRIPT), "--write-plan", str(plan), "--size", "64"], check=True,
                   capture_output=True, timeout=300)
    assert json.loads(plan.read_text())["patch_size"] == [64, 64]
    result = subprocess.run([sys.executable, str(SCRIPT), "--plan", str(plan), "--device", "cpu", "--quick",
                             "--emulate-gib", str(EMULATED_GIB), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert report["backends"] == ["cpu", "torch"]
    for backend in report["backends"]:
        for op in ("directional", "selective"):
            errors = report["agreement"][backend][op]
            assert set(errors) == {"y", "u", "delta", "A", "B", "C", "D", "delta_bias"}
            assert max(errors.values()) < 1e-4, (backend, op, errors)
    # the cpu kernel reads the scan orders in place: timed again through gathered copies
    assert list(report["scan"]) == ["cpu", "torch", "cpu (gathered)"]
    for rows in report["scan"].values():
        assert [r["shape"] for r in rows["rows"]] == [
            "4 x 16x16 x 192", "4 x 8x8 x 384", "4 x 4x4 x 768", "4 x 2x2 x 1536"]
        assert all(r["seconds"] > 0 for r in rows["rows"])
    assert "| cpu (gathered) | 4 x 16x16 x 192 |" in result.stdout
    vanilla, *cipa = report["network"]
    assert vanilla["model"] == "vanilla" and [r["backend"] for r in cipa] == ["cpu", "torch"]
    assert all(r["losses_finite"] and r["step_s"] > 0 and r["first_step_s"] > 0 for r in report["network"])
    assert cipa[1]["max_logit_diff_vs_cpu"] < 1e-3
    assert "| micro | torch |" in result.stdout
    chosen, checkpointed, *emulated = report["memory"]
    assert chosen["batch"] == chosen["planned_batch"] == 12 and not chosen["checkpointing"]  # a CPU: the planned batch
    assert checkpointed["checkpointing"] and checkpointed["step_s"] > 0 and checkpointed["predicted_gib"] > 0
    # the emulated GPU gets the memory model's batch for its free memory (card less CUDA context), not the planned one
    assert [(r["gpu_gib"], r["checkpointing"]) for r in emulated] == [(EMULATED_GIB, False), (EMULATED_GIB, True)]
    assert [r["batch"] for r in emulated] == [emulated_choice(c) for c in (False, True)] == [4, 12]
    assert all(r["step_s"] > 0 and f"{EMULATED_GIB} GB GPU" in r["choice"] for r in emulated)
    assert f"| micro | {EMULATED_GIB:g} GB (emulated) | cpu | 4 (12) | off |" in result.stdout


EMULATED_GIB = 0.63  # leaves CIPA-micro at 64 x 64 room for 4 samples, 12 with checkpointing (as 24 GB for tiny)


def emulated_choice(checkpointing: bool) -> int:
    """The memory model's batch for CIPA-micro at 64 x 64 (cpu scan, float32) on a GPU of EMULATED_GIB."""
    import torch

    from nnunetv2_cipa.network import CIPA
    from nnunetv2_cipa.training.memory_model import choose_batch_size

    with torch.device("meta"):
        network = CIPA(2, (64, 64), preset="micro", deep_supervision=True)
    free = int((EMULATED_GIB - CUDA_CONTEXT_GIB) * 2 ** 30)
    return choose_batch_size(12, torch.device("cuda"), "micro", (64, 64), sum(p.numel() for p in network.parameters()),
                             "cpu", torch.float32, checkpointing, network.min_training_batch, free_bytes=free,
                             device_name="emulated").chosen
