"""End to end through the stock nnU-Net 2.8.1 CLI on CPU: convert -> plan -> train CIPA and vanilla (2 folds, npz)
-> resume -> --val -> fold-ensemble prediction -> find_best_configuration -> ensemble -> evaluate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DATASET_ID, run_cli

pytestmark = pytest.mark.slow

CIPA, VANILLA = "nnUNetTrainerCIPA_debug", "nnUNetTrainerVanilla_debug"
FOLDS = ("0", "1")


def train(dataset, trainer: str, fold: str, *extra: str):
    env = dict(dataset.env, nnUNet_n_proc_DA="0")  # single-threaded augmentation: training only
    return run_cli(["nnUNetv2_train", str(DATASET_ID), "2d", fold, "-tr", trainer, "-device", "cpu", *extra], env)


def predict(dataset, trainer: str, output) -> str:
    return run_cli(["nnUNetv2_predict", "-i", str(dataset.raw / "imagesTs"), "-o", str(output), "-d", str(DATASET_ID),
             "-c", "2d", "-tr", trainer, "-f", *FOLDS, "-device", "cpu", "-npp", "0", "-nps", "0",
             "--save_probabilities"], dataset.env).stdout


def assert_label_pngs(folder, expected_cases: set[str], shape) -> None:
    pngs = {p.name[:-4]: p for p in folder.glob("*.png")}
    assert set(pngs) == expected_cases
    for path in pngs.values():
        labels = np.asarray(Image.open(path))
        assert labels.shape == shape and labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1}


def test_stock_cli_end_to_end(planned_dataset, tmp_path):
    ds = planned_dataset
    splits = json.loads((ds.raw / "splits_final.json").read_text())
    assert json.loads((ds.preprocessed / "splits_final.json").read_text()) == splits
    test_cases = {p.name[: -len("_0000.png")] for p in (ds.raw / "imagesTs").glob("*_0000.png")}
    shape = np.asarray(Image.open(next((ds.raw / "labelsTs").glob("*.png")))).shape

    for fold in FOLDS:
        train(ds, CIPA, fold, "--npz")
    train(ds, CIPA, "0", "--c")  # resume from the final checkpoint
    train(ds, CIPA, "0", "--val", "--npz")
    for fold in FOLDS:
        train(ds, VANILLA, fold, "--npz")

    for trainer in (CIPA, VANILLA):
        model_dir = ds.results / f"{trainer}__nnUNetPlans__2d"
        for fold in FOLDS:
            fold_dir = model_dir / f"fold_{fold}"
            val_cases = set(splits[int(fold)]["val"])  # the converter's patient-level split was used
            assert_label_pngs(fold_dir / "validation", val_cases, shape)
            assert {p.name[:-4] for p in (fold_dir / "validation").glob("*.npz")} == val_cases
            checkpoint = torch.load(fold_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False)
            assert checkpoint["trainer_name"] == trainer
            keys = checkpoint["network_weights"].keys()
            if trainer == CIPA:
                assert {k.split(".")[0] for k in keys} >= {"encoder", "crm", "dcim", "decoder"}
                assert any(k.endswith("A_logs") for k in keys)
                assert checkpoint["current_epoch"] == 2
    log = "".join(p.read_text() for p in (ds.results / f"{CIPA}__nnUNetPlans__2d" / "fold_0").glob("training_log*"))
    assert "Epoch 1" in log

    predictions = {trainer: tmp_path / f"pred_{trainer}" for trainer in (CIPA, VANILLA)}
    for trainer, folder in predictions.items():
        output = predict(ds, trainer, folder)
        assert_label_pngs(folder, test_cases, shape)
        if trainer == CIPA:  # the predictor rebuilt the network from the class found through nnUNet_extTrainer
            assert f"Using trainer '{CIPA}' from: {ds.env['nnUNet_extTrainer']}" in output

    run_cli(["nnUNetv2_find_best_configuration", str(DATASET_ID), "-c", "2d", "-tr", CIPA, VANILLA, "-f", *FOLDS],
            ds.env)
    instructions = (ds.results / "inference_instructions.txt").read_text()
    assert "nnUNetv2_predict" in instructions
    ensemble_dir = ds.results / "ensembles" / f"ensemble___{CIPA}__nnUNetPlans__2d___{VANILLA}__nnUNetPlans__2d___0_1"
    assert (ensemble_dir / "summary.json").is_file()

    ensembled = tmp_path / "pred_ensemble"
    run_cli(["nnUNetv2_ensemble", "-i", *map(str, predictions.values()), "-o", str(ensembled), "-np", "1"], ds.env)
    assert_label_pngs(ensembled, test_cases, shape)

    model_dir = ds.results / f"{CIPA}__nnUNetPlans__2d"
    summary_file = tmp_path / "summary_ensemble.json"
    run_cli(["nnUNetv2_evaluate_folder", str(ds.raw / "labelsTs"), str(ensembled), "-djfile",
             str(model_dir / "dataset.json"), "-pfile", str(model_dir / "plans.json"), "-o", str(summary_file)],
            ds.env)
    summary = json.loads(summary_file.read_text())
    assert len(summary["metric_per_case"]) == len(test_cases) and "1" in summary["mean"]
