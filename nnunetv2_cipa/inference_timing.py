"""Inference time per slice of a trained nnU-Net model folder, through nnU-Net's own predictor.

It runs next to the trainer discovery (it has to find our trainer classes by name) rather than inside the evaluation,
which only reads files nnU-Net wrote; ``nnunetv2_cipa compare --time-inference`` calls it.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from nnunetv2_cipa.trainer_discovery import register


def time_inference(model_dir: Path, checkpoint: Path, images_dir: Path, cases: list[str], n_cases: int = 3) -> dict:
    """Seconds per slice of nnUNetPredictor.predict_single_npy_array (the checkpoint's fold, with the test-time
    mirroring the checkpoint allows, as nnUNetv2_predict runs by default) on the first ``n_cases`` + 1 of ``cases``
    (raw images in ``images_dir``); the first case is a warm-up and not timed."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    register()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    predictor = nnUNetPredictor(use_mirroring=True, perform_everything_on_device=device.type == "cuda",
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
            "checkpoint": str(checkpoint),
            "mirroring_axes": list(predictor.allowed_mirroring_axes) if predictor.allowed_mirroring_axes else None}
