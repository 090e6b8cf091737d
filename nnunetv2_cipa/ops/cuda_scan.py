"""The ``cuda`` backend: mamba-ssm's fused selective-scan kernel, used only once it is known to work on the device.

``mamba_ssm.ops.selective_scan_interface`` wraps a compiled extension module, ``selective_scan_cuda``. The releases
(1.2 to 2.3.2.post1) import it unconditionally, so a missing build or one compiled against another torch makes the
interface raise ImportError; mamba-ssm's later sources build it only on request (MAMBA_KEEP_CUDA_BUILD=TRUE) and
set it to None when absent, so the interface imports and the first scan raises. A kernel compiled for other GPU
architectures imports and fails only when launched. :class:`FusedKernelProbe` therefore imports the interface once,
checks the extension object itself, and runs one small forward + backward per device against the reference loop
(``kernel_probe``). mamba-ssm is imported on the first probe, never when this module is imported.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re

import torch

from nnunetv2_cipa.ops.kernel_probe import KernelProbe, distribution_version, first_line, smoke_call

INTERFACE = "mamba_ssm.ops.selective_scan_interface"
CXX20_TORCH = (2, 14)  # the first torch whose ATen headers refuse to compile before C++20


TRANSFORMERS_FOR_OLD_MAMBA_SSM = "transformers<5"  # mamba-ssm < 2.3.0 imports generation classes transformers 5 removed


def mamba_ssm_version() -> str:
    """The installed mamba-ssm distribution's version, or "not installed"."""
    return distribution_version("mamba-ssm")


def torch_requires_cxx20() -> bool:
    """Whether the installed torch's headers need C++20, which mamba-ssm's setup.py (up to 2.3.2.post1) overrides
    with its own -std=c++17, so that its build stops in ATen.h."""
    return tuple(int(part) for part in torch.__version__.split(".")[:2]) >= CXX20_TORCH


def _requirement_for(module: str) -> str:
    """The requirement to pip-install for a missing top-level ``module`` that mamba-ssm imports: its entry in
    mamba-ssm's declared dependencies where one matches (e.g. "triton>=3.5.0"), else the module's name."""
    def normal(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    try:
        declared = importlib.metadata.requires("mamba-ssm") or []
    except importlib.metadata.PackageNotFoundError:
        declared = []
    for requirement in declared:
        name = re.match(r"[A-Za-z0-9._-]+", requirement)
        if name and normal(name.group()) == normal(module) and "extra ==" not in requirement:
            return requirement.split(";")[0].strip()
    return module


class FusedKernelProbe(KernelProbe):
    """Whether mamba-ssm's fused kernel can run on a CUDA device (:class:`KernelProbe`). mamba-ssm's package imports
    its dependencies (transformers, einops, triton, ...) on the way to the interface: one missing, as after an install
    with ``--no-deps``, or a transformers too new for mamba-ssm before 2.3.0 (``ImportError: cannot import name
    'GreedySearchDecoderOnlyOutput'``) is reported with the requirement to install, not a rebuild."""

    def __init__(self, smoke=smoke_call):
        super().__init__(smoke)
        self._requirement = None  # what to pip-install when mamba-ssm's import fails on a dependency

    def name(self) -> str:
        return f"mamba-ssm {mamba_ssm_version()}'s fused kernel"

    def load(self) -> tuple:
        try:
            interface = importlib.import_module(INTERFACE)
        except Exception as e:  # ImportError, an extension that fails to load (undefined symbol, ...), or a
            # RuntimeError from a dependency's lazy import (transformers: "Failed to import transformers...")
            name = getattr(e, "name", None) or ""  # ImportError's; a RuntimeError or OSError has none
            missing = name if isinstance(e, ModuleNotFoundError) else ""
            top_level = missing.split(".")[0]
            if missing == "mamba_ssm":
                return None, "mamba-ssm is not installed"
            if top_level and top_level not in ("mamba_ssm", "selective_scan_cuda"):
                self._requirement = _requirement_for(top_level)
                return None, (f"mamba-ssm {mamba_ssm_version()} cannot be imported ({first_line(e)}): it needs "
                              f"{self._requirement}")
            if name.split(".")[0] == "transformers":  # a name gone from the installed transformers
                self._requirement = TRANSFORMERS_FOR_OLD_MAMBA_SSM
                return None, (f"mamba-ssm {mamba_ssm_version()} cannot be imported with transformers "
                              f"{distribution_version('transformers')} ({first_line(e)}): mamba-ssm before 2.3.0 "
                              f"needs {TRANSFORMERS_FOR_OLD_MAMBA_SSM}")
            return None, f"mamba-ssm {mamba_ssm_version()} cannot be imported ({first_line(e)})"
        extension = getattr(interface, "selective_scan_cuda", None)
        if all(callable(getattr(extension, name, None)) for name in ("fwd", "bwd")):
            return interface.selective_scan_fn, None
        return None, (f"mamba-ssm {mamba_ssm_version()} is installed without its compiled selective-scan extension "
                      "(selective_scan_cuda)")

    def fix(self) -> str:
        """How to install or rebuild mamba-ssm so that the fused kernel works (a command line)."""
        if self._requirement is not None:  # a dependency missing or too new: no rebuild
            return f'pip install "{self._requirement}"'
        version = mamba_ssm_version()
        if version == "not installed":
            command = 'MAMBA_KEEP_CUDA_BUILD=TRUE pip install --no-build-isolation "nnunetv2-cipa[cuda]"'
        else:
            command = (f'MAMBA_FORCE_BUILD=TRUE MAMBA_KEEP_CUDA_BUILD=TRUE pip install --no-build-isolation '
                       f'--no-cache-dir --force-reinstall --no-deps "mamba-ssm=={version}" (builds it for this torch; '
                       'docs/usage.md, "0. Install": building for this GPU only)')
        if torch_requires_cxx20():
            command += (f'; torch {torch.__version__} needs C++20: if the build stops at "#error C++20 or later '
                        'compatible compiler is required to use ATen", build from mamba-ssm\'s source with -std=c++20 '
                        'in place of -std=c++17 in its setup.py (docs/usage.md, "0. Install")')
        return command


PROBE = FusedKernelProbe()


def cuda_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """The whole operator through mamba-ssm's kernel, in float32 (contiguous copies); returns u's dtype."""
    args = [t.float().contiguous() for t in (u, delta, A, B, C)]
    out = PROBE.scan_fn()(*args, D=None if D is None else D.float(), z=None if z is None else z.float(),
                          delta_bias=None if delta_bias is None else delta_bias.float().contiguous(),
                          delta_softplus=delta_softplus)
    return out.to(u.dtype)
