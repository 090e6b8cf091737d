"""How many CIPA training samples fit on a GPU: a memory model measured by benchmarks/bench_memory.py.

A training step needs, besides the activations, the training state: float32 weights, their gradients and AdamW's two
moments (16 bytes per parameter), under DDP also the gradient buckets (4 more). The activations kept for backward,
plus the transient buffers of backward, grow linearly with the batch and with the pixels of the patch, so one
coefficient per (preset, scan path, activation width, checkpointing) gives the per-sample bytes:
``ACTIVATION_BYTES_PER_PIXEL[...] * H * W``.
- scan path: the ``cpu`` and ``triton`` backends read the map in place in every scan order, keeping the inputs and
  a state per 32 steps ("in_place"); ``torch``, ``cuda`` (mamba-ssm) and ``reference`` gather the four scan orders
  into copies that are kept for backward ("gathered");
- activation width: 4 bytes without autocast, 2 bytes under fp16 / bf16 autocast (measured under CPU bf16 autocast,
  whose lower-precision op list matches CUDA's fp16 autocast, with LayerNorm in float32 as CUDA's autocast runs it;
  the selective scan runs in float32 too);
- checkpointing: ``CIPA.activation_checkpointing`` (stages recomputed in backward).
The ablations take the full network's coefficients: without CRM or DCIM a network keeps less (measured at 256 x 256:
3.4-6.4% and 10-20% less, within 2% with checkpointing), and the no-Mamba control (``token_mixer="memoryless"``) runs
no scan (backend None), so it takes the in-place figures (measured within 5% of them).
Of the device's free memory ``USABLE_FRACTION`` is planned for (the rest covers the CUDA caching allocator's
fragmentation, cuDNN workspaces and the data loader's pinned buffers). The ``torch`` backend on a GPU also needs its
channel-block workspace. Batch = min(planned, what fits), at least 1.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

BATCH_SIZE_ENV_VAR = "nnUNet_CIPA_batch_size"
USABLE_FRACTION = 0.9
TRAINING_STATE_BYTES_PER_PARAMETER = 16  # float32 weight + gradient + AdamW exp_avg + exp_avg_sq
DDP_BUCKET_BYTES_PER_PARAMETER = 4  # DDP copies every float32 gradient into its all-reduce buckets
SCAN_PATHS = {"cpu": "in_place", "triton": "in_place", "torch": "gathered", "cuda": "gathered", "reference": "gathered"}
TORCH_SCAN_WORKSPACE_BYTES_CUDA = 6 * (1 << 26) * 4  # ~6 live channel blocks of 2**26 float32 state elements
GIB = 2 ** 30

# bytes per input pixel per sample of one forward + backward with deep supervision, keyed by
# (preset, scan path, activation bytes, checkpointing). Measured on CPU by `python benchmarks/bench_memory.py` at
# 512 x 512 (docs/benchmarks.md, "Training memory"): the in-place path with the numba kernel (``cpu``), the gathered
# path with the same kernel behind it, which keeps its chunk states too, so it errs on the high side for mamba-ssm.
# The triton kernels keep what the numba kernel keeps: the inputs in position order (delta after softplus there,
# before it here: the same size) and the state entering every 32 steps; like it they add the directions' outputs
# into one tensor. 256 x 256 gives the same figures within 2.2%, so small and base were measured at 256 x 256.
ACTIVATION_BYTES_PER_PIXEL: dict[tuple[str, str, int, bool], float] = {
    ("tiny", "gathered", 4, False): 21568, ("tiny", "gathered", 4, True): 6403,
    ("tiny", "gathered", 2, False): 18795, ("tiny", "gathered", 2, True): 6323,
    ("tiny", "in_place", 4, False): 17727, ("tiny", "in_place", 4, True): 3781,
    ("tiny", "in_place", 2, False): 14827, ("tiny", "in_place", 2, True): 3323,
    ("micro", "gathered", 4, False): 1075, ("micro", "gathered", 4, True): 416,
    ("micro", "gathered", 2, False): 905, ("micro", "gathered", 2, True): 443,
    ("micro", "in_place", 4, False): 955, ("micro", "in_place", 4, True): 302,
    ("micro", "in_place", 2, False): 783, ("micro", "in_place", 2, True): 279,
    ("small", "gathered", 4, False): 30310, ("small", "gathered", 4, True): 13402,
    ("small", "gathered", 2, False): 26451, ("small", "gathered", 2, True): 11938,
    ("small", "in_place", 4, False): 24720, ("small", "in_place", 4, True): 10334,
    ("small", "in_place", 2, False): 20701, ("small", "in_place", 2, True): 8796,
    ("base", "gathered", 4, False): 40174, ("base", "gathered", 4, True): 17793,
    ("base", "gathered", 2, False): 35040, ("base", "gathered", 2, True): 15879,
    ("base", "in_place", 4, False): 32700, ("base", "in_place", 4, True): 13711,
    ("base", "in_place", 2, False): 27422, ("base", "in_place", 2, True): 11645,
}


def activation_bytes(dtype: str | torch.dtype | None) -> int:
    """4 for float32 activations (no autocast), 2 under fp16 / bf16 autocast."""
    name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    if name not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"activation dtype must be float32, float16 or bfloat16, got {dtype!r}")
    return 4 if name == "float32" else 2


def scan_path(backend: str | None) -> str:
    """The coefficients' scan path when the selective scans run on ``backend``; None: a network without scans (the
    memoryless mixer), which keeps what the in-place path keeps."""
    if backend is None:
        return "in_place"
    if backend not in SCAN_PATHS:
        raise ValueError(f"unknown scan backend {backend!r}; choose one of {sorted(SCAN_PATHS)}")
    return SCAN_PATHS[backend]


def _scans_text(backend: str | None) -> str:
    return "no selective scans" if backend is None else f"the {backend} scan"


def activation_bytes_per_sample(preset: str, patch_size, backend: str | None, dtype, checkpointing: bool) -> int:
    """Predicted training-step activation bytes of one sample of CIPA ``preset`` at ``patch_size`` (H, W), its scans
    on ``backend`` (None: no scans)."""
    path = scan_path(backend)
    key = (preset, path, activation_bytes(dtype), bool(checkpointing))
    if key not in ACTIVATION_BYTES_PER_PIXEL:
        raise ValueError(f"no measured memory coefficient for preset {preset!r} with {_scans_text(backend)} "
                         f"({path} path); measured: "
                         f"{sorted({(k[0], k[1]) for k in ACTIVATION_BYTES_PER_PIXEL})}")
    return int(ACTIVATION_BYTES_PER_PIXEL[key] * math.prod(int(s) for s in patch_size))


def training_state_bytes(parameters: int, distributed: bool = False) -> int:
    """Weights, gradients and AdamW moments of ``parameters`` float32 parameters (and DDP's gradient buckets)."""
    per_parameter = TRAINING_STATE_BYTES_PER_PARAMETER + (DDP_BUCKET_BYTES_PER_PARAMETER if distributed else 0)
    return per_parameter * parameters


def scan_workspace_bytes(backend: str | None, device_type: str) -> int:
    """Scratch memory of one selective-scan call beyond its inputs: the torch backend's blocks on a GPU."""
    return TORCH_SCAN_WORKSPACE_BYTES_CUDA if backend == "torch" and device_type == "cuda" else 0


def training_peak_bytes(batch: int, parameters: int, per_sample_bytes: int, workspace_bytes: int = 0,
                        distributed: bool = False) -> int:
    """Predicted device memory of a training step of ``batch`` samples: training state, scan workspace, activations."""
    return training_state_bytes(parameters, distributed) + workspace_bytes + batch * per_sample_bytes


def fitting_batch_size(free_bytes: int, parameters: int, per_sample_bytes: int, workspace_bytes: int = 0,
                       distributed: bool = False) -> int:
    """Samples that fit in USABLE_FRACTION of ``free_bytes`` next to the training state (0 if not even one)."""
    fixed = training_peak_bytes(0, parameters, per_sample_bytes, workspace_bytes, distributed)
    return max(0, int((USABLE_FRACTION * free_bytes - fixed) // per_sample_bytes))


@dataclass(frozen=True)
class BatchSizeChoice:
    """The batch a CIPA trainer uses, and why (one line for nnU-Net's training log)."""

    planned: int
    chosen: int
    reason: str
    per_sample_bytes: int | None = None

    def log_line(self) -> str:
        return f"CIPA batch size: planned {self.planned}, using {self.chosen} ({self.reason})"


def batch_size_override() -> int | None:
    """The batch size forced by env nnUNet_CIPA_batch_size, or None; ValueError unless a positive integer."""
    value = os.environ.get(BATCH_SIZE_ENV_VAR, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{BATCH_SIZE_ENV_VAR}={value!r}: expected a positive integer")
    return int(value)


def choose_batch_size(planned: int, device: torch.device, preset: str, patch_size, parameters: int,
                      backend: str | None, dtype, checkpointing: bool, min_batch: int = 1,
                      free_bytes: int | None = None, device_name: str | None = None,
                      distributed: bool = False) -> BatchSizeChoice:
    """The batch size for training CIPA ``preset`` on ``device``: env override, else the planned batch on a CPU,
    else min(planned, what fits in the free GPU memory), at least ``min_batch`` (the network's smallest trainable
    batch). ``free_bytes``/``device_name`` default to torch.cuda.mem_get_info / get_device_name (tests pass them);
    ``distributed``: one process of a DDP training; ``backend``: None for a network without scans."""
    override = batch_size_override()
    if override is not None:
        return BatchSizeChoice(planned, override, f"set by {BATCH_SIZE_ENV_VAR}")
    if device.type != "cuda":
        return BatchSizeChoice(planned, planned, f"{device.type} device: the planned batch size")
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    if device_name is None:
        device_name = torch.cuda.get_device_name(device)
    per_sample = activation_bytes_per_sample(preset, patch_size, backend, dtype, checkpointing)
    workspace = scan_workspace_bytes(backend, device.type)
    fits = fitting_batch_size(free_bytes, parameters, per_sample, workspace, distributed)
    chosen = max(min_batch, min(planned, fits))
    width = "16-bit" if activation_bytes(dtype) == 2 else "float32"
    reason = (f"{free_bytes / GIB:.1f} GiB free on {device_name}; memory model for CIPA-{preset} at "
              f"{'x'.join(str(int(s)) for s in patch_size)}, {_scans_text(backend)}, {width} activations"
              f"{', activation checkpointing' if checkpointing else ''}: {per_sample / GIB:.2f} GiB per sample + "
              f"{training_peak_bytes(0, parameters, per_sample, workspace, distributed) / GIB:.2f} GiB "
              f"weights/gradients/AdamW{'/DDP buckets' if distributed else ''}"
              f"{'/scan workspace' if workspace else ''}, {USABLE_FRACTION:.0%} of the free memory usable -> "
              f"{fits} fit")
    if fits < chosen:
        reason += ("; even one sample may not fit: enable activation checkpointing (nnUNetTrainerCIPA_checkpointing "
                   "or nnUNet_CIPA_checkpointing=1), or free GPU memory")
    return BatchSizeChoice(planned, chosen, reason, per_sample)
