"""The selective-scan backends as one table (:data:`BACKENDS`) and how ``auto`` chooses among them.

``cuda`` is mamba-ssm's fused kernel (``cuda_scan``), ``triton`` this package's Triton kernels (``triton_scan``),
``cpu`` the numba kernels (``cpu_scan``), ``torch`` the chunked pure-PyTorch scan (``chunked_scan``), ``reference``
the sequential loop (``reference_scan``, for tests).
``auto`` (the default; NNUNETV2_CIPA_SCAN_BACKEND overrides it, an explicit ``backend=`` argument overrides both)
takes the first backend compiled for the tensors' device type that can run there (on CUDA: cuda, then triton), else
``torch``. When that skips the fused CUDA kernel it prints one warning per device to stderr; an explicitly requested
backend that cannot run raises ValueError with the reason."""

from __future__ import annotations

import functools
import logging
import os
import sys
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from nnunetv2_cipa.ops import cuda_scan
from nnunetv2_cipa.ops.chunked_scan import chunked_selective_scan
from nnunetv2_cipa.ops.kernel_probe import KernelProbe, directional_smoke_call, distribution_version, first_line, \
    smoke_call
from nnunetv2_cipa.ops.reference_scan import compute_dtype, selective_scan_reference

ENV_VAR = "NNUNETV2_CIPA_SCAN_BACKEND"
RUNS_INSTEAD = {
    "torch": ('The pure-PyTorch "torch" scan runs instead, an order of magnitude or more slower (docs/benchmarks.md, '
              '"Selective scan")'),
    "triton": ('The "triton" scan kernels run instead (nothing to build; their speed against the fused kernel: '
               'docs/benchmarks.md, "GPU checklist")'),
}
_logger = logging.getLogger(__name__)
_logged_backends: set[str] = set()
_warned_devices: set[str] = set()


@dataclass(frozen=True)
class ScanBackend:
    """One way to compute the scans.

    device_type: the only device type it runs on (None: any); requirement(device) -> why it cannot run on a device
    of that type, or None; fix() -> the command that meets the requirement (None: none to run).
    selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus) -> y is the whole operator;
    directional_scan(u, delta, A, B, C, positions, delta_bias, delta_softplus) -> y the bare K-direction scan in
    position order, or None when directional_scan gathers the K orders for selective_scan. warn_on_fallback: ``auto``
    skipping this backend is announced on stderr."""

    device_type: str | None
    requirement: Callable[[torch.device], str | None]
    selective_scan: Callable
    directional_scan: Callable | None = None
    fix: Callable[[], str | None] | None = None
    warn_on_fallback: bool = False

    def problem(self, device: torch.device) -> str | None:
        """None when the backend can run on ``device``, else the reason."""
        if self.device_type is not None and device.type != self.device_type:
            return f"it needs {self.device_type.upper()} tensors, got {device.type}"
        return self.requirement(device)


def scan_with_core(core, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """The whole operator from a bare grouped scan ``core(u, delta, A, B4, C4, delta_bias, delta_softplus) -> y``
    (B4, C4 (b, G, N, L); the core applies bias and softplus itself): the D skip and the z gate around it.

    Computes in at least float32 and returns u's dtype; autograd covers everything outside the core."""
    dtype = compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    out_dtype = u.dtype
    u, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))  # any memory layout; each core picks its own
    y = core(u, delta, A, B if B.dim() == 4 else B.unsqueeze(1), C if C.dim() == 4 else C.unsqueeze(1),
             None if delta_bias is None else delta_bias.to(dtype), delta_softplus)
    if D is not None:
        y = y + D.to(dtype)[None, :, None] * u
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(out_dtype)


@functools.cache
def _numba_scan():
    """The ``cpu`` backend's module (numba imported with it), or None when numba is missing."""
    try:
        from nnunetv2_cipa.ops import cpu_scan
    except ImportError:
        return None
    return cpu_scan


def _needs_numba(device: torch.device) -> str | None:
    return None if _numba_scan() is not None else "numba is not installed"


def _fused_kernel_problem(device: torch.device) -> str | None:
    return cuda_scan.PROBE.problem(device)  # looked up per call: the probe object can be replaced (tests)


def _fused_kernel_fix() -> str:
    return cuda_scan.PROBE.fix()


class TritonKernelProbe(KernelProbe):
    """Whether the ``triton`` backend's kernels compile and run on a CUDA device (:class:`KernelProbe`), in both
    layouts (the plain grouped scan, and the directional scan read in position order); triton is imported on the
    first probe."""

    def __init__(self, smoke=None):
        super().__init__(smoke or self.smoke_both_layouts)
        self._triton_missing = False
        self._directional_fn = None  # set by load()

    def smoke_both_layouts(self, scan_fn, device: torch.device) -> str | None:
        return smoke_call(scan_fn, device) or directional_smoke_call(self.directional_fn(), device)

    def directional_fn(self):
        """The kernels' bare directional scan (after a successful :meth:`problem`)."""
        self.scan_fn()  # raises if the kernels could not be loaded
        return self._directional_fn

    def name(self) -> str:
        return f"the Triton {distribution_version('triton')} scan kernels"

    @staticmethod
    def import_kernels():
        """The kernels' module (imports triton)."""
        from nnunetv2_cipa.ops import triton_scan

        return triton_scan

    def load(self) -> tuple:
        try:
            kernels = self.import_kernels()
        except Exception as e:  # triton missing, or one that fails to initialise
            missing = getattr(e, "name", None) or ""
            self._triton_missing = isinstance(e, ModuleNotFoundError) and missing.split(".")[0] == "triton"
            return None, f"triton cannot be imported ({first_line(e)})"
        self._directional_fn = kernels.triton_directional_scan
        return functools.partial(scan_with_core, kernels.triton_selective_scan), None

    def fix(self) -> str | None:
        """The install command when triton is not installed; None otherwise (nothing to install)."""
        self._load_once()
        return "pip install triton (PyTorch's Linux CUDA wheels include it)" if self._triton_missing else None


