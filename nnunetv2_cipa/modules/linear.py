"""Linear layers on channels-last features that run on oneDNN on x86 CPUs.

torch's float32 matmul on CPU calls MKL's sgemm; CIPA's linear layers (in/out projections, patch merging and
expansion, the CRM token embedding) run about 1.8x faster forward + backward as 1x1 convolutions over a
channels-last view, which oneDNN executes (measured on the 2-core AMD EPYC of docs/benchmarks.md with 2 threads;
the same speed with 1 thread). Parameters, state_dict and results (up to float rounding) are nn.Linear's.
``NNUNETV2_CIPA_CPU_LINEAR=blas`` selects torch's matmul, ``onednn`` the convolution; the default is ``onednn`` on
x86-64 CPUs with oneDNN and ``blas`` elsewhere (other CPUs, GPUs always use torch's matmul).
"""

from __future__ import annotations

import os
import platform

import torch
import torch.nn.functional as F
from torch import nn

_ENV_VAR = "NNUNETV2_CIPA_CPU_LINEAR"
_HAS_ONEDNN = torch.backends.mkldnn.is_available()  # read once: torch.compile cannot trace the call
_DEFAULT = "onednn" if _HAS_ONEDNN and platform.machine().lower() in ("x86_64", "amd64") else "blas"


def cpu_linear_backend() -> str:
    """``onednn`` or ``blas``: how :func:`linear` computes on CPU tensors (env NNUNETV2_CIPA_CPU_LINEAR)."""
    name = os.environ.get(_ENV_VAR, _DEFAULT).lower()
    if name not in ("onednn", "blas"):
        raise ValueError(f"{_ENV_VAR}={name!r}: choose 'onednn' or 'blas'")
    if name == "onednn" and not _HAS_ONEDNN:
        raise ValueError(f"{_ENV_VAR}=onednn, but this torch build has no oneDNN (mkldnn)")
    return name


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, (..., C_in) -> (..., C_out); on CPU with the ``onednn`` backend a 1x1 convolution over x viewed
    as a channels-last (1, C_in, M, 1) map, whose output is already (M, C_out) in memory."""
    if x.device.type != "cpu" or x.dim() < 2 or cpu_linear_backend() == "blas":
        return F.linear(x, weight, bias)
    lead, c_in = x.shape[:-1], x.shape[-1]
    y = F.conv2d(x.reshape(1, -1, 1, c_in).permute(0, 3, 1, 2), weight[:, :, None, None], bias)
    return y.permute(0, 2, 3, 1).reshape(*lead, weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` computed by :func:`linear` (same parameters and state_dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
