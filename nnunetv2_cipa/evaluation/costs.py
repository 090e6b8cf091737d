"""Costs of a trained nnU-Net model folder read from its checkpoints: parameter count and training time per epoch."""

from __future__ import annotations

from numbers import Real
from pathlib import Path

import numpy as np
import torch

from nnunetv2_cipa.checkpoint_file import load_checkpoint_file
from nnunetv2_cipa.errors import InputError

# nnU-Net writes checkpoint_latest.pth during training and replaces it by checkpoint_final.pth at the end; the best
# checkpoint holds the log only up to its epoch, so it comes last
CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
TIMESTAMP_KEYS = ("epoch_start_timestamps", "epoch_end_timestamps")


def find_checkpoint(fold_dir: Path) -> Path | None:
    """The first of CHECKPOINT_NAMES in ``fold_dir``, or None."""
    return next((fold_dir / n for n in CHECKPOINT_NAMES if (fold_dir / n).is_file()), None)


def load_checkpoint(path: Path) -> dict:
    """An nnU-Net checkpoint dict, memory-mapped (only the tensors read are paged in); InputError naming the file
    when it is not one."""
    state = load_checkpoint_file(path, "checkpoint", mmap=True)
    weights = state.get("network_weights") if isinstance(state, dict) else None
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise InputError(f"checkpoint {path}: not an nnU-Net checkpoint (no 'network_weights' state dict)")
    logging = state.get("logging") or {}
    if not isinstance(logging, dict) or not all(
            isinstance(logging.get(key, []), list) and all(isinstance(t, Real) for t in logging.get(key, []))
            for key in TIMESTAMP_KEYS):
        raise InputError(f"checkpoint {path}: its 'logging' is not nnU-Net's training log (epoch timestamps)")
    return state


def count_parameters(weights: dict) -> int:
    """Elements of a state dict, normalisation running statistics excluded and tensors shared under several keys
    counted once (nnU-Net's decoders keep a reference to the encoder: decoder.encoder.*)."""
    unique = {(v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)): v.numel()
              for k, v in weights.items() if not k.endswith(BUFFER_SUFFIXES)}
    return int(sum(unique.values()))


def epoch_times(logging: dict) -> list[float]:
    """Seconds per epoch from nnU-Net's logger state (checkpoint["logging"]): end minus start timestamp."""
    starts, ends = (logging.get(key, []) for key in TIMESTAMP_KEYS)
    return [float(end - start) for start, end in zip(starts, ends)]


def model_costs(model_dir: Path, folds: tuple[int, ...]) -> dict:
    """{parameters, checkpoint, epoch_time_s {mean, median, n_epochs}, inference (None), notes} of one model folder:
    parameters from the first fold's checkpoint, epoch times from every requested fold's checkpoint; an unreadable
    checkpoint is a note (costs are auxiliary to the comparison)."""
    notes, times, checkpoint, parameters = [], [], None, None
    for fold in folds:
        path = find_checkpoint(model_dir / f"fold_{fold}")
        if path is None:
            notes.append(f"no {' / '.join(CHECKPOINT_NAMES)} in {model_dir / f'fold_{fold}'}: its parameters and "
                         "epoch times are not counted")
            continue
        try:
            state = load_checkpoint(path)
        except InputError as e:
            notes.append(f"{e}: its parameters and epoch times are not counted")
            continue
        if checkpoint is None:
            checkpoint, parameters = path, count_parameters(state["network_weights"])
        fold_times = epoch_times(state.get("logging") or {})
        if not fold_times:
            notes.append(f"{path}: no epoch timestamps in its training log")
        times += fold_times
    return {"parameters": parameters, "checkpoint": str(checkpoint) if checkpoint else None,
            "epoch_time_s": {"mean": float(np.mean(times)), "median": float(np.median(times)), "n_epochs": len(times)}
            if times else None,
            "inference": None, "notes": notes}
