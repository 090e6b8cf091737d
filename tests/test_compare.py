"""compare_trainers on fabricated nnU-Net raw and results folders (two trainers, two folds, a splits_final.json,
checkpoints holding nnU-Net's logger state)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import bootstrap, wilcoxon

from nnunetv2_cipa.errors import InputError
from nnunetv2_cipa.evaluation.compare import compare_trainers
from nnunetv2_cipa.evaluation.metrics import METRIC_RULES, evaluate_folders
from nnunetv2_cipa.evaluation.statistics import holm_adjusted, paired_wilcoxon

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
    splits = [{"train": [c for c in train if (int(c[1:3]) < 4) != (fold == 0)],
               "val": [c for c in train if (int(c[1:3]) < 4) == (fold == 0)]} for fold in (0, 1)]
    (raw / "splits_final.json").write_text(json.dumps(splits))
    for trainer in TRAINERS:
        for fold in (0, 1):
            (results / f"{trainer}__nnUNetPlans__2d" / f"fold_{fold}" / "validation" / "summary.json").write_text("{}")
    conv = torch.zeros(4, 2, 3, 3)
    weights = {"conv.weight": conv, "conv.bias": torch.zeros(4), "decoder.encoder.conv.weight": conv,  # shared
               "norm.running_mean": torch.zeros(4), "norm.num_batches_tracked": torch.tensor(0)}
    for trainer, fold, times in ((TRAINERS[0], 0, (10.5, 20.25)), (TRAINERS[0], 1, (11.5, 20.25)),
                                 (TRAINERS[1], 1, (21.5, 21.25))):    # trainer B has no fold-0 checkpoint
        starts = [100.0 * (epoch + 1) for epoch in range(len(times))]
        logging = {"epoch_start_timestamps": starts, "epoch_end_timestamps": [s + t for s, t in zip(starts, times)]}
        torch.save({"network_weights": weights, "logging": logging},   # nnU-Net's logger state in the checkpoint
                   results / f"{trainer}__nnUNetPlans__2d" / f"fold_{fold}" / "checkpoint_final.pth")
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    return tmp_path


def test_compare_report_matches_evaluate_and_scipy(nnunet_env):
    out = nnunet_env / "report"
    report = compare_trainers(987, TRAINERS, out, folds=(0, 1),
                              test_predictions=[nnunet_env / f"test_{t}" for t in TRAINERS])
    for name in ("report.md", "report.json", "dice_cross_validation.png", "examples_cross_validation.png",
                 "dice_test.png", "examples_test.png"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "report.json").read_text()) == report
    cv = report["splits"]["cross-validation"]
    assert cv["n_cases"] == 16 and cv["n_patients"] == 8
    assert cv["n_cases_per_trainer"] == {t: 16 for t in TRAINERS}
    assert report["splits"]["test"]["n_cases_per_trainer"] == {t: 4 for t in TRAINERS}
    assert report["splits_file"] == str(nnunet_env / "raw" / DATASET / "splits_final.json")

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
    # paired bootstrap over patients, with scipy's own paired resampling of (A, B)
    interval = bootstrap((dice[TRAINERS[0]], dice[TRAINERS[1]]), lambda a, b, axis: np.mean(a - b, axis=axis),
                         paired=True, n_resamples=9999, method="BCa", rng=np.random.default_rng(0)).confidence_interval
    assert stat["mean_difference_ci95"] == pytest.approx([interval.low, interval.high])
    assert interval.low <= stat["mean_difference"] <= interval.high

    costs_a, costs_b = report["costs"][TRAINERS[0]], report["costs"][TRAINERS[1]]
    assert costs_a["parameters"] == costs_b["parameters"] == 4 * 2 * 3 * 3 + 4
    assert costs_a["epoch_time_s"] == {"mean": np.mean([10.5, 20.25, 11.5, 20.25]), "median": 15.875, "n_epochs": 4}
    assert costs_b["epoch_time_s"] == {"mean": 21.375, "median": 21.375, "n_epochs": 2}
    assert costs_b["checkpoint"].endswith("fold_1/checkpoint_final.pth")
    assert any("fold_0: its parameters and epoch times are not counted" in n for n in costs_b["notes"])
    assert costs_a["inference"] is None and any("not measured" in n for n in costs_a["notes"])
    md = (out / "report.md").read_text()
    pooled_dice = f"{cv['results'][TRAINERS[0]]['cipa_protocol']['dice']:.4g}"
    for text in ("## Methods", "## Cross-validation", "## Test", "Wilcoxon", "examples_test.png", pooled_dice,
                 f"| {TRAINERS[1]} | 16 |", f"| {TRAINERS[0]} | 4 |", "slices scored per trainer: nnUNetTrainerA 16",
                 METRIC_RULES[0], "The patient separator is `_`."):
        assert text in md


def test_missing_fold_is_a_clear_error(nnunet_env):
    with pytest.raises(InputError, match=r"fold 2: .*splits_final.json defines folds 0..1"):
        compare_trainers(DATASET, TRAINERS, nnunet_env / "report", folds=(0, 1, 2))
    shutil.rmtree(nnunet_env / "results" / DATASET / f"{TRAINERS[1]}__nnUNetPlans__2d" / "fold_1" / "validation")
    with pytest.raises(InputError, match=r"fold 1: validation folder .*nnUNetTrainerB__nnUNetPlans__2d.fold_1"):
        compare_trainers(DATASET, TRAINERS, nnunet_env / "report", folds=(0, 1))
    with pytest.raises(InputError, match="-f 0 0: a fold is given more than once"):
        compare_trainers(DATASET, TRAINERS, nnunet_env / "report", folds=(0, 0))
    with pytest.raises(InputError, match="dataset 986: Could not find"):
        compare_trainers(986, TRAINERS, nnunet_env / "report", folds=(0, 1))
    with pytest.raises(InputError, match="trained model folder .*nnUNetTrainerC"):
        compare_trainers(DATASET, ("nnUNetTrainerA", "nnUNetTrainerC"), nnunet_env / "report", folds=(0,))


@pytest.mark.parametrize("content", [[], [{"train": [], "val": [1, 2]}], [{"train": [], "val": [None, "p00_001"]}],
                                     [{"train": [], "val": [["p00_001"]]}]])
def test_a_malformed_splits_file_is_named(nnunet_env, content):
    (nnunet_env / "raw" / DATASET / "splits_final.json").write_text(json.dumps(content))
    expected = "defines no folds" if content == [] else "not an nnU-Net splits file .* of case names"
    with pytest.raises(InputError, match=f"splits_final.json.*{expected}"):
        compare_trainers(DATASET, TRAINERS, nnunet_env / "report", folds=(0,))


@pytest.mark.parametrize("case", ["fold_lacks_a_case", "fold_holds_an_extra_case", "unequal_test_folders"])
def test_every_trainer_is_scored_on_the_same_cases(nnunet_env, case):
    """A fold folder must hold exactly its fold's validation cases (splits_final.json) and a test folder exactly the
    cases of labelsTs; otherwise an error naming the trainer, folder and case, before anything is written."""
    model = nnunet_env / "results" / DATASET / f"{TRAINERS[1]}__nnUNetPlans__2d"
    if case == "fold_lacks_a_case":
        folder = model / "fold_0" / "validation"
        (folder / "p01_001.png").unlink()
        expected = f"{TRAINERS[1]}: {folder} lacks 1 of the 8 cases of fold 0's validation set in "
    elif case == "fold_holds_an_extra_case":
        folder = model / "fold_1" / "validation"
        shutil.copy(folder / "p05_000.png", folder / "p99_000.png")
        expected = f"{TRAINERS[1]}: {folder} holds 1 case(s) that are not in fold 1's validation set"
    else:
        folder = nnunet_env / f"test_{TRAINERS[1]}"
        (folder / "t01_000.png").unlink()
        expected = f"{TRAINERS[1]}: {folder} lacks 1 of the 4 cases of the test set"
    out = nnunet_env / "report"
    with pytest.raises(InputError) as error:
        compare_trainers(DATASET, TRAINERS, out, folds=(0, 1),
                         test_predictions=[nnunet_env / f"test_{t}" for t in TRAINERS])
    assert expected in str(error.value) and ("p01_001" if case.startswith("fold_lacks") else "") in str(error.value)
    assert not out.exists()


def test_compare_cli(nnunet_env):
    """Under ``python -OO`` too; --time-inference on the fabricated checkpoints (no plans.json beside them) fails
    into a note instead of losing the report."""
    out = nnunet_env / "cli_report"
    done = subprocess.run([sys.executable, "-OO", "-m", "nnunetv2_cipa", "compare", "-d", "987", "-tr", *TRAINERS,
                           "-f", "0", "1", "-o", str(out), "--time-inference"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert set(report["splits"]) == {"cross-validation"}
    assert report["costs"][TRAINERS[0]]["inference"] is None
    assert any("inference timing failed" in n for n in report["costs"][TRAINERS[0]]["notes"])
    assert METRIC_RULES[1] in (out / "report.md").read_text()


def test_models_on_different_plans_are_named_by_trainer_and_plans(nnunet_env):
    """-p takes one plans identifier per trainer (CIPA on nnUNetPlans against nnU-Net ResEnc M, or one trainer on two
    plans): each model is read from its own folder and named TRAINER__PLANS in the report."""
    results = nnunet_env / "results" / DATASET
    resenc = results / f"{TRAINERS[1]}__nnUNetResEncUNetMPlans__2d"
    shutil.copytree(results / f"{TRAINERS[1]}__nnUNetPlans__2d", resenc)
    for png in (resenc / "fold_0" / "validation").glob("*.png"):
        save_png(png, np.zeros((SIZE, SIZE)))  # the ResEnc model predicts nothing: its scores differ from B's
    out = nnunet_env / "plans_report"
    done = subprocess.run([sys.executable, "-m", "nnunetv2_cipa", "compare", "-d", "987", "-tr", TRAINERS[1],
                           TRAINERS[1], "-p", "nnUNetPlans", "nnUNetResEncUNetMPlans", "-f", "0", "-o", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    models = [f"{TRAINERS[1]}__nnUNetPlans", f"{TRAINERS[1]}__nnUNetResEncUNetMPlans"]
    assert report["trainers"] == models and report["plans"] == ["nnUNetPlans", "nnUNetResEncUNetMPlans"]
    assert report["model_dirs"][models[1]] == str(resenc)
    cv = report["splits"]["cross-validation"]["results"]
    assert cv[models[1]]["cipa_protocol"]["dice"] == 0 < cv[models[0]]["cipa_protocol"]["dice"]
    assert f"| {models[1]} |" in (out / "report.md").read_text()

    with pytest.raises(InputError, match="one per trainer"):
        compare_trainers(987, TRAINERS, out, plans=["nnUNetPlans"] * 3)
    with pytest.raises(InputError, match="distinct models"):
        compare_trainers(987, [TRAINERS[1]] * 2, out, plans=["nnUNetPlans", "nnUNetPlans"])


def test_paired_wilcoxon_edge_cases():
    same = paired_wilcoxon({"a": 0.5, "b": 0.7}, {"a": 0.5, "b": 0.7})
    assert same["pvalue"] is None and "identical" in same["note"]
    assert same["mean_difference_ci95"] is None  # two patients: too few for a bootstrap interval
    five = {p: 0.1 * i for i, p in enumerate("abcde")}
    assert paired_wilcoxon(five, five)["mean_difference_ci95"] == [0.0, 0.0]
    one = paired_wilcoxon({"a": 0.5, "b": None}, {"a": 0.4, "b": 0.7, "c": 0.1})
    assert one["n_patients"] == 1 and one["pvalue"] is None and "need at least 2" in one["note"]
    assert one["mean_difference_ci95"] is None and one["n_patients_left_out"] == 2
    ties = paired_wilcoxon({"a": 0.5, "b": 0.7, "c": 0.2}, {"a": 0.5, "b": 0.6, "c": 0.3})
    expected = wilcoxon([0.5, 0.7, 0.2], [0.5, 0.6, 0.3])
    assert ties["n_nonzero_differences"] == 2 and ties["pvalue"] == pytest.approx(expected.pvalue)


def test_holm_adjustment():
    assert holm_adjusted([0.01, 0.04, 0.03, None]) == pytest.approx([0.03, 0.06, 0.06, None])
    assert holm_adjusted([0.6, 0.7]) == [1.0, 1.0]
    assert holm_adjusted([None]) == [None]


def test_three_trainers_get_holm_adjusted_p_values_and_their_own_patient_counts(nnunet_env):
    """p03 becomes tumour-free: A and B predict nothing there (no Dice), C a false positive (Dice 0)."""
    results, raw = nnunet_env / "results" / DATASET, nnunet_env / "raw" / DATASET
    shutil.copytree(results / f"{TRAINERS[1]}__nnUNetPlans__2d", results / "nnUNetTrainerC__nnUNetPlans__2d")
    trainers = (*TRAINERS, "nnUNetTrainerC")
    for case in ("p03_000", "p03_001"):
        save_png(raw / "labelsTr" / f"{case}.png", np.zeros((SIZE, SIZE)))
        for trainer in trainers:
            pred = disc(16, 16, 4) if trainer == "nnUNetTrainerC" else np.zeros((SIZE, SIZE))
            save_png(results / f"{trainer}__nnUNetPlans__2d" / "fold_0" / "validation" / f"{case}.png", pred)
    out = nnunet_env / "report"
    report = compare_trainers(DATASET, trainers, out, folds=(0, 1))
    cv = report["splits"]["cross-validation"]
    assert [cv["results"][t]["summary"]["dice"]["n"] for t in trainers] == [7, 7, 8]
    assert cv["results"]["nnUNetTrainerC"]["per_patient"]["p03"]["dice"] == 0.0
    tests = cv["wilcoxon_patient_dice"]
    assert [(t["a"], t["b"], t["n_patients"], t["n_patients_left_out"]) for t in tests] == [
        (TRAINERS[0], TRAINERS[1], 7, 1), (TRAINERS[0], "nnUNetTrainerC", 7, 1), (TRAINERS[1], "nnUNetTrainerC", 7, 1)]
    assert [t["pvalue_holm"] for t in tests] == pytest.approx(holm_adjusted([t["pvalue"] for t in tests]))
    md = (out / "report.md").read_text()
    assert "| p | p (Holm) | Note |" in md and "Left out" in md
    dice = {t: cv["results"][t]["summary"]["dice"] for t in trainers}
    assert f"{dice['nnUNetTrainerC']['mean']:.4g} ± {dice['nnUNetTrainerC']['std']:.4g} (n=8)" in md
    assert f"{dice[TRAINERS[0]]['mean']:.4g} ± {dice[TRAINERS[0]]['std']:.4g} (n=7)" in md


def test_a_failed_comparison_leaves_the_previous_report_as_it_was(nnunet_env):
    """Every label is read before anything is written; a new report replaces the folder as a whole."""
    out, test_dirs = nnunet_env / "report", [nnunet_env / f"test_{t}" for t in TRAINERS]
    compare_trainers(DATASET, TRAINERS, out, folds=(0, 1), test_predictions=test_dirs)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    save_png(test_dirs[1] / "t01_000.png", disc(10, 10, 3) * 255)  # the test split is scored last
    with pytest.raises(InputError, match="t01_000.png"):
        compare_trainers(DATASET, TRAINERS, out, folds=(0, 1), test_predictions=test_dirs)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p.name for p in nnunet_env.iterdir() if p.name.startswith(".report")]  # no staging folder left
    compare_trainers(DATASET, TRAINERS, out, folds=(0, 1))  # without --test: no stale test figures stay
    assert sorted(p.name for p in out.iterdir()) == ["dice_cross_validation.png", "examples_cross_validation.png",
                                                     "report.json", "report.md"]
    mine = nnunet_env / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(InputError, match=r"holds files that are not a comparison report's \(notes.txt\)"):
        compare_trainers(DATASET, TRAINERS, mine, folds=(0, 1))
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_unreadable_checkpoints_become_cost_notes(nnunet_env):
    model = nnunet_env / "results" / DATASET / f"{TRAINERS[0]}__nnUNetPlans__2d"
    (model / "fold_0" / "checkpoint_final.pth").write_bytes(b"garbage")
    torch.save({"foo": 1}, model / "fold_1" / "checkpoint_final.pth")
    report = compare_trainers(DATASET, TRAINERS, nnunet_env / "report", folds=(0, 1))
    cost = report["costs"][TRAINERS[0]]
    assert cost["parameters"] is None and cost["epoch_time_s"] is None
    assert any("fold_0/checkpoint_final.pth: not a PyTorch checkpoint" in n for n in cost["notes"])
    assert any("fold_1/checkpoint_final.pth: not an nnU-Net checkpoint" in n for n in cost["notes"])
    weights = {"w": torch.ones(3)}
    for fold, odd in enumerate([{"network_weights": {"a": 1}}, {"network_weights": weights, "logging": [1, 2]},
                                {"network_weights": weights, "logging": {"epoch_start_timestamps": ["x"]}}]):
        torch.save(odd, model / f"fold_{fold % 2}" / "checkpoint_final.pth")
        cost = compare_trainers(DATASET, TRAINERS, nnunet_env / "report", folds=(fold % 2,))["costs"][TRAINERS[0]]
        assert cost["parameters"] is None and len(cost["notes"]) == 1
        assert "not an nnU-Net checkpoint" in cost["notes"][0] if fold == 0 else "'logging' is not" in cost["notes"][0]


def test_an_unreadable_image_skips_the_example_figure_not_the_comparison(nnunet_env):
    for image in (nnunet_env / "raw" / DATASET / "imagesTr").glob("*_0000.png"):
        image.write_bytes(b"not a png")
    report = compare_trainers(DATASET, TRAINERS, nnunet_env / "report", folds=(0, 1))
    note = report["splits"]["cross-validation"]["figures"]["examples"]["note"]
    assert note.startswith("example figure skipped: ") and "_0000.png" in note
    assert f"Example figure: {note}" in (nnunet_env / "report" / "report.md").read_text()


def test_costs_read_checkpoints_in_the_legacy_format(nnunet_env):
    """torch's legacy (< 1.6) format cannot be memory-mapped: it is read whole, with the same costs."""
    model = nnunet_env / "results" / DATASET / f"{TRAINERS[0]}__nnUNetPlans__2d"
    checkpoint = model / "fold_0" / "checkpoint_final.pth"
    torch.save(torch.load(checkpoint, weights_only=True), checkpoint, _use_new_zipfile_serialization=False)
    cost = compare_trainers(DATASET, TRAINERS, nnunet_env / "report", folds=(0, 1))["costs"][TRAINERS[0]]
    assert cost["parameters"] == 4 * 2 * 3 * 3 + 4 and cost["epoch_time_s"]["n_epochs"] == 4


