"""Repair for CPU-only torch with PyPI's CUDA torchvision (README.md, "CPU-only machines").

PyPI's torchvision wheel is a CUDA build. On a CPU build of torch its compiled ops fail to load, and then
``torchvision._meta_registrations`` registers fake kernels for ``torchvision::nms``/``qnms``, which do not exist, so
``import torchvision`` (hence ``import timm``, hence nnU-Net's trainer lookup) dies. This module puts an import hook on
``sys.meta_path`` that, right before ``torchvision._meta_registrations`` is imported, defines the two op schemas, and
only when torchvision's compiled extension did not load. Where torchvision loads normally it does nothing.

A one-line ``.pth`` file (``python -m nnunetv2_cipa.torchvision_fix install``) loads it at interpreter start, so the
stock ``nnUNetv2_*`` console scripts get it too. It never touches nnU-Net or torchvision files.
"""

from __future__ import annotations

import importlib.abc
import sys
import sysconfig
from pathlib import Path

PTH_NAME = "nnunetv2_cipa_torchvision_fix.pth"
_TARGET = "torchvision._meta_registrations"
_library = None  # keeps the torch.library fragment alive


def _define_missing_schemas() -> bool:
    """Define torchvision::nms/qnms schemas if the compiled ops are missing. Returns True if it did."""
    global _library
    import torch
    import torchvision.extension

    if torchvision.extension._has_ops() or _library is not None:
        return False
    _library = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        _library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return True


class _MetaRegistrationsHook(importlib.abc.MetaPathFinder):
    """Runs the repair once, just before torchvision's meta registrations are imported, then removes itself."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == _TARGET:
            remove()
            _define_missing_schemas()
        return None  # let the normal finders import the module


def install_hook() -> None:
    """Add the import hook (idempotent); a no-op if torchvision's meta registrations were already imported."""
    if _TARGET in sys.modules or any(isinstance(f, _MetaRegistrationsHook) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _MetaRegistrationsHook())


def remove() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _MetaRegistrationsHook)]


def is_active() -> bool:
    """True when torchvision's compiled ops are missing and the repair defined the schemas."""
    return _library is not None


def pth_path() -> Path:
    return Path(sysconfig.get_paths()["purelib"]) / PTH_NAME


def install_pth() -> Path:
    """Write the .pth file into this environment's site-packages; returns its path."""
    target = pth_path()
    target.write_text("import nnunetv2_cipa.torchvision_fix as _f; _f.install_hook()\n")
    return target


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        sys.exit("usage: python -m nnunetv2_cipa.torchvision_fix install")
    print(f"wrote {install_pth()}")
