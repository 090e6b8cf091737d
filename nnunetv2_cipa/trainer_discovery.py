"""Making the CIPA trainers discoverable by nnU-Net's stock CLI (``nnUNet_extTrainer``, nnU-Net >= 2.8).

Neutral ground: it imports neither ``nnunetv2_cipa.training`` nor the evaluation, so that both (and ``paths``) can
use it; nnU-Net itself is imported only when a trainer class is looked up.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

ENV_VAR = "nnUNet_extTrainer"


def ext_trainer_path() -> Path:
    """The folder to export as nnUNet_extTrainer: the repository's ``trainers/`` (editable install) or its copy
    ``nnunetv2_cipa/ext_trainers`` inside an installed wheel. Its modules only re-export classes defined in
    ``nnunetv2_cipa.training``, so the classes pickle by reference."""
    spec = importlib.util.find_spec("nnunetv2_cipa.ext_trainers")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nnunetv2_cipa.ext_trainers is not installed; reinstall nnunetv2-cipa")
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def register() -> None:
    """Prepend the trainer folder to nnUNet_extTrainer in this process (inherited by its children)."""
    path = str(ext_trainer_path())
    current = [p for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    if path not in current:
        os.environ[ENV_VAR] = os.pathsep.join([path, *current])


def find_trainer_class(name: str) -> type:
    """Resolve a trainer name exactly as ``nnUNetv2_train -tr NAME`` does, with our folder registered."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    register()
    return recursive_find_trainer_class_by_name(name)
