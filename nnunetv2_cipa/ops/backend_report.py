"""The selective-scan backend situation on a device, as data for training logs and ``nnunetv2_cipa doctor``."""

from __future__ import annotations

import torch

from nnunetv2_cipa.ops import cuda_scan
from nnunetv2_cipa.ops.backends import BACKENDS, choose_backend
from nnunetv2_cipa.ops.kernel_probe import distribution_version


def scan_backend_report(device: torch.device | str | None = None) -> dict[str, str | None]:
    """What computes the scans on ``device`` (default: the current GPU if there is one, else the CPU); prints nothing.

    Keys: device; requested (auto or the NNUNETV2_CIPA_SCAN_BACKEND value); backend (the one in use there); torch;
    cuda (torch's CUDA version, None for a CPU build); mamba_ssm, triton (their versions or "not installed"); gpu (the
    device's name, None on a CPU); fused_kernel_problem (why mamba-ssm's fused kernel cannot run on this CUDA device,
    None when it can or on a CPU); fix (the command that repairs it, or None); triton_problem, triton_fix (why the
    Triton kernels, which take the fused kernel's place, cannot run either, and the command that repairs that; None
    when they can, when the fused kernel runs (they are not probed then) or on a CPU). Raises ValueError for a
    requested backend that cannot run there, as the scans would."""
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    choice = choose_backend(None, device)
    problem = BACKENDS["cuda"].problem(device) if device.type == "cuda" else None
    triton_problem = BACKENDS["triton"].problem(device) if problem is not None else None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" and torch.cuda.is_available() else None
    return {"device": str(device), "requested": choice.requested, "backend": choice.name, "torch": torch.__version__,
            "cuda": torch.version.cuda, "mamba_ssm": cuda_scan.mamba_ssm_version(),
            "triton": distribution_version("triton"), "gpu": gpu, "fused_kernel_problem": problem,
            "fix": None if problem is None else BACKENDS["cuda"].fix(), "triton_problem": triton_problem,
            "triton_fix": None if triton_problem is None else BACKENDS["triton"].fix()}