TRITON_PROBE = TritonKernelProbe()


def _triton_problem(device: torch.device) -> str | None:
    return TRITON_PROBE.problem(device)  # looked up per call: the probe object can be replaced (tests)


def _triton_selective_scan(*args):
    return TRITON_PROBE.scan_fn()(*args)


def _triton_directional_scan(*args):
    return TRITON_PROBE.directional_fn()(*args)


def _cpu_selective_scan(*args):
    return scan_with_core(_numba_scan().cpu_selective_scan, *args)


def _cpu_directional_scan(*args):
    return _numba_scan().cpu_directional_scan(*args)


def _always(device: torch.device) -> None:
    return None


BACKENDS: dict[str, ScanBackend] = {
    "cuda": ScanBackend("cuda", _fused_kernel_problem, cuda_scan.cuda_selective_scan, fix=_fused_kernel_fix,
                        warn_on_fallback=True),
    "triton": ScanBackend("cuda", _triton_problem, _triton_selective_scan, _triton_directional_scan,
                          fix=lambda: TRITON_PROBE.fix()),
    "cpu": ScanBackend("cpu", _needs_numba, _cpu_selective_scan, _cpu_directional_scan,
                       fix=lambda: "pip install numba"),
    "torch": ScanBackend(None, _always, functools.partial(scan_with_core, chunked_selective_scan)),
    "reference": ScanBackend(None, _always, selective_scan_reference),
}
CHOICES = ("auto", *BACKENDS)


def _with_fix(name: str, device: torch.device, reason: str) -> str:
    """``reason`` why backend ``name`` cannot run on ``device``, followed by the fix when there is one."""
    backend = BACKENDS[name]
    fix = backend.fix() if backend.fix and device.type == backend.device_type else None
    return f"{reason}; fix: {fix}" if fix else reason


class BackendChoice(NamedTuple):
    """What runs a scan on a device: ``name``, for the ``requested`` choice (auto or a backend's name); ``skipped``:
    the device's compiled backends auto had to pass over, in order, each as (name, reason)."""

    requested: str
    name: str
    skipped: tuple[tuple[str, str], ...] = ()


def choose_backend(backend: str | None, device: torch.device) -> BackendChoice:
    """The choice for ``backend`` (else NNUNETV2_CIPA_SCAN_BACKEND, else auto) on ``device``, without printing or
    logging. Raises ValueError for an unknown name or a requested backend that cannot run on ``device``."""
    requested = (backend or os.environ.get(ENV_VAR, "auto")).lower()
    if requested not in CHOICES:
        raise ValueError(f"selective_scan: unknown backend {requested!r} (from {'argument' if backend else ENV_VAR}); "
                         f"choose one of {CHOICES}")
    if requested != "auto":
        problem = BACKENDS[requested].problem(device)
        if problem is not None:
            raise ValueError(f"selective_scan: backend {requested!r} cannot run on {device}: "
                             f"{_with_fix(requested, device, problem)}")
        return BackendChoice(requested, requested)
    skipped = []
    for name in (name for name, b in BACKENDS.items() if b.device_type == device.type):
        problem = BACKENDS[name].problem(device)
        if problem is None:
            return BackendChoice(requested, name, tuple(skipped))
        skipped.append((name, problem))
    return BackendChoice(requested, "torch", tuple(skipped))


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The name of the backend that computes a scan of tensors on ``device``: ``backend``, else the environment
    variable NNUNETV2_CIPA_SCAN_BACKEND, else auto (see the module docstring). Raises ValueError for an unknown or
    unusable explicit choice; prints auto's warning when it passes over the fused CUDA kernel (once per device)."""
    choice = choose_backend(backend, device)
    warn = any(BACKENDS[name].warn_on_fallback for name, _ in choice.skipped)
    if warn and str(device) not in _warned_devices:
        _warned_devices.add(str(device))
        reasons = "; ".join(f"the {name!r} scan backend cannot run on {device}: {_with_fix(name, device, reason)}"
                            for name, reason in choice.skipped)
        print(f"nnunetv2_cipa WARNING: {reasons}. {RUNS_INSTEAD[choice.name]}.", file=sys.stderr, flush=True)
    if choice.name not in _logged_backends:
        _logged_backends.add(choice.name)
        _logger.info("selective_scan: using the %r backend", choice.name)
    return choice.name


def available_backends() -> list[str]:
    """Backends usable on this machine (``cuda`` needs a GPU and a working mamba-ssm kernel, ``triton`` a GPU and
    triton, ``cpu`` needs numba)."""
    devices = {"cpu": torch.device("cpu"), "cuda": torch.device("cuda") if torch.cuda.is_available() else None}
    return [name for name, b in BACKENDS.items() if b.device_type is None
            or (devices[b.device_type] is not None and b.problem(devices[b.device_type]) is None)]
