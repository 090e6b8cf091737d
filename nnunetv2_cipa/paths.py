"""nnU-Net's folder variables: reading them for the user, and setting them for the console scripts we run."""

from __future__ import annotations

import os
from pathlib import Path

from nnunetv2_cipa.errors import InputError

NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def required_folder(name: str) -> Path:
    """The folder in environment variable ``name`` (one of NNUNET_FOLDERS); InputError if it is unset."""
    value = os.environ.get(name)
    if not value:
        raise InputError(f"{name} is not set; export it to nnU-Net's {name.removeprefix('nnUNet_')} folder")
    return Path(value)


def cli_environment(root: Path) -> dict[str, str]:
    """os.environ plus nnU-Net's three folders created under ``root``, our trainers discoverable, 2 worker processes
    for nnU-Net's pools, and no ``nnUNet_n_proc_DA`` (nnU-Net 2.8.1's planner crashes with 0; set it for training)."""
    from nnunetv2_cipa.training.discovery import ext_trainer_path

    env = dict(os.environ, nnUNet_extTrainer=str(ext_trainer_path()), nnUNet_def_n_proc="2", PYTHONUNBUFFERED="1")
    for name in NNUNET_FOLDERS:
        (root / name).mkdir(parents=True, exist_ok=True)
        env[name] = str(root / name)
    env.pop("nnUNet_n_proc_DA", None)
    return env