def test_test_predictions_must_be_each_trainers_own_folder(nnunet_env):
    labels, own = nnunet_env / "raw" / DATASET / "labelsTs", nnunet_env / f"test_{TRAINERS[0]}"
    with pytest.raises(InputError, match=f"{TRAINERS[1]}: the test prediction folder .* is the ground-truth folder"):
        compare_trainers(DATASET, TRAINERS, nnunet_env / "report", folds=(0, 1), test_predictions=[own, labels])
    with pytest.raises(InputError, match=f"{TRAINERS[1]}: the test prediction folder .* is also {TRAINERS[0]}'s"):
        compare_trainers(DATASET, TRAINERS, nnunet_env / "report", folds=(0, 1), test_predictions=[own, own])
    assert not (nnunet_env / "report").exists()


def test_a_patient_separator_that_no_case_holds_is_reported(nnunet_env):
    report = compare_trainers(DATASET, TRAINERS, nnunet_env / "report", folds=(0, 1), patient_sep="-")
    assert report["warnings"][0].startswith("the patient separator '-' occurs in no case name (e.g. 'p")
    assert "the patient separator '-'" in (nnunet_env / "report" / "report.md").read_text()
    assert report["splits"]["cross-validation"]["n_patients"] == report["splits"]["cross-validation"]["n_cases"]
    assert "warnings" not in report["splits"]["cross-validation"]["results"][TRAINERS[0]]  # said once, above


