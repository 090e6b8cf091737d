"""Whether a compiled selective-scan kernel works on a CUDA device, found out once: :class:`KernelProbe` loads the
kernel's module once (a failure is kept, not retried) and runs one small forward + backward per device against the
reference loop (:func:`smoke_call`), in a thread of its own, so that a first scan inside a checkpointed stage, under
inference mode or autocast does not change it. The ``cuda`` (mamba-ssm) and ``triton`` backends each have one."""

from __future__ import annotations

import importlib.metadata
from concurrent.futures import ThreadPoolExecutor

import torch

from nnunetv2_cipa.ops.reference_scan import directional_reference, selective_scan_reference

_SMOKE_TOLERANCE = 1e-3  # relative to the largest reference value, float32


def distribution_version(name: str) -> str:
    """The installed version of distribution ``name``, or "not installed"."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def first_line(error: BaseException) -> str:
    """``Type: first line of the message``."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _in_fresh_thread(fn, *args):
    """``fn(*args)`` in a new thread, so that none of the caller's thread-local autograd state reaches it (the
    saved-tensor hooks of activation checkpointing when the first scan runs in a checkpointed stage, inference mode,
    autocast); an exception is raised again here."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="scan kernel smoke call") as pool:
        return pool.submit(fn, *args).result()


def _matches_reference(kernel_fn, reference_fn, cpu_inputs: dict, device: torch.device, call: str) -> str | None:
    """Run ``kernel_fn(*inputs)`` on ``device`` and ``reference_fn(*inputs)`` on the CPU, forward and backward, for
    ``cpu_inputs`` {name: tensor}; None when the output and the gradient of every input agree, else what failed
    (``call`` names the call)."""

    def run(fn, target):
        with torch.enable_grad(), torch.autocast(target.type, enabled=False):
            inputs = [t.to(target).requires_grad_() for t in cpu_inputs.values()]
            y = fn(*inputs)
            weight = torch.cos(torch.arange(y.numel(), dtype=y.dtype, device=target)).view_as(y)
            grads = torch.autograd.grad((y * weight).sum(), inputs)
            return [t.detach().cpu() for t in (y, *grads)]  # .cpu() waits for the kernels

    try:
        results = run(kernel_fn, device)
    except Exception as e:  # a launch failure (no kernel image for this GPU), an ABI error, a compiler error, ...
        return f"its {call} on {device} failed ({first_line(e)})"
    names = ["output", *(f"grad {name}" for name in cpu_inputs)]
    for name, got, expected in zip(names, results, run(reference_fn, torch.device("cpu"))):
        error = ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
        if not error <= _SMOKE_TOLERANCE:  # also NaN
            return f"its {call} on {device} returned a wrong {name} (relative error {error:.1e})"
    return None


@torch.inference_mode(False)  # nnU-Net's predictor makes the first scan in inference mode, which records no graph
def smoke_call(scan_fn, device: torch.device) -> str | None:
    """Run ``scan_fn`` (mamba-ssm's ``selective_scan_fn`` signature) forward and backward once on small grouped float32
    inputs on ``device`` (70 steps: several tiles of a tiled kernel); None when it ran and matches the reference loop
    (output and gradients), else what failed."""
    gen = torch.Generator().manual_seed(0)
    batch, dim, groups, n_state, length = 1, 4, 2, 4, 70
    u, delta = torch.randn(batch, dim, length, generator=gen), torch.rand(batch, dim, length, generator=gen)
    A = -0.5 - torch.rand(dim, n_state, generator=gen)
    B, C = (torch.randn(batch, groups, n_state, length, generator=gen) for _ in range(2))
    inputs = dict(u=u, delta=delta, A=A, B=B, C=C, D=torch.randn(dim, generator=gen),
                  delta_bias=0.1 * torch.rand(dim, generator=gen))

    def with_signature(fn):
        return lambda u, delta, A, B, C, D, bias: fn(u, delta, A, B, C, D=D, z=None, delta_bias=bias,
                                                     delta_softplus=True)

    return _matches_reference(with_signature(scan_fn), with_signature(selective_scan_reference), inputs, device,
                              "smoke call")


@torch.inference_mode(False)  # as smoke_call: its inputs are made here, and must not be inference tensors
def directional_smoke_call(directional_fn, device: torch.device) -> str | None:
    """As :func:`smoke_call` for a backend's bare directional scan (``directional_fn(u, delta, A, B, C, positions,
    delta_bias, delta_softplus)``): a batch of 2, 2 directions (row-major and its reverse) of 70 positions."""
    gen = torch.Generator().manual_seed(0)
    batch, dim, n_dirs, n_state, length = 2, 4, 2, 4, 70
    positions = torch.stack([torch.arange(length), torch.arange(length).flip(0)])
    inputs = dict(u=torch.randn(batch, length, dim, generator=gen),
                  delta=torch.rand(n_dirs, batch, length, dim, generator=gen),
                  A=-0.5 - torch.rand(n_dirs * dim, n_state, generator=gen),
                  B=torch.randn(batch, length, n_dirs, n_state, generator=gen),
                  C=torch.randn(batch, length, n_dirs, n_state, generator=gen),
                  delta_bias=0.1 * torch.rand(n_dirs * dim, generator=gen))

    def with_positions(fn):
        return lambda u, delta, A, B, C, bias: fn(u, delta, A, B, C, positions.to(u.device), bias, True)

    return _matches_reference(with_positions(directional_fn), with_positions(directional_reference), inputs, device,
                              "directional smoke call")


class KernelProbe:
    """Whether one compiled kernel can run on a CUDA device. Subclasses define :meth:`load` and :meth:`name`;
    ``smoke(scan_fn, device) -> reason or None`` is the check per device (tests replace it)."""

    def __init__(self, smoke=smoke_call):
        self._smoke = smoke
        self._loaded = None  # (scan_fn or None, reason or None) after the first attempt
        self._device_problems: dict[int, str | None] = {}

    def load(self) -> tuple:
        """(scan_fn with mamba-ssm's ``selective_scan_fn`` signature, None), or (None, why it cannot be loaded)."""
        raise NotImplementedError

    def name(self) -> str:
        """The kernel and its version, for messages."""
        raise NotImplementedError

    def _load_once(self) -> tuple:
        if self._loaded is None:
            self._loaded = self.load()
        return self._loaded

    def scan_fn(self):
        """The kernel's scan function (after a successful :meth:`problem`)."""
        scan_fn, reason = self._load_once()
        if scan_fn is None:
            raise RuntimeError(reason)
        return scan_fn

    def problem(self, device: torch.device) -> str | None:
        """None when the kernel runs on CUDA ``device``, else why it cannot (cached per device)."""
        scan_fn, reason = self._load_once()
        if reason is not None:
            return reason
        index = device.index if device.index is not None else (
            torch.cuda.current_device() if torch.cuda.is_available() else 0)
        if index not in self._device_problems:
            failure = _in_fresh_thread(self._smoke, scan_fn, torch.device("cuda", index))
            self._device_problems[index] = None if failure is None else f"{self.name()}: {failure}"
        return self._device_problems[index]
