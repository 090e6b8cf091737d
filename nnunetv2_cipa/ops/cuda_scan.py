"""The ``cuda`` backend: mamba-ssm's fused selective-scan kernel, used only once it is known to work on the device.

``mamba_ssm.ops.selective_scan_interface`` wraps a compiled extension module, ``selective_scan_cuda``. The releases
(1.2 to 2.3.2.post1) import it unconditionally, so a missing build or one compiled against another torch makes the
interface raise ImportError; mamba-ssm's later sources build it only on request (MAMBA_KEEP_CUDA_BUILD=TRUE) and
set it to None when absent, so the interface imports and the first scan raises. A kernel compiled for other GPU
architectures imports and fails only when launched. :class:`FusedKernelProbe` therefore imports the interface once,
checks the extension object itself, and runs one small forward + backward per device against the reference loop (in
a thread of its own, so that a first scan inside a checkpointed stage or under inference mode does not change it).
mamba-ssm is imported on the first probe, never when this module is imported.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from concurrent.futures import ThreadPoolExecutor

import torch

from nnunetv2_cipa.ops.reference_scan import selective_scan_reference

INTERFACE = "mamba_ssm.ops.selective_scan_interface"
CXX20_TORCH = (2, 14)  # the first torch whose ATen headers refuse to compile before C++20
_SMOKE_TOLERANCE = 1e-3  # relative to the largest reference value, float32


TRANSFORMERS_FOR_OLD_MAMBA_SSM = "transformers<5"  # mamba-ssm < 2.3.0 imports generation classes transformers 5 removed


def distribution_version(name: str) -> str:
    """The installed version of distribution ``name``, or "not installed"."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


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


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _in_fresh_thread(fn, *args):
    """``fn(*args)`` in a new thread, so that none of the caller's thread-local autograd state reaches it (the
    saved-tensor hooks of activation checkpointing when the first scan runs in a checkpointed stage, inference mode,
    autocast); an exception is raised again here."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mamba-ssm smoke call") as pool:
        return pool.submit(fn, *args).result()


@torch.inference_mode(False)  # nnU-Net's predictor makes the first scan in inference mode, which records no graph
def smoke_call(scan_fn, device: torch.device) -> str | None:
    """Run ``scan_fn`` (mamba-ssm's ``selective_scan_fn`` signature) forward and backward once on tiny grouped float32
    inputs on ``device``; None when it ran and matches the reference loop (output and gradients), else what failed."""
    gen = torch.Generator().manual_seed(0)
    batch, dim, groups, n_state, length = 1, 4, 2, 4, 16
    u, delta = torch.randn(batch, dim, length, generator=gen), torch.rand(batch, dim, length, generator=gen)
    A = -0.5 - torch.rand(dim, n_state, generator=gen)
    B, C = (torch.randn(batch, groups, n_state, length, generator=gen) for _ in range(2))
    cpu_inputs = [u, delta, A, B, C, torch.randn(dim, generator=gen), 0.1 * torch.rand(dim, generator=gen)]

    def run(fn, target):
        with torch.enable_grad(), torch.autocast(target.type, enabled=False):
            inputs = [t.to(target).requires_grad_() for t in cpu_inputs]
            u, delta, A, B, C, D, bias = inputs
            y = fn(u, delta, A, B, C, D=D, z=None, delta_bias=bias, delta_softplus=True)
            weight = torch.cos(torch.arange(y.numel(), dtype=y.dtype, device=target)).view_as(y)
            grads = torch.autograd.grad((y * weight).sum(), inputs)
            return [t.detach().cpu() for t in (y, *grads)]  # .cpu() waits for the kernels

    try:
        results = run(scan_fn, device)
    except Exception as e:  # a launch failure (no kernel image for this GPU), an ABI error, ...
        return f"its smoke call on {device} failed ({_first_line(e)})"
    for name, got, expected in zip(("output", "grad u", "grad delta", "grad A", "grad B", "grad C", "grad D",
                                    "grad delta_bias"), results, run(selective_scan_reference, torch.device("cpu"))):
        error = ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
        if not error <= _SMOKE_TOLERANCE:  # also NaN
            return f"its smoke call on {device} returned a wrong {name} (relative error {error:.1e})"
    return None


class FusedKernelProbe:
    """Whether mamba-ssm's fused kernel can run on a CUDA device. The import is attempted once per probe (a failure
    is kept, not retried), the smoke call once per device; ``smoke(scan_fn, device) -> reason or None``. mamba-ssm's
    package imports its dependencies (transformers, einops, triton, ...) on the way to the interface: one missing, as
    after an install with ``--no-deps``, or a transformers too new for mamba-ssm before 2.3.0 (``ImportError: cannot
    import name 'GreedySearchDecoderOnlyOutput'``) is reported with the requirement to install, not a rebuild."""

    def __init__(self, smoke=smoke_call):
        self._smoke = smoke
        self._import_result = None  # (interface module or None, reason or None) after the first attempt
        self._requirement = None  # what to pip-install when mamba-ssm's import fails on a dependency
        self._device_problems: dict[int, str | None] = {}

    def _import(self):
        if self._import_result is None:
            try:
                interface = importlib.import_module(INTERFACE)
            except Exception as e:  # ImportError, an extension that fails to load (undefined symbol, ...), or a
                # RuntimeError from a dependency's lazy import (transformers: "Failed to import transformers...")
                name = getattr(e, "name", None) or ""  # ImportError's; a RuntimeError or OSError has none
                missing = name if isinstance(e, ModuleNotFoundError) else ""
                top_level = missing.split(".")[0]
                if missing == "mamba_ssm":
                    reason = "mamba-ssm is not installed"
                elif top_level and top_level not in ("mamba_ssm", "selective_scan_cuda"):
                    self._requirement = _requirement_for(top_level)
                    reason = (f"mamba-ssm {mamba_ssm_version()} cannot be imported ({_first_line(e)}): it needs "
                              f"{self._requirement}")
                elif name.split(".")[0] == "transformers":  # a name gone from the installed transformers
                    self._requirement = TRANSFORMERS_FOR_OLD_MAMBA_SSM
                    reason = (f"mamba-ssm {mamba_ssm_version()} cannot be imported with transformers "
                              f"{distribution_version('transformers')} ({_first_line(e)}): mamba-ssm before 2.3.0 "
                              f"needs {TRANSFORMERS_FOR_OLD_MAMBA_SSM}")
                else:
                    reason = f"mamba-ssm {mamba_ssm_version()} cannot be imported ({_first_line(e)})"
                self._import_result = (None, reason)
            else:
                extension = getattr(interface, "selective_scan_cuda", None)
                if all(callable(getattr(extension, name, None)) for name in ("fwd", "bwd")):
                    self._import_result = (interface, None)
                else:
                    self._import_result = (None, f"mamba-ssm {mamba_ssm_version()} is installed without its compiled "
                                                 "selective-scan extension (selective_scan_cuda)")
        return self._import_result

    def scan_fn(self):
        """mamba-ssm's ``selective_scan_fn`` (after a successful :meth:`problem`)."""
        interface, reason = self._import()
        if interface is None:
            raise RuntimeError(reason)
        return interface.selective_scan_fn

    def problem(self, device: torch.device) -> str | None:
        """None when the fused kernel runs on CUDA ``device``, else why it cannot (cached per device)."""
        interface, reason = self._import()
        if reason is not None:
            return reason
        index = device.index if device.index is not None else (
            torch.cuda.current_device() if torch.cuda.is_available() else 0)
        if index not in self._device_problems:
            failure = _in_fresh_thread(self._smoke, interface.selective_scan_fn, torch.device("cuda", index))
            self._device_problems[index] = None if failure is None else \
                f"mamba-ssm {mamba_ssm_version()}'s fused kernel: {failure}"
        return self._device_problems[index]

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