def test_folds_not_split_by_patient_are_reported(nnunet_env):
    """p00_001 moves from fold 0's validation set to fold 1's: p00 is validated in two folds and trained on in both."""
    raw, results = nnunet_env / "raw" / DATASET, nnunet_env / "results" / DATASET
    splits = json.loads((raw / "splits_final.json").read_text())
    splits[0]["val"].remove("p00_001"), splits[0]["train"].append("p00_001")
    splits[1]["train"].remove("p00_001"), splits[1]["val"].append("p00_001")
    (raw / "splits_final.json").write_text(json.dumps(splits))
    for trainer in TRAINERS:
        model = results / f"{trainer}__nnUNetPlans__2d"
        shutil.move(model / "fold_0" / "validation" / "p00_001.png", model / "fold_1" / "validation" / "p00_001.png")
    out = nnunet_env / "report"
    done = subprocess.run([sys.executable, "-m", "nnunetv2_cipa", "compare", "-d", "987", "-tr", *TRAINERS,
                           "-f", "0", "1", "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    warnings = json.loads((out / "report.json").read_text())["warnings"]
    assert len(warnings) == 3
    assert "1 patient(s) have validation cases in more than one fold (p00)" in warnings[0]
    assert "fold 0 trains and validates 1 of the same patient(s) (p00)" in warnings[1]
    assert "fold 1 trains and validates 1 of the same patient(s) (p00)" in warnings[2]
    assert all(f"nnunetv2_cipa compare WARNING: {w}" in done.stderr for w in warnings)
    assert "**Warnings**" in (out / "report.md").read_text()


def test_a_symlinked_report_folder_is_replaced_not_followed(nnunet_env):
    old = nnunet_env / "old_report"
    compare_trainers(DATASET, TRAINERS, old, folds=(0,))
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    link = nnunet_env / "link"
    link.symlink_to(old)
    report = compare_trainers(DATASET, TRAINERS, link, folds=(0, 1))
    assert not link.is_symlink() and json.loads((link / "report.json").read_text())["folds"] == [0, 1]
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before and report["warnings"] == []


def test_files_put_into_the_report_folder_during_the_comparison_are_not_replaced(nnunet_env, monkeypatch):
    from nnunetv2_cipa.evaluation import compare

    out = nnunet_env / "report"
    compare_trainers(DATASET, TRAINERS, out, folds=(0,))
    draw = compare._draw_split

    def draw_while_someone_writes(*args):
        (out / "notes.txt").write_text("mine")
        return draw(*args)

    monkeypatch.setattr(compare, "_draw_split", draw_while_someone_writes)
    with pytest.raises(InputError, match=r"holds files that are not a comparison report's \(notes.txt\)"):
        compare_trainers(DATASET, TRAINERS, out, folds=(0, 1))
    assert (out / "notes.txt").read_text() == "mine" and json.loads((out / "report.json").read_text())["folds"] == [0]
    assert not [p.name for p in nnunet_env.iterdir() if p.name.startswith(".report")]
