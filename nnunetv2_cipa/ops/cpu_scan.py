"""The ``cpu`` backend: torch autograd around the numba kernels (``numba_kernels``), and the layout changes between
the operators' tensors and the kernels' (channels innermost, channels zero-padded to a multiple of LANES).
Imported lazily by the backend table (ImportError when numba is missing).
"""

from __future__ import annotations

import functools

import numba
import torch
import torch.nn.functional as F

from nnunetv2_cipa.ops.cpu_threads import apply_cpu_thread_policy
from nnunetv2_cipa.ops.numba_kernels import CHUNK, LANES, backward_kernel, delta_kernel, forward_kernel, \
    softplus_grad_kernel

MAX_BACKWARD_LANES = 768  # widest backward channel block (wider blocks leave the caches)


def _use_threads(torch_threads: int) -> None:
    """Use as many numba threads as torch uses (OMP_NUM_THREADS / torch.set_num_threads), so the two never
    oversubscribe the cores; numba's default is every core regardless. The count is read in forward, because
    autograd's backward reports its own pool size. The first call applies the CPU thread policy (cpu_threads) and
    starts numba's threading layer, whose OpenMP launch sets the shared pool to NUMBA_NUM_THREADS threads: torch's
    own count is put back."""
    apply_cpu_thread_policy()
    numba.set_num_threads(max(1, min(numba.config.NUMBA_NUM_THREADS, torch_threads)))
    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)


