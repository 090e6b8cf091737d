"""Compiled CPU selective scan (numba), vectorised across channels: a forward work item scans LANES = 16 channels of
one group at once (one SIMD register per state index), a backward work item a wider block of the group, so the
recurrences need no horizontal sums, and nothing of size (b, d, L, N) exists anywhere. Imported lazily by
``selective_scan`` (ImportError when numba is missing).

Kernel layouts ("lanes-last"): u, delta, y, gy, gu, gdelta (b, L, G*P) with the channels innermost, P = channels per
group padded to a multiple of LANES; A transposed to (N, G*P); B, C (b, G, N, L) as the caller gives them. An input
whose memory already is (b, L, d) (``u.transpose(1, 2).is_contiguous()``, as SS2D produces it) is used without a copy,
and y is returned as a (b, d, L) view of (b, L, d) memory. Forward stores the state at every CHUNK-th step; backward
recomputes one chunk of states at a time into small cache-resident buffers and runs the adjoint recurrence over it.
The first call of each dtype compiles (a few seconds); ``cache=True`` keeps the machine code on disk for later runs.
In float32 the kernels use a polynomial exp that LLVM vectorises (pip's llvmlite has no SVML, so np.exp runs scalar):
decays exp(x <= 0) within 2e-7 absolute (about 2 float32 ulps); float64 keeps np.exp.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

_LOG2E = np.float32(1.4426950408889634)
# Taylor coefficients of 2**f = exp(f ln 2) for f in [-0.5, 0.5] (truncation error 1.2e-7 relative)
_C0, _C1, _C2, _C3, _C4, _C5, _C6 = (np.float32(math.log(2.0) ** i / math.factorial(i)) for i in range(7))


@intrinsic
def _float32_from_bits(typingctx, bits):
    """Reinterpret int32 bits as float32 (an LLVM bitcast, which vectorises)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


def _exp(x):
    """exp inside the kernels: a vectorisable polynomial exp for float32, np.exp otherwise."""
    return np.exp(x)


@overload(_exp, inline="always", jit_options={"fastmath": True})
def _exp_overload(x):
    if x != types.float32:
        return lambda x: np.exp(x)

    def exp_float32(x):  # 2**y = 2**k * 2**f with k = round(y); 2**k built from its exponent bits
        y = min(x * _LOG2E, np.float32(127.0))
        k = max(np.floor(y + np.float32(0.5)), np.float32(-126.0))  # np.floor keeps float32; math.floor gave an int
        f = y - k
        p = _C0 + f * (_C1 + f * (_C2 + f * (_C3 + f * (_C4 + f * (_C5 + f * _C6)))))
        value = p * _float32_from_bits(np.int32(k + np.float32(127.0)) << 23)
        return value if y >= np.float32(-126.0) else np.float32(0.0)  # below float32's normal range: flush to 0

    return exp_float32


LANES = 16  # channels scanned together: one float32 AVX-512 register (two AVX2 registers)
CHUNK = 32  # steps between stored states; backward recomputes one chunk at a time (16 / 32 / 64: within 7%)


