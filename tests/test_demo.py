"""`nnunetv2_cipa demo --quick` end to end, as the README runs it: the report's tables hold both trainers' numbers and
the figures are valid PNGs of the size the figure layout gives."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from conftest import run_cli
from nnunetv2_cipa.evaluation.figures import DICE_DPI, EXAMPLES_DPI, dice_figure_inches, examples_figure_inches
from nnunetv2_cipa.evaluation.metrics import format_number

TRAINERS = ("nnUNetTrainerCIPA_debug", "nnUNetTrainerVanilla_debug")
PROTOCOL_COLUMNS = ("iou", "dice", "balanced_accuracy", "hd95_px", "hd95_px_paper_rule")


def table_row(section: str, trainer: str) -> list[str]:
    """Cells of the first markdown table row of ``trainer`` in ``section``."""
    row = next(line for line in section.splitlines() if line.startswith(f"| {trainer} |"))
    return [cell.strip() for cell in row.strip().strip("|").split("|")]


def assert_png(path, inches: tuple[float, float], dpi: int) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == tuple(int(v * dpi) for v in inches), path
        image.verify()


def test_a_demo_that_cannot_run_says_why_without_traceback(tmp_path):
    (tmp_path / "a_file").write_text("")
    done = run_cli(["nnunetv2_cipa", "demo", "--workdir", str(tmp_path / "a_file")], dict(os.environ), check=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"nnunetv2_cipa demo: error: {tmp_path / 'a_file'}: work directory exists and is "
                                  "not a folder")
    (tmp_path / "work" / "PCLT20K_synthetic").mkdir(parents=True)  # not synth's: the synth stage refuses it
    (tmp_path / "work" / "PCLT20K_synthetic" / "mine.txt").write_text("keep")
    done = run_cli(["nnunetv2_cipa", "demo", "--quick", "--workdir", str(tmp_path / "work")], dict(os.environ),
                   check=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "nnunetv2_cipa demo: error: demo stage 'Generating a synthetic PCLT20K-like dataset' failed (exit 1)" \
        in done.stderr and "holds no synthetic.json" in done.stderr
    assert (tmp_path / "work" / "PCLT20K_synthetic" / "mine.txt").read_text() == "keep"


@pytest.mark.slow
def test_demo_quick(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    result = run_cli(["nnunetv2_cipa", "demo", "--quick", "--workdir", str(tmp_path / "demo")], env, timeout=900)
    report_dir = tmp_path / "demo" / "report"
    for stage in ("Generating", "Converting", "planning", "Training nnUNetTrainerCIPA_debug",
                  "Training nnUNetTrainerVanilla_debug", "Comparing"):
        assert stage in result.stdout
    assert str(report_dir / "report.md") in result.stdout
    assert (tmp_path / "demo" / "logs").is_dir()
    report = json.loads((report_dir / "report.json").read_text())
    assert set(report["splits"]) == {"cross-validation", "test"}
    md = (report_dir / "report.md").read_text()

    for name, split in report["splits"].items():
        assert set(split["results"]) == set(TRAINERS)
        section = md.split(f"## {name.capitalize()}\n", 1)[1].split("\n## ", 1)[0]
        for trainer in TRAINERS:
            protocol = split["results"][trainer]["cipa_protocol"]
            cells = table_row(section, trainer)
            assert cells[1] == str(protocol["n_slices"]) == str(split["n_cases"])
            assert cells[2:7] == [format_number(protocol[k]) for k in PROTOCOL_COLUMNS]
            assert 0.0 <= float(cells[3]) <= 1.0                          # a Dice value, not n/a
        figures = split["figures"]
        assert_png(report_dir / figures["dice_distribution"], dice_figure_inches(len(TRAINERS)), DICE_DPI)
        if "file" in figures["examples"]:
            assert_png(report_dir / figures["examples"]["file"],
                       examples_figure_inches(len(figures["examples"]["cases"]), len(TRAINERS)), EXAMPLES_DPI)
        else:
            assert "all masks empty" in figures["examples"]["note"]
    assert "file" in report["splits"]["test"]["figures"]["examples"]

    costs = md.split("## Costs\n", 1)[1]
    for trainer in TRAINERS:
        cost = report["costs"][trainer]
        assert cost["parameters"] > 0 and cost["epoch_time_s"]["n_epochs"] == 2 and cost["inference"] is not None
        cells = table_row(costs, trainer)
        assert cells[1] == f"{cost['parameters']:,}"
        assert cells[2].startswith(f"{format_number(cost['epoch_time_s']['mean'])} (mean of 2 epochs)")
        assert cells[3].startswith(format_number(cost["inference"]["seconds_per_slice"]))
        test = report["splits"]["test"]["results"][trainer]
        assert f"| {trainer} | {test['cipa_protocol']['dice']:.3f} | {test['cipa_protocol']['iou']:.3f} |" \
            in result.stdout                                              # the headline table