def _backward_splits(dim: int, items: int) -> int:
    """Channel blocks per work item in backward: the fewest (widest, at most MAX_BACKWARD_LANES channels; a block is
    a multiple of LANES) that spread the work items evenly over the threads, i.e. that minimise
    ceil(items * splits / threads) / splits."""
    blocks, threads = dim // LANES, numba.get_num_threads()
    splits = [s for s in range(1, blocks + 1) if blocks % s == 0 and dim // s <= MAX_BACKWARD_LANES]
    return min(splits, key=lambda s: (-(-items * s // threads) / s, s))


class NumbaScan(torch.autograd.Function):
    """The kernels on CPU tensors in kernel layout (see numba_kernels; float32 or float64):
    u (b, L, Du), raw delta (K, b, L, d), A_t (K, N, d), delta_bias (K, d), B, C (b, L, K, N), positions (K, L)
    int64 -> y (b, L, Du), with delta = softplus(raw + bias) (or raw + bias). Saved for backward: delta in place of
    the raw input (softplus' derivative is computed from it), the other inputs and the chunk-start states
    (b, K, L / CHUNK, N, d)."""

    @staticmethod
    def forward(ctx, u, delta_raw, A_t, delta_bias, B, C, positions, u_stride: int, softplus: bool):
        batch, length = u.shape[:2]
        n_dirs, n_state, dim = A_t.shape
        ctx.torch_threads = torch.get_num_threads()
        _use_threads(ctx.torch_threads)
        # C-contiguous: the kernels read these arrays row by row (B, C included: copying them beats strided reads)
        u, delta_raw, A_t, delta_bias, B, C = (t.detach().contiguous() for t in (u, delta_raw, A_t, delta_bias, B, C))
        delta = _delta(delta_raw, delta_bias, softplus)
        y = torch.empty_like(u)
        starts = u.new_empty(batch, n_dirs, -(-length // CHUNK), n_state, dim)
        forward_kernel(u.numpy(), delta.numpy(), A_t.numpy(), B.numpy(), C.numpy(), positions.numpy(), u_stride,
                        y.numpy(), starts.numpy())
        ctx.save_for_backward(u, delta, A_t, B, C, positions, starts)
        ctx.u_stride, ctx.softplus = u_stride, softplus
        return y

    @staticmethod
    def backward(ctx, gy):
        u, delta, A_t, B, C, positions, starts = ctx.saved_tensors
        batch, length = u.shape[:2]
        n_dirs, n_state, dim = A_t.shape
        _use_threads(ctx.torch_threads)
        splits = _backward_splits(dim, batch * (1 if ctx.u_stride == 0 else n_dirs))
        gy = gy.detach().contiguous()
        gu, gdelta = torch.empty_like(u), torch.empty_like(delta)
        gA = u.new_empty(batch, n_dirs, n_state, dim)
        gB, gC = (u.new_empty(splits, batch, length, n_dirs, n_state) for _ in range(2))
        backward_kernel(u.numpy(), delta.numpy(), A_t.numpy(), B.numpy(), C.numpy(), positions.numpy(), ctx.u_stride,
                         starts.numpy(), gy.numpy(), gu.numpy(), gdelta.numpy(), gA.numpy(), gB.numpy(), gC.numpy())
        if ctx.softplus:
            softplus_grad_kernel(delta.view(n_dirs, -1, dim).numpy(), gdelta.view(n_dirs, -1, dim).numpy())
        return (gu, gdelta, gA.sum(0), gdelta.sum((1, 2)), gB.sum(0), gC.sum(0), None, None, None)


def _delta(raw: torch.Tensor, bias: torch.Tensor, softplus: bool) -> torch.Tensor:
    """softplus(raw + bias) (or raw + bias), raw (K, b, L, d), bias (K, d) -> (K, b, L, d)."""
    out = torch.empty_like(raw)
    n_dirs, dim = bias.shape
    delta_kernel(raw.view(n_dirs, -1, dim).numpy(), bias.numpy(), softplus, out.view(n_dirs, -1, dim).numpy())
    return out


def _pad_channels(t: torch.Tensor, padded: int) -> torch.Tensor:
    """Zero-pad the last axis to ``padded`` entries (no copy when it already has them)."""
    return t if t.shape[-1] == padded else F.pad(t, (0, padded - t.shape[-1]))


@functools.lru_cache(maxsize=32)
@torch.inference_mode(False)  # cached for training too: never an inference tensor
def _plain_positions(groups: int, length: int) -> torch.Tensor:
    """(groups, L) int64, every row 0..L-1."""
    return torch.arange(length).expand(groups, length).contiguous()


def cpu_selective_scan(u, delta, A, B, C, delta_bias, delta_softplus):
    """Bare grouped scan y_t = <C_t, h_t> with bias + softplus fused: u, delta (b, d, L) in any memory layout,
    A (d, N), B, C (b, G, N, L), delta_bias (d,) or None -> y (b, d, L), a view of channels-innermost memory."""
    batch, dim, length = u.shape
    groups = B.shape[1]
    per_group = dim // groups
    padded = -(-per_group // LANES) * LANES
    u_l = _pad_channels(u.transpose(1, 2).unflatten(2, (groups, per_group)), padded).flatten(2)  # (b, L, G*P)
    delta_k = _pad_channels(delta.unflatten(1, (groups, per_group)).permute(1, 0, 3, 2), padded)  # (G, b, L, P)
    A_t = _pad_channels(A.view(groups, per_group, -1).transpose(1, 2), padded)  # (G, N, P)
    bias = delta.new_zeros(dim) if delta_bias is None else delta_bias
    bias = _pad_channels(bias.view(groups, per_group), padded)
    y = NumbaScan.apply(u_l, delta_k, A_t, bias, B.permute(0, 3, 1, 2), C.permute(0, 3, 1, 2),
                        _plain_positions(groups, length), padded, bool(delta_softplus))
    return y.unflatten(2, (groups, padded))[..., :per_group].flatten(2).transpose(1, 2)


def cpu_directional_scan(u, delta, A, B, C, positions, delta_bias, delta_softplus):
    """Sum over K directions of the bare scan of u in the orders ``positions``: u (b, L, d), delta (K, b, L, d),
    A (K*d, N), B, C (b, L, K, N), positions (K, L), delta_bias (K*d,) or None -> (b, L, d)."""
    dim, n_dirs = u.shape[2], positions.shape[0]
    padded = -(-dim // LANES) * LANES
    A_t = _pad_channels(A.view(n_dirs, dim, -1).transpose(1, 2), padded)
    bias = delta.new_zeros(n_dirs * dim) if delta_bias is None else delta_bias
    y = NumbaScan.apply(_pad_channels(u, padded), _pad_channels(delta, padded), A_t,
                        _pad_channels(bias.view(n_dirs, dim), padded), B, C, positions.contiguous(), 0,
                        bool(delta_softplus))
    return y[..., :dim]
