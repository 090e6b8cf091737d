"""The no-Mamba control's token mix as one autograd op that keeps little for backward.

    y[b, l, d] = u[b, l, d] * (D_sum[d] + sum_k softplus(delta[k, b, l, d] + bias[k, d]) * mixed[k, b, l, d]),
    mixed[k, b, l, d] = sum_n BC[b, l, k, n] * weight[k, d, n]

Shapes: u (B, L, D); delta (K, B, L, D) pre-bias; BC = B * C (B, L, K, N); weight (K, D, N); D_sum (D,) (the
directions' D summed); bias (K, D). Written with autograd's own ops, backward keeps three (K, B, L, D) tensors per
call (softplus's input, its output and ``mixed``), the largest activations of a no-Mamba CIPA; this op keeps the
pre-bias ``delta`` and the (B, L, D) gain, recomputes the rest in backward, and works one direction at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


class MemorylessMix(torch.autograd.Function):
    """The module docstring's y, one direction at a time (transients of (B, L, D)); backward recomputes softplus
    and the mixed B*C from delta and B*C."""

    @staticmethod
    def forward(ctx, u, delta, bc, weight, d_sum, bias):
        with torch.autocast(u.device.type, enabled=False):
            gain = d_sum.expand_as(u).clone()  # (B, L, D)
            for k in range(delta.shape[0]):
                mixed = torch.einsum("bln,dn->bld", bc[:, :, k], weight[k])
                gain.addcmul_(F.softplus(delta[k] + bias[k]), mixed)
            ctx.save_for_backward(u, delta, bc, weight, bias, gain)
            return u * gain

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        u, delta, bc, weight, bias, gain = ctx.saved_tensors
        with torch.autocast(u.device.type, enabled=False):  # backward may be called under autocast
            grad = grad.to(u.dtype)
            grad_gain = grad * u  # (B, L, D)
            grad_delta, grad_bc, grad_weight = torch.empty_like(delta), torch.empty_like(bc), torch.empty_like(weight)
            for k in range(delta.shape[0]):
                pre = delta[k] + bias[k]
                grad_mixed = F.softplus(pre).mul_(grad_gain)
                mixed = torch.einsum("bln,dn->bld", bc[:, :, k], weight[k])
                torch.mul(pre.sigmoid_().mul_(mixed), grad_gain, out=grad_delta[k])  # softplus' = sigmoid
                grad_bc[:, :, k] = torch.einsum("bld,dn->bln", grad_mixed, weight[k])
                grad_weight[k] = torch.einsum("bld,bln->dn", grad_mixed, bc[:, :, k])
            return grad * gain, grad_delta, grad_bc, grad_weight, grad_gain.sum((0, 1)), grad_delta.sum((1, 2))


def memoryless_mix(u: torch.Tensor, delta: torch.Tensor, bc: torch.Tensor, weight: torch.Tensor,
                   d_sum: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """y (B, L, D) of the module docstring, in the inputs' one dtype (float32 or float64), whatever the autocast
    state."""
    inputs = (u, delta, bc, weight, d_sum, bias)
    if len({t.dtype for t in inputs}) != 1:
        raise TypeError(f"memoryless_mix: the inputs must share one dtype, got {[t.dtype for t in inputs]}")
    return MemorylessMix.apply(*inputs)
