"""End to end through the stock nnU-Net 2.8.1 CLI on CPU: convert -> plan -> train CIPA and the paper recipe (2 folds
each, two trainings at a time in one results tree, npz) -> resume -> --val -> fold-ensemble prediction ->
find_best_configuration -> ensemble -> evaluate; the paper trainer's labels equal sigmoid(z) > 0.5 of its network's
logit. Vanilla nnU-Net's CLI run is the demo's (tests/test_demo.py)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DATASET_ID, run_cli

pytestmark = pytest.mark.slow

CIPA, PAPER = "nnUNetTrainerCIPA_debug", "nnUNetTrainerCIPA_paper_debug"
FOLDS = ("0", "1")


def train(dataset, trainer: str, fold: str, *extra: str):
    # one export worker: two trainings share the 2 cores. The CIPA trainings augment in the training process; the
    # paper trainer's own transforms run in augmentation worker processes (nnU-Net's default, on a GPU machine)
    workers = "1" if trainer == PAPER else "0"
    env = dict(dataset.env, nnUNet_n_proc_DA=workers, nnUNet_def_n_proc="1")
    return run_cli(["nnUNetv2_train", str(DATASET_ID), "2d", fold, "-tr", trainer, "-device", "cpu", *extra], env)


def two_at_a_time(*jobs) -> list:
    """Run the zero-argument callables two at a time (as folds are trained side by side); their results in order."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return [future.result() for future in [pool.submit(job) for job in jobs]]


