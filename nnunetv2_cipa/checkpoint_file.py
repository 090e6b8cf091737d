"""Reading checkpoint files written by other training code (ImageNet VMamba, the official CIPA) without trusting them.

Training scripts save more than weights: optimiser and scheduler states, numpy scalars, and their configuration
object (VMamba's classification code a yacs ``CfgNode``, the official CIPA an ``argparse.Namespace``).
``torch.load(weights_only=True)`` refuses every class outside its allow-list and cannot rebuild a dict subclass such
as ``CfgNode`` even when it is allowed. So a file that ``weights_only`` refuses has the globals its pickle references
listed without running it, and is read in full only when all of them are configuration or numpy data types.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from nnunetv2_cipa.errors import InputError

# globals a checkpoint may reference besides torch's weights_only allow-list: plain data, nothing that runs code
CONFIGURATION_GLOBALS = frozenset({
    "argparse.Namespace", "yacs.config.CfgNode",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.dtype",
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray",
})
CONFIGURATION_MODULE_PREFIXES = ("numpy.dtypes.",)  # numpy >= 1.25 pickles dtypes as e.g. numpy.dtypes.Float64DType


def _is_configuration_global(name: str) -> bool:
    return name in CONFIGURATION_GLOBALS or name.startswith(CONFIGURATION_MODULE_PREFIXES)


# torch.load's advice around the cause of a weights_only refusal: to retry with weights_only=False (running the
# pickle), to allow-list the class, to read the documentation
_LOAD_ADVICE = re.compile(r"Weights only load failed\..*?trusted source\.|Please use "
                          r"`torch\.serialization\.add_safe_globals.*|Check the documentation of torch\.load.*",
                          re.DOTALL)


def _reason(err: Exception) -> str:
    """The cause in a torch.load error, without torch's advice (to retry with weights_only=False, ...)."""
    text = str(err).split("WeightsUnpickler error:", 1)[-1]
    return f"{type(err).__name__}: {' '.join(_LOAD_ADVICE.sub(' ', text).split())}"


def _refused_a_global(err: Exception) -> bool:
    return "unsupported global" in str(err).lower()


def can_memory_map(path: Path) -> bool:
    """Whether torch.load can memory-map ``path``: torch.save's zip format, not the legacy (< 1.6) one."""
    return zipfile.is_zipfile(path)


def check_checkpoint_path(path: Path, what: str) -> None:
    """InputError ("``what`` ``path``: ...") unless ``path`` is a file."""
    if not path.is_file():
        raise InputError(f"{what} {path}: {'a folder, not a file' if path.is_dir() else 'no such file'}")


def load_checkpoint_file(path: Path, what: str, mmap: bool = False):
    """The object saved in ``path``, its tensors on the CPU (memory-mapped with ``mmap`` where the format allows:
    only the tensors read are paged in). InputError ("``what`` ``path``: ...") when there is no
    such file, it is not a PyTorch checkpoint, or its pickle references anything but tensors, containers and
    configuration types."""
    check_checkpoint_path(path, what)
    mmap = mmap and can_memory_map(path)
    try:
        with warnings.catch_warnings():  # torch's note on pickle protocols: the refusal below says what matters
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:  # refused by weights_only, or not a pickle at all
        refused = err
    except Exception as err:  # zip and other read errors
        raise InputError(f"{what} {path}: not a PyTorch checkpoint ({_reason(err)})") from err
    try:
        references = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception as err:  # not a torch.save zip file
        if _refused_a_global(refused):  # a pickle weights_only could read: the legacy (torch < 1.6) format
            raise InputError(f"{what} {path}: not loaded, a checkpoint in torch's legacy (< 1.6) format whose "
                             f"pickle references a class or function ({_reason(refused)}); its references cannot be "
                             "listed without running it: if you trust it, save it again with a current torch: "
                             "torch.save(torch.load(old, weights_only=False), new)") from err
        raise InputError(f"{what} {path}: not a PyTorch checkpoint ({_reason(refused)})") from err
    others = sorted(name for name in references if not _is_configuration_global(name))
    if not references or others:
        found = f"it references {', '.join(others)}" if others else _reason(refused)
        raise InputError(f"{what} {path}: not loaded, {found}; a checkpoint of tensors and a training "
                         "configuration needs none of that (load it yourself if you trust it, and save its state dict)")
    return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