@numba.njit(parallel=True, cache=True, fastmath=True)
def _forward_kernel(u, delta, At, B, C, y, starts):  # pragma: no cover - compiled
    """y_t = <C_t, h_t> for LANES channels per work item; starts (b, n_chunks, N, G*P) receives h at each chunk start."""
    batch, length, dim = u.shape
    groups, n_state = B.shape[1], B.shape[2]
    per_group = dim // groups
    n_blocks = dim // LANES
    for item in numba.prange(batch * n_blocks):
        b, d0 = item // n_blocks, (item % n_blocks) * LANES
        g = d0 // per_group
        h = np.zeros((n_state, LANES), dtype=u.dtype)
        a = np.empty((n_state, LANES), dtype=u.dtype)
        for n in range(n_state):
            for c in range(LANES):
                a[n, c] = At[n, d0 + c]
        dtv = np.empty(LANES, dtype=u.dtype)
        duv = np.empty(LANES, dtype=u.dtype)
        acc = np.empty(LANES, dtype=u.dtype)
        for t in range(length):
            if t % CHUNK == 0:
                for n in range(n_state):
                    for c in range(LANES):
                        starts[b, t // CHUNK, n, d0 + c] = h[n, c]
            for c in range(LANES):
                dtv[c] = delta[b, t, d0 + c]
                duv[c] = dtv[c] * u[b, t, d0 + c]
                acc[c] = 0.0
            for n in range(n_state):
                bn = B[b, g, n, t]
                cn = C[b, g, n, t]
                a_n, h_n = a[n], h[n]
                for c in range(LANES):
                    h_n[c] = _exp(dtv[c] * a_n[c]) * h_n[c] + duv[c] * bn
                    acc[c] += h_n[c] * cn
            for c in range(LANES):
                y[b, t, d0 + c] = acc[c]


@numba.njit(parallel=True, cache=True, fastmath=True)
def _backward_kernel(u, delta, At, B, C, starts, gy, gu, gdelta, gA, gB, gC):  # pragma: no cover - compiled
    """Work item (b, g, s) owns the s-th block of group g's channels, splits = gB.shape[0] blocks per group; it adds
    its share of gB, gC (splits, b, G, N, L) at [s, b, g] alone, so no two threads write one cell (gB, gC start at 0);
    gA (b, N, G*P) is per batch element. Per chunk (last first): recompute the chunk's states from starts, then run
    lam_t = exp(delta_{t+1} A) lam_{t+1} + gy_t C_t backwards; gB_t, gC_t are sums over the block's channels.
    The block is a run-time number of channels on purpose: a constant 16-trip loop is fully unrolled before LLVM's
    loop vectoriser sees it, and the unrolled body is not vectorised (measured 1.6x slower); wide blocks amortise the
    per-loop set-up (a whole group of 192 channels: 1.3x faster than 16-channel blocks)."""
    batch, length, dim = u.shape
    groups, n_state = B.shape[1], B.shape[2]
    per_group = dim // groups
    splits = gB.shape[0]
    lanes = per_group // splits
    n_chunks = starts.shape[1]
    for item in numba.prange(batch * groups * splits):
        b, rest = item // (groups * splits), item % (groups * splits)
        g, s = rest // splits, rest % splits
        d0 = g * per_group + s * lanes
        lam = np.zeros((n_state, lanes), dtype=u.dtype)
        ga = np.zeros((n_state, lanes), dtype=u.dtype)
        states = np.empty((CHUNK + 1, n_state, lanes), dtype=u.dtype)
        decays = np.empty((CHUNK, n_state, lanes), dtype=u.dtype)
        a = np.empty((n_state, lanes), dtype=u.dtype)
        dtv = np.empty(lanes, dtype=u.dtype)
        uv = np.empty(lanes, dtype=u.dtype)
        duv = np.empty(lanes, dtype=u.dtype)
        gyv = np.empty(lanes, dtype=u.dtype)
        lam_b = np.empty(lanes, dtype=u.dtype)
        g_dt = np.empty(lanes, dtype=u.dtype)
        zero = np.zeros(1, dtype=u.dtype)
        for n in range(n_state):
            for c in range(lanes):
                a[n, c] = At[n, d0 + c]
        for ci in range(n_chunks - 1, -1, -1):
            t0, t1 = ci * CHUNK, min((ci + 1) * CHUNK, length)
            for n in range(n_state):
                for c in range(lanes):
                    states[0, n, c] = starts[b, ci, n, d0 + c]
            for t in range(t0, t1):
                k = t - t0
                for c in range(lanes):
                    dtv[c] = delta[b, t, d0 + c]
                    duv[c] = dtv[c] * u[b, t, d0 + c]
                for n in range(n_state):
                    bn = B[b, g, n, t]
                    for c in range(lanes):
                        decays[k, n, c] = _exp(dtv[c] * a[n, c])
                        states[k + 1, n, c] = decays[k, n, c] * states[k, n, c] + duv[c] * bn
            for t in range(t1 - 1, t0 - 1, -1):
                k = t - t0
                for c in range(lanes):
                    dtv[c] = delta[b, t, d0 + c]
                    uv[c] = u[b, t, d0 + c]
                    duv[c] = dtv[c] * uv[c]
                    gyv[c] = gy[b, t, d0 + c]
                    lam_b[c] = 0.0
                    g_dt[c] = 0.0
                for n in range(n_state):
                    bn = B[b, g, n, t]
                    cn = C[b, g, n, t]
                    sum_b, sum_c = zero[0], zero[0]
                    for c in range(lanes):
                        lam_n = lam[n, c] + gyv[c] * cn
                        sum_c += gyv[c] * states[k + 1, n, c]
                        sum_b += lam_n * duv[c]
                        lam_b[c] += lam_n * bn
                        grad_log_decay = lam_n * states[k, n, c] * decays[k, n, c]
                        g_dt[c] += grad_log_decay * a[n, c]
                        ga[n, c] += grad_log_decay * dtv[c]
                        lam[n, c] = lam_n * decays[k, n, c]
                    gB[s, b, g, n, t] += sum_b
                    gC[s, b, g, n, t] += sum_c
                for c in range(lanes):
                    gu[b, t, d0 + c] = lam_b[c] * dtv[c]
                    gdelta[b, t, d0 + c] = g_dt[c] + lam_b[c] * uv[c]
        for n in range(n_state):
            for c in range(lanes):
                gA[b, n, d0 + c] = ga[n, c]


def _use_threads(torch_threads: int) -> None:
    """Use as many numba threads as torch uses (OMP_NUM_THREADS / torch.set_num_threads), so the two never
    oversubscribe the cores; numba's default is every core regardless. The count is read in forward, because
    autograd's backward reports its own pool size."""
    numba.set_num_threads(max(1, min(numba.config.NUMBA_NUM_THREADS, torch_threads)))


def _lanes_last(t: torch.Tensor, groups: int, padded: int) -> torch.Tensor:
    """(b, d, L) -> contiguous (b, L, groups * padded), each group's channels zero-padded to ``padded``; no copy when
    no padding is needed and t's memory already is (b, L, d)."""
    batch, dim, length = t.shape
    per_group = dim // groups
    if padded == per_group:
        return t.transpose(1, 2).contiguous()
    out = t.new_zeros(batch, length, groups, padded)
    out[..., :per_group] = t.view(batch, groups, per_group, length).permute(0, 3, 1, 2)
    return out.view(batch, length, groups * padded)


def _channels_first(t: torch.Tensor, groups: int, per_group: int) -> torch.Tensor:
    """Inverse of :func:`_lanes_last`, (b, L, groups * padded) -> (b, groups * per_group, L), a view of (b, L, d)
    memory (a copy drops the padding first)."""
    batch, length, dim_padded = t.shape
    if dim_padded != groups * per_group:
        t = t.view(batch, length, groups, -1)[..., :per_group].reshape(batch, length, groups * per_group)
    return t.transpose(1, 2)


class NumbaScan(torch.autograd.Function):
    """y_t = <C_t, h_t> of the bare recurrence on CPU tensors (float32 or float64); u, delta (b, d, L) in any memory
    layout, A (d, N), B, C (b, G, N, L) -> y (b, d, L), a view of (b, L, d) memory.
    Saved for backward: the lanes-last inputs and the chunk-start states (b, L / CHUNK, N, d)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        batch, dim, length = u.shape
        groups, n_state = B.shape[1], A.shape[1]
        per_group = dim // groups
        padded = -(-per_group // LANES) * LANES
        ctx.torch_threads = torch.get_num_threads()
        _use_threads(ctx.torch_threads)
        u_l, delta_l = _lanes_last(u.detach(), groups, padded), _lanes_last(delta.detach(), groups, padded)
        A_t = _lanes_last(A.detach().unsqueeze(0), groups, padded)[0]
        B, C = B.detach().contiguous(), C.detach().contiguous()
        y = torch.empty_like(u_l)
        starts = u_l.new_empty(batch, -(-length // CHUNK), n_state, groups * padded)
        _forward_kernel(u_l.numpy(), delta_l.numpy(), A_t.numpy(), B.numpy(), C.numpy(), y.numpy(), starts.numpy())
        ctx.save_for_backward(u_l, delta_l, A_t, B, C, starts)
        ctx.groups, ctx.per_group = groups, per_group
        return _channels_first(y, groups, per_group)

    @staticmethod
    def backward(ctx, gy):
        u_l, delta_l, A_t, B, C, starts = ctx.saved_tensors
        groups, per_group = ctx.groups, ctx.per_group
        batch = u_l.shape[0]
        _use_threads(ctx.torch_threads)
        padded = u_l.shape[2] // groups
        # fewest (widest) channel blocks per group that still give every thread >= 2 work items; a block is a
        # multiple of LANES channels
        blocks = padded // LANES
        splits = min(blocks, -(-2 * numba.get_num_threads() // (batch * groups)))
        while blocks % splits:
            splits += 1
        gy_l = _lanes_last(gy.detach(), groups, padded)
        gu, gdelta = torch.empty_like(u_l), torch.empty_like(u_l)
        gA = u_l.new_empty(batch, A_t.shape[0], u_l.shape[2])
        gB, gC = B.new_zeros(splits, *B.shape), C.new_zeros(splits, *C.shape)
        _backward_kernel(u_l.numpy(), delta_l.numpy(), A_t.numpy(), B.numpy(), C.numpy(), starts.numpy(),
                         gy_l.numpy(), gu.numpy(), gdelta.numpy(), gA.numpy(), gB.numpy(), gC.numpy())
        return (_channels_first(gu, groups, per_group), _channels_first(gdelta, groups, per_group),
                _channels_first(gA.sum(0, keepdim=True), groups, per_group)[0], gB.sum(0), gC.sum(0))