def predict(dataset, trainer: str, output, folds=FOLDS) -> str:
    return run_cli(["nnUNetv2_predict", "-i", str(dataset.raw / "imagesTs"), "-o", str(output), "-d", str(DATASET_ID),
                    "-c", "2d", "-tr", trainer, "-f", *folds, "-device", "cpu", "-npp", "0", "-nps", "0",
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

    two_at_a_time(*(partial(train, ds, trainer, fold, "--npz") for trainer in (CIPA, PAPER) for fold in FOLDS))
    predictions = {trainer: tmp_path / f"pred_{trainer}" for trainer in (CIPA, PAPER)}

    def resume_then_validate():
        train(ds, CIPA, "0", "--c")  # resume from the final checkpoint
        train(ds, CIPA, "0", "--val", "--npz")

    paper_fold_0 = tmp_path / "pred_paper_fold0"
    two_at_a_time(resume_then_validate, partial(predict, ds, PAPER, predictions[PAPER]),
                  partial(predict, ds, PAPER, paper_fold_0, folds=("0",)))
    cipa_output = predict(ds, CIPA, predictions[CIPA])
    # the predictor rebuilt the network from the class found through nnUNet_extTrainer
    assert f"Using trainer '{CIPA}' from: {ds.env['nnUNet_extTrainer']}" in cipa_output
    for folder in predictions.values():
        assert_label_pngs(folder, test_cases, shape)

    for trainer in (CIPA, PAPER):
        model_dir = ds.results / f"{trainer}__nnUNetPlans__2d"
        for fold in FOLDS:
            fold_dir = model_dir / f"fold_{fold}"
            val_cases = set(splits[int(fold)]["val"])  # the converter's patient-level split was used
            assert_label_pngs(fold_dir / "validation", val_cases, shape)
            assert {p.name[:-4] for p in (fold_dir / "validation").glob("*.npz")} == val_cases
            checkpoint = torch.load(fold_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False)
            assert checkpoint["trainer_name"] == trainer
            keys = checkpoint["network_weights"].keys()
            assert {k.split(".")[0] for k in keys} >= {"encoder", "crm", "dcim", "decoder"}
            assert any(k.endswith("A_logs") for k in keys)
            assert checkpoint["current_epoch"] == 2
            if trainer == PAPER:  # one logit, no mirroring at inference
                assert checkpoint["network_weights"]["decoder.head.weight"].shape[0] == 1
                assert checkpoint["inference_allowed_mirroring_axes"] is None
    log = "".join(p.read_text() for p in (ds.results / f"{CIPA}__nnUNetPlans__2d" / "fold_0").glob("training_log*"))
    assert "Epoch 1" in log

    run_cli(["nnUNetv2_find_best_configuration", str(DATASET_ID), "-c", "2d", "-tr", CIPA, PAPER, "-f", *FOLDS],
            ds.env)
    instructions = (ds.results / "inference_instructions.txt").read_text()
    assert "nnUNetv2_predict" in instructions
    # the paper's [0, z] probabilities ensemble with CIPA's softmax ones
    ensemble_dir = ds.results / "ensembles" / f"ensemble___{CIPA}__nnUNetPlans__2d___{PAPER}__nnUNetPlans__2d___0_1"
    assert (ensemble_dir / "summary.json").is_file()

    ensembled = tmp_path / "pred_ensemble"
    run_cli(["nnUNetv2_ensemble", "-i", *map(str, predictions.values()), "-o", str(ensembled), "-np", "1"], ds.env)
    assert_label_pngs(ensembled, test_cases, shape)
    assert_paper_labels_are_sigmoid_threshold(ds, paper_fold_0, sorted(test_cases)[0])

    model_dir = ds.results / f"{CIPA}__nnUNetPlans__2d"
    summary_file = tmp_path / "summary_ensemble.json"
    run_cli(["nnUNetv2_evaluate_folder", str(ds.raw / "labelsTs"), str(ensembled), "-djfile",
             str(model_dir / "dataset.json"), "-pfile", str(model_dir / "plans.json"), "-o", str(summary_file)],
            ds.env)
    summary = json.loads(summary_file.read_text())
    assert len(summary["metric_per_case"]) == len(test_cases) and "1" in summary["mean"]


def assert_paper_labels_are_sigmoid_threshold(ds, output, case: str) -> None:
    """nnUNetv2_predict with the paper trainer's default (no mirroring) and fold 0 (``output``) gives sigmoid(z) > 0.5
    of the network's one logit z on the preprocessed image (rgb_to_0_1: x / 255). nnU-Net accumulates z times its
    Gaussian window weight g in float16, so pixels where that product is near float16's underflow (|z| g < 1e-6; g is
    ~1e-6 in the window's corners) or |z| < 1e-4 are left out. (Not the fold ensemble: the sum of the folds' float16
    logits can flip the sign of a mean near 0.)"""
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_cipa.trainer_discovery import find_trainer_class

    model_dir = ds.results / f"{PAPER}__nnUNetPlans__2d"
    manager = PlansManager(json.loads((model_dir / "plans.json").read_text()))
    network = find_trainer_class(PAPER).build_network_architecture(manager, manager.get_configuration("2d"), 2, 2,
                                                                  enable_deep_supervision=False)
    checkpoint = torch.load(model_dir / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    network.load_state_dict(checkpoint["network_weights"])
    image = np.stack([np.asarray(Image.open(ds.raw / "imagesTs" / f"{case}_{c:04d}.png")) for c in (0, 1)])
    with torch.no_grad():
        z = network.eval()(torch.from_numpy(image / 255.0).float()[None])[0, 1].numpy()
    labels = np.asarray(Image.open(output / f"{case}.png"))
    patch_size = tuple(manager.get_configuration("2d").patch_size)
    assert patch_size == z.shape  # one sliding window covers the image
    # the weights nnU-Net's predictor uses (sigma 1/8 of the patch, peak 10), in float32
    weight = compute_gaussian(patch_size, sigma_scale=1 / 8, value_scaling_factor=10, dtype=torch.float32,
                              device=torch.device("cpu")).numpy()
    decided = (np.abs(z) >= 1e-4) & (np.abs(z) * weight >= 1e-6)
    assert decided.mean() > 0.95
    np.testing.assert_array_equal(labels[decided], (1 / (1 + np.exp(-z[decided])) > 0.5).astype(np.uint8))
