"""Costs of a trained nnU-Net model folder: parameter count, training time per epoch, inference time per slice."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np

CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_best.pth")
EPOCH_TIME = re.compile(r"Epoch time: ([0-9]+(?:\.[0-9]*)?) s")  # nnUNetTrainer.on_epoch_end
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def find_checkpoint(model_dir: Path, folds: tuple[int, ...]) -> Path | None:
    """First fold_k/checkpoint_final.pth (else checkpoint_best.pth) over ``folds``, or None."""
    for fold in folds:
        for name in CHECKPOINT_NAMES:
            if (model_dir / f"fold_{fold}" / name).is_file():
                return model_dir / f"fold_{fold}" / name
    return None


def count_parameters(checkpoint: Path) -> int:
    """Elements of the checkpoint's network_weights, normalisation running statistics excluded and tensors shared
    under several keys counted once (nnU-Net's decoders keep a reference to the encoder: decoder.encoder.*)."""
    import torch

    weights = torch.load(checkpoint, map_location="cpu", weights_only=False)["network_weights"]
    unique = {(v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)): v.numel()
              for k, v in weights.items() if not k.endswith(BUFFER_SUFFIXES)}
    return int(sum(unique.values()))


def epoch_times(model_dir: Path, folds: tuple[int, ...]) -> list[float]:
    """Every "Epoch time: X s" of the training_log_*.txt files in the requested fold folders."""
    times = []
    for fold in folds:
        for log in sorted((model_dir / f"fold_{fold}").glob("training_log_*.txt")):
            times += [float(m) for m in EPOCH_TIME.findall(log.read_text(errors="replace"))]
    return times


def time_inference(model_dir: Path, checkpoint: Path, images_dir: Path, cases: list[str], n_cases: int = 3) -> dict:
    """Seconds per slice of nnUNetPredictor.predict_single_npy_array (one fold, no mirroring) on ``cases``;
    the first case is a warm-up and not timed."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunetv2_cipa.training.discovery import register

    register()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    predictor = nnUNetPredictor(use_mirroring=False, perform_everything_on_device=device.type == "cuda",
                                device=device, verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    fold = checkpoint.parent.name.removeprefix("fold_")
    predictor.initialize_from_trained_model_folder(str(model_dir), use_folds=(fold,), checkpoint_name=checkpoint.name)
    reader = predictor.plans_manager.image_reader_writer_class()
    n_channels = len(predictor.dataset_json["channel_names"])
    ending = predictor.dataset_json["file_ending"]
    seconds = []
    for case in cases[:n_cases + 1]:
        image, properties = reader.read_images([str(images_dir / f"{case}_{c:04d}{ending}") for c in range(n_channels)])
        start = time.perf_counter()
        predictor.predict_single_npy_array(image, properties)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    timed = seconds[1:] or seconds
    return {"seconds_per_slice": float(np.mean(timed)), "n_slices_timed": len(timed), "device": str(device),
            "checkpoint": str(checkpoint), "mirroring": False}


def model_costs(model_dir: Path, folds: tuple[int, ...], images_dir: Path, cases: list[str],
                measure_inference: bool = True) -> dict:
    """{parameters, checkpoint, epoch_time_s {mean, median, n_epochs}, inference {...}, notes} of one model folder."""
    notes = []
    checkpoint = find_checkpoint(model_dir, folds)
    if checkpoint is None:
        notes.append(f"no {' / '.join(CHECKPOINT_NAMES)} in {model_dir}/fold_*: parameters and inference time "
                     f"not measured")
    times = epoch_times(model_dir, folds)
    if not times:
        notes.append(f"no 'Epoch time' lines in {model_dir}/fold_*/training_log_*.txt")
    inference = None
    if checkpoint is not None and measure_inference:
        try:
            inference = time_inference(model_dir, checkpoint, images_dir, cases)
        except Exception as e:  # timing is auxiliary: report why it failed instead of losing the comparison
            notes.append(f"inference timing failed: {type(e).__name__}: {e}")
    elif checkpoint is not None:
        notes.append("inference timing disabled (time_inference=False)")
    return {"parameters": count_parameters(checkpoint) if checkpoint else None,
            "checkpoint": str(checkpoint) if checkpoint else None,
            "epoch_time_s": {"mean": float(np.mean(times)), "median": float(np.median(times)), "n_epochs": len(times)}
            if times else None,
            "inference": inference, "notes": notes}
