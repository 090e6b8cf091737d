"""compare_trainers on fabricated nnU-Net raw and results folders (two trainers, two folds)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import wilcoxon

from nnunetv2_cipa.errors import InputError
from nnunetv2_cipa.evaluation.compare import compare_trainers, paired_wilcoxon
from nnunetv2_cipa.evaluation.metrics import evaluate_folders

DATASET = "Dataset987_Toy"
TRAINERS = ("nnUNetTrainerA", "nnUNetTrainerB")
SIZE = 32


def save_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def disc(cy, cx, r):
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2).astype(np.uint8)


@pytest.fixture
def nnunet_env(tmp_path, monkeypatch):
    """Raw dataset (8 training patients x 2 slices, 2 test patients) and results of two trainers on folds 0 and 1."""
    rng = np.random.default_rng(0)
    raw, results = tmp_path / "raw" / DATASET, tmp_path / "results" / DATASET
    train = [f"p{p:02d}_{s:03d}" for p in range(8) for s in range(2)]
    test = [f"t{p:02d}_{s:03d}" for p in range(2) for s in range(2)]
    for cases, images, labels in ((train, "imagesTr", "labelsTr"), (test, "imagesTs", "labelsTs")):
        for i, case in enumerate(cases):
            gt = disc(10 + i % 9, 12 + i % 7, 3 + i % 4) if not case.endswith("001") or i % 3 else np.zeros((SIZE,) * 2)
            save_png(raw / labels / f"{case}.png", gt)
            for channel in (0, 1):
                save_png(raw / images / f"{case}_{channel:04d}.png", rng.integers(0, 256, (SIZE, SIZE)))
            for k, trainer in enumerate(TRAINERS):
                pred = np.roll(gt, shift=(k + i % 3) % 3, axis=1) if i % 5 else np.zeros((SIZE,) * 2)
                if case.startswith("p"):
                    fold = 0 if int(case[1:3]) < 4 else 1
                    save_png(results / f"{trainer}__nnUNetPlans__2d" / f"fold_{fold}" / "validation" / f"{case}.png",
                             pred)
                else:
                    save_png(tmp_path / f"test_{trainer}" / f"{case}.png", pred)
    for k, trainer in enumerate(TRAINERS):
        for fold in (0, 1):
            fold_dir = results / f"{trainer}__nnUNetPlans__2d" / f"fold_{fold}"
            (fold_dir / "validation" / "summary.json").write_text("{}")
            (fold_dir / "training_log_2025_1_1_00_00_00.txt").write_text(
                "2025-01-01 00:00:01.000000: Epoch 0\n"
                f"2025-01-01 00:00:02.000000: Epoch time: {10 + k + fold}.5 s\n"
                f"2025-01-01 00:00:03.000000: Epoch time: {20 + k}.25 s\n")
    conv = torch.zeros(4, 2, 3, 3)
    weights = {"conv.weight": conv, "conv.bias": torch.zeros(4), "decoder.encoder.conv.weight": conv,  # shared
               "norm.running_mean": torch.zeros(4), "norm.num_batches_tracked": torch.tensor(0)}
    torch.save({"network_weights": weights},
               results / f"{TRAINERS[0]}__nnUNetPlans__2d" / "fold_0" / "checkpoint_final.pth")
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    return tmp_path


def test_compare_report_matches_evaluate_and_scipy(nnunet_env):
    out = nnunet_env / "report"
    report = compare_trainers(987, TRAINERS, out, folds=(0, 1), time_inference=False,
                              test_predictions=[nnunet_env / f"test_{t}" for t in TRAINERS])
    for name in ("report.md", "report.json", "dice_cross_validation.png", "examples_cross_validation.png",
                 "dice_test.png", "examples_test.png"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "report.json").read_text()) == report
    cv = report["splits"]["cross-validation"]
    assert cv["n_cases"] == 16 and cv["n_patients"] == 8

    raw = nnunet_env / "raw" / DATASET
    dice = {}
    for trainer in TRAINERS:
        merged = nnunet_env / f"merged_{trainer}"
        for fold in (0, 1):
            for png in (nnunet_env / "results" / DATASET / f"{trainer}__nnUNetPlans__2d" / f"fold_{fold}"
                        / "validation").glob("*.png"):
                merged.mkdir(exist_ok=True)
                shutil.copy(png, merged)
        reference = evaluate_folders(raw / "labelsTr", merged)
        for key in ("cipa_protocol", "per_patient", "summary", "per_case"):
            assert cv["results"][trainer][key] == reference[key], (trainer, key)
        dice[trainer] = [reference["per_patient"][p]["dice"] for p in sorted(reference["per_patient"])]
        test_reference = evaluate_folders(raw / "labelsTs", nnunet_env / f"test_{trainer}")
        assert report["splits"]["test"]["results"][trainer]["cipa_protocol"] == test_reference["cipa_protocol"]

    stat = cv["wilcoxon_patient_dice"][0]
    expected = wilcoxon(dice[TRAINERS[0]], dice[TRAINERS[1]])
    assert stat["n_patients"] == 8
    assert stat["statistic"] == pytest.approx(expected.statistic)
    assert stat["pvalue"] == pytest.approx(expected.pvalue)

    costs_a, costs_b = report["costs"][TRAINERS[0]], report["costs"][TRAINERS[1]]
    assert costs_a["parameters"] == 4 * 2 * 3 * 3 + 4
    assert costs_a["epoch_time_s"]["mean"] == pytest.approx(np.mean([10.5, 20.25, 11.5, 20.25]))
    assert costs_b["epoch_time_s"]["n_epochs"] == 4
    assert costs_b["parameters"] is None and any("checkpoint" in n for n in costs_b["notes"])
    md = (out / "report.md").read_text()
    pooled_dice = f"{cv['results'][TRAINERS[0]]['cipa_protocol']['dice']:.4g}"
    for text in ("## Methods", "## Cross-validation", "## Test", "Wilcoxon", "examples_test.png", pooled_dice):
        assert text in md


def test_missing_fold_is_a_clear_error(nnunet_env):
    with pytest.raises(InputError, match=r"fold 2: validation folder .*nnUNetTrainerA__nnUNetPlans__2d.fold_2"):
        compare_trainers(DATASET, TRAINERS, nnunet_env / "report", folds=(0, 1, 2), time_inference=False)
    with pytest.raises(InputError, match="dataset 986: Could not find"):
        compare_trainers(986, TRAINERS, nnunet_env / "report", folds=(0, 1), time_inference=False)
    with pytest.raises(InputError, match="trained model folder .*nnUNetTrainerC"):
        compare_trainers(DATASET, ("nnUNetTrainerA", "nnUNetTrainerC"), nnunet_env / "report", folds=(0,))


def test_compare_cli(nnunet_env):
    out = nnunet_env / "cli_report"
    done = subprocess.run([sys.executable, "-m", "nnunetv2_cipa.cli", "compare", "-d", "987", "-tr", *TRAINERS,
                           "-f", "0", "1", "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert set(report["splits"]) == {"cross-validation"}
    # the fabricated checkpoint has no plans.json next to it: inference timing is skipped with a note
    assert report["costs"][TRAINERS[0]]["inference"] is None
    assert any("inference timing failed" in n for n in report["costs"][TRAINERS[0]]["notes"])


def test_paired_wilcoxon_edge_cases():
    same = paired_wilcoxon({"a": 0.5, "b": 0.7}, {"a": 0.5, "b": 0.7})
    assert same["pvalue"] is None and "identical" in same["note"]
    one = paired_wilcoxon({"a": 0.5, "b": None}, {"a": 0.4, "b": 0.7, "c": 0.1})
    assert one["n_patients"] == 1 and one["pvalue"] is None and "need at least 2" in one["note"]
    ties = paired_wilcoxon({"a": 0.5, "b": 0.7, "c": 0.2}, {"a": 0.5, "b": 0.6, "c": 0.3})
    expected = wilcoxon([0.5, 0.7, 0.2], [0.5, 0.6, 0.3])
    assert ties["n_nonzero_differences"] == 2 and ties["pvalue"] == pytest.approx(expected.pvalue)
