"""`nnunetv2_cipa demo --quick` end to end, as the README runs it."""

from __future__ import annotations

import json
import os

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow


def test_demo_quick(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    result = run_cli(["nnunetv2_cipa", "demo", "--quick", "--workdir", str(tmp_path / "demo")], env, timeout=900)
    report_dir = tmp_path / "demo" / "report"
    for stage in ("Generating", "Converting", "planning", "Training nnUNetTrainerCIPA_debug",
                  "Training nnUNetTrainerVanilla_debug", "Comparing"):
        assert stage in result.stdout
    assert str(report_dir / "report.md") in result.stdout
    assert "| nnUNetTrainerCIPA_debug |" in result.stdout  # the headline table
    report = json.loads((report_dir / "report.json").read_text())
    assert set(report["splits"]) == {"cross-validation", "test"}
    assert set(report["splits"]["test"]["results"]) == {"nnUNetTrainerCIPA_debug", "nnUNetTrainerVanilla_debug"}
    assert sorted(p.name for p in report_dir.glob("*.png"))
    assert (tmp_path / "demo" / "logs").is_dir()
