"""Where the CIPA trainers find the ImageNet VMamba checkpoint of the shared encoder: env ``nnUNet_CIPA_pretrained``."""

from __future__ import annotations

import os
from pathlib import Path

PRETRAINED_ENV_VAR = "nnUNet_CIPA_pretrained"


def missing_checkpoint_message() -> str:
    return (f"{PRETRAINED_ENV_VAR} is not set: export it to the path of the ImageNet VMamba-T checkpoint "
            "(vssmtiny_dp01_ckpt_epoch_292.pth) to start a training from it")


def imagenet_checkpoint_path() -> Path | None:
    """The checkpoint named by env nnUNet_CIPA_pretrained, None if unset; ValueError if it is not a file."""
    value = os.environ.get(PRETRAINED_ENV_VAR, "").strip()
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"{PRETRAINED_ENV_VAR}={value}: no such file")
    return path
