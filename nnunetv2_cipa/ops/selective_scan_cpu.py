"""Compiled CPU selective scan (numba), vectorised across channels, with the scan orders given as position lists.
Imported lazily by the operators (ImportError when numba is missing).

One kernel pair serves both operators:
- ``directional_scan`` (SS2D, SS1D): K directions scan the *same* channels-last map (b, L, d) in K orders
  (``positions[k, t]`` is the position that direction k visits at step t) and their outputs are summed in position
  order, so the cross-scan copies, the flips and the cross-merge never exist (``u_stride = 0``);
- ``selective_scan`` (the mamba-ssm style op, B/C grouped): group k reads its own channels
  [k * P, (k + 1) * P) of u in plain order (``u_stride = P``, ``positions[k] = 0..L-1``).

Kernel layouts: u, y, gy, gu (b, L, Du) channels innermost; delta, gdelta (K, b, L, d); A transposed to (K, N, d);
B, C (b, L, K, N). d is a multiple of LANES (the wrappers zero-pad). A forward work item scans LANES channels (one
SIMD register per state index), a backward work item a wider block, so the recurrences need no horizontal sums and
nothing of size (b, d, L, N) exists. Forward stores the state at every CHUNK-th step; backward recomputes one chunk
of states at a time into small cache-resident buffers and runs the adjoint recurrence over it. delta = softplus(raw +
bias) is formed by a separate elementwise kernel (inside the scan loops LLVM did not vectorise it) and kept for
backward in place of the raw input; softplus' derivative is sigmoid(x) = 1 - exp(-softplus(x)). The first call of each
dtype compiles (seconds); ``cache=True`` keeps the machine code on disk.
In float32 the kernels use a polynomial exp and softplus that LLVM vectorises (pip's llvmlite has no SVML, so np.exp
runs scalar): exp within 1.1e-7 relative on [-1, 1] and 6e-8 absolute on the decays (x <= 0; at most 1.2e-38 below
float32's normal range), softplus within 7e-7 relative on [-10, 10]; float64 keeps np.exp / np.log1p / np.expm1.
``error_model="numpy"``: Python's zero-division check would keep the divisions (softplus, sigmoid) scalar. Rows are
read and written through 1-D slices (``delta[k, b, p, d0:d0 + LANES]``): indexed element by element with a run-time
position p, numba's negative-index wraparound kept the per-step lane loops scalar.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
import torch
import torch.nn.functional as F
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

_LOG2E = np.float32(1.4426950408889634)
# 2**f on [-0.5, 0.5], degree 6, fitted for minimal relative error (1.9e-9; 1.0e-7 when evaluated in float32)
_C0, _C1, _C2, _C3, _C4, _C5, _C6 = (np.float32(c) for c in (
    1.0000000005535803, 0.693147205707945, 0.24022646892260208, 0.05550328837559937, 0.009618489030761276,
    0.0013399907668161098, 0.00015345731389521458))
# 1 / (2i + 1): atanh(z) = z * sum_i z**(2i) / (2i + 1), truncated after z**12 (error < 2e-9 for z <= 1/3)
_A1, _A2, _A3, _A4, _A5, _A6 = (np.float32(1.0 / (2 * i + 1)) for i in range(1, 7))


@intrinsic
def _float32_from_bits(typingctx, bits):
    """Reinterpret int32 bits as float32 (an LLVM bitcast, which vectorises)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def _bits_of_float32(typingctx, value):
    """Reinterpret float32 as int32 bits (an LLVM bitcast)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


def _exp(x):
    """exp inside the kernels: a vectorisable polynomial exp for float32, np.exp otherwise."""
    return np.exp(x)


@overload(_exp, inline="always", jit_options={"fastmath": True})
def _exp_overload(x):
    if x != types.float32:
        return lambda x: np.exp(x)

    def exp_float32(x):  # 2**y = 2**k * 2**f, k = rint(y): k is added to the exponent bits of 2**f
        y = max(min(x * _LOG2E, np.float32(127.0)), np.float32(-126.0))  # below -126: about 1e-38, not 0
        k = np.rint(y)
        f = y - k
        p = _C0 + f * (_C1 + f * (_C2 + f * (_C3 + f * (_C4 + f * (_C5 + f * _C6)))))
        return _float32_from_bits(_bits_of_float32(p) + (np.int32(k) << 23))

    return exp_float32


def _softplus(x):
    """softplus inside the kernels: log(1 + exp(x)), vectorisable for float32."""
    return np.log1p(np.exp(x))


@overload(_softplus, inline="always", jit_options={"fastmath": True, "error_model": "numpy"})
def _softplus_overload(x):
    if x != types.float32:
        return lambda x: max(x, 0.0) + np.log1p(np.exp(-abs(x)))

    def softplus_float32(x):  # max(x, 0) + log1p(t), t = exp(-|x|) in (0, 1]; log1p(t) = 2 atanh(t / (2 + t))
        t = _exp(-abs(x))
        z = t / (np.float32(2.0) + t)
        w = z * z
        atanh = z * (np.float32(1.0) + w * (_A1 + w * (_A2 + w * (_A3 + w * (_A4 + w * (_A5 + w * _A6))))))
        return max(x, np.float32(0.0)) + np.float32(2.0) * atanh

    return softplus_float32


LANES = 16  # channels scanned together: one float32 AVX-512 register (two AVX2 registers)
CHUNK = 32  # steps between stored states; backward recomputes one chunk at a time (16 / 32 / 64: within 7%)
MAX_BACKWARD_LANES = 768  # widest backward block: wider ones are 1.3x faster up to here, slower beyond (cache)


@numba.njit(parallel=True, cache=True, fastmath=True, error_model="numpy")
def _forward_kernel(u, delta, At, B, C, positions, u_stride, y, starts):  # pragma: no cover - compiled
    """y[b, p, k*u_stride + c] (+)= <C, h> of direction k at its step t with p = positions[k, t]; with u_stride 0
    one work item runs all K directions in turn and sums them into y. starts (b, K, n_chunks, N, d) receives the
    state at every CHUNK-th step."""
    batch, length = u.shape[0], u.shape[1]
    n_dirs, n_state, dim = At.shape
    n_blocks = dim // LANES
    k_items = 1 if u_stride == 0 else n_dirs
    per_item = n_dirs // k_items
    for item in numba.prange(batch * k_items * n_blocks):
        b, kk, d0 = item // (k_items * n_blocks), (item // n_blocks) % k_items, (item % n_blocks) * LANES
        h = np.empty((n_state, LANES), dtype=u.dtype)
        a = np.empty((n_state, LANES), dtype=u.dtype)
        duv = np.empty(LANES, dtype=u.dtype)
        acc = np.empty(LANES, dtype=u.dtype)
        for k in range(kk * per_item, (kk + 1) * per_item):
            uc = k * u_stride + d0
            first = k == kk * per_item
            for n in range(n_state):
                a_src = At[k, n, d0:d0 + LANES]
                for c in range(LANES):
                    a[n, c] = a_src[c]
                    h[n, c] = 0.0
            for t in range(length):
                p = positions[k, t]
                if t % CHUNK == 0:
                    for n in range(n_state):
                        dst = starts[b, k, t // CHUNK, n, d0:d0 + LANES]
                        for c in range(LANES):
                            dst[c] = h[n, c]
                dtv = delta[k, b, p, d0:d0 + LANES]
                uv = u[b, p, uc:uc + LANES]
                for c in range(LANES):
                    duv[c] = dtv[c] * uv[c]
                    acc[c] = 0.0
                for n in range(n_state):
                    bn = B[b, p, k, n]
                    cn = C[b, p, k, n]
                    a_n, h_n = a[n], h[n]
                    for c in range(LANES):
                        h_n[c] = _exp(dtv[c] * a_n[c]) * h_n[c] + duv[c] * bn
                        acc[c] += h_n[c] * cn
                yv = y[b, p, uc:uc + LANES]
                if first:
                    for c in range(LANES):
                        yv[c] = acc[c]
                else:
                    for c in range(LANES):
                        yv[c] += acc[c]


@numba.njit(parallel=True, cache=True, fastmath=True, error_model="numpy")
def _backward_kernel(u, delta, At, B, C, positions, u_stride, starts, gy, gu, gdelta, gA, gB, gC):  # pragma: no cover
    """Work item (b, directions, s) owns the s-th of splits = gB.shape[0] channel blocks; per direction and chunk
    (last first) it recomputes the chunk's states from starts, then runs lam_t = exp(delta_{t+1} A) lam_{t+1} +
    gy_t C_t backwards. gB, gC (splits, b, L, K, N) and gdelta are written once per cell; gu (b, L, Du) is summed over
    the directions of the item; gA (b, K, N, d) per batch element. The block is a run-time number
    of channels on purpose: a constant 16-trip loop is fully unrolled before LLVM's loop vectoriser sees it, and the
    unrolled body is not vectorised (measured 1.6x slower); wide blocks amortise the per-loop set-up and sum gB, gC
    inside the vectorised loop."""
    batch, length = u.shape[0], u.shape[1]
    n_dirs, n_state, dim = At.shape
    splits = gB.shape[0]
    lanes = dim // splits
    n_chunks = starts.shape[2]
    k_items = 1 if u_stride == 0 else n_dirs
    per_item = n_dirs // k_items
    for item in numba.prange(batch * k_items * splits):
        b, kk, s = item // (k_items * splits), (item // splits) % k_items, item % splits
        d0 = s * lanes
        lam = np.empty((n_state, lanes), dtype=u.dtype)
        ga = np.empty((n_state, lanes), dtype=u.dtype)
        states = np.empty((CHUNK + 1, n_state, lanes), dtype=u.dtype)
        decays = np.empty((CHUNK, n_state, lanes), dtype=u.dtype)
        a = np.empty((n_state, lanes), dtype=u.dtype)
        duv = np.empty(lanes, dtype=u.dtype)
        lam_b = np.empty(lanes, dtype=u.dtype)
        g_dt = np.empty(lanes, dtype=u.dtype)
        zero = np.zeros(1, dtype=u.dtype)
        for k in range(kk * per_item, (kk + 1) * per_item):
            uc = k * u_stride + d0
            first = k == kk * per_item
            for n in range(n_state):
                a_src = At[k, n, d0:d0 + lanes]
                for c in range(lanes):
                    a[n, c] = a_src[c]
                    lam[n, c] = 0.0
                    ga[n, c] = 0.0
            for ci in range(n_chunks - 1, -1, -1):
                t0, t1 = ci * CHUNK, min((ci + 1) * CHUNK, length)
                for n in range(n_state):
                    src = starts[b, k, ci, n, d0:d0 + lanes]
                    for c in range(lanes):
                        states[0, n, c] = src[c]
                for t in range(t0, t1):
                    j, p = t - t0, positions[k, t]
                    dtv = delta[k, b, p, d0:d0 + lanes]
                    uv = u[b, p, uc:uc + lanes]
                    for c in range(lanes):
                        duv[c] = dtv[c] * uv[c]
                    for n in range(n_state):
                        bn = B[b, p, k, n]
                        a_n, dec, s_prev, s_next = a[n], decays[j, n], states[j, n], states[j + 1, n]
                        for c in range(lanes):
                            dec[c] = _exp(dtv[c] * a_n[c])
                            s_next[c] = dec[c] * s_prev[c] + duv[c] * bn
                for t in range(t1 - 1, t0 - 1, -1):
                    j, p = t - t0, positions[k, t]
                    dtv = delta[k, b, p, d0:d0 + lanes]
                    uv = u[b, p, uc:uc + lanes]
                    gyv = gy[b, p, uc:uc + lanes]
                    for c in range(lanes):
                        duv[c] = dtv[c] * uv[c]
                        lam_b[c] = 0.0
                        g_dt[c] = 0.0
                    for n in range(n_state):
                        bn = B[b, p, k, n]
                        cn = C[b, p, k, n]
                        sum_b, sum_c = zero[0], zero[0]
                        lam_n_arr, ga_n, a_n = lam[n], ga[n], a[n]
                        s_next, s_prev, dec = states[j + 1, n], states[j, n], decays[j, n]
                        for c in range(lanes):
                            lam_n = lam_n_arr[c] + gyv[c] * cn
                            sum_c += gyv[c] * s_next[c]
                            sum_b += lam_n * duv[c]
                            lam_b[c] += lam_n * bn
                            grad_log_decay = lam_n * s_prev[c] * dec[c]
                            g_dt[c] += grad_log_decay * a_n[c]
                            ga_n[c] += grad_log_decay * dtv[c]
                            lam_n_arr[c] = lam_n * dec[c]
                        gB[s, b, p, k, n] = sum_b
                        gC[s, b, p, k, n] = sum_c
                    gdv = gdelta[k, b, p, d0:d0 + lanes]
                    guv = gu[b, p, uc:uc + lanes]
                    for c in range(lanes):
                        gdv[c] = g_dt[c] + lam_b[c] * uv[c]
                    if first:
                        for c in range(lanes):
                            guv[c] = lam_b[c] * dtv[c]
                    else:
                        for c in range(lanes):
                            guv[c] += lam_b[c] * dtv[c]
            for n in range(n_state):
                dst = gA[b, k, n, d0:d0 + lanes]
                for c in range(lanes):
                    dst[c] = ga[n, c]


@numba.njit(parallel=True, cache=True, fastmath=True, error_model="numpy")
def _delta_kernel(raw, bias, softplus, out):  # pragma: no cover - compiled
    """out = softplus(raw + bias) (or raw + bias) for raw, out (K, M, d), bias (K, d); a run-time trip count over the
    channels, so that LLVM's loop vectoriser handles softplus (the scan kernels' 16-lane loops are unrolled first)."""
    n_dirs, rows, dim = raw.shape
    for item in numba.prange(n_dirs * rows):
        k, m = item // rows, item % rows
        row, row_bias, row_out = raw[k, m], bias[k], out[k, m]
        if softplus:
            for c in range(dim):
                row_out[c] = _softplus(row[c] + row_bias[c])
        else:
            for c in range(dim):
                row_out[c] = row[c] + row_bias[c]


def _sigmoid_of_softplus(s):
    """sigmoid(x) from s = softplus(x) (s > 0): 1 - exp(-s), by its series below 0.1 (no cancellation)."""
    return -np.expm1(-s)


@overload(_sigmoid_of_softplus, inline="always", jit_options={"fastmath": True, "error_model": "numpy"})
def _sigmoid_of_softplus_overload(s):
    if s != types.float32:
        return lambda s: -np.expm1(-s)

    def sigmoid_float32(s):  # 1 - e^-s = s (1 - s/2 (1 - s/3 (1 - s/4 (1 - s/5 (1 - s/6))))), error < 2e-10 rel.
        one = np.float32(1.0)
        series = s * (one - s * np.float32(1 / 2) * (one - s * np.float32(1 / 3) * (
            one - s * np.float32(1 / 4) * (one - s * np.float32(1 / 5) * (one - s * np.float32(1 / 6))))))
        return series if s < np.float32(0.1) else one - _exp(-s)

    return sigmoid_float32


@numba.njit(parallel=True, cache=True, fastmath=True, error_model="numpy")
def _softplus_grad_kernel(delta, grad):  # pragma: no cover - compiled
    """grad *= sigmoid(raw + bias) in place, from delta = softplus(raw + bias) (the forward's output, so raw is
    neither kept nor recomputed); delta, grad (K, M, d)."""
    n_dirs, rows, dim = delta.shape
    for item in numba.prange(n_dirs * rows):
        k, m = item // rows, item % rows
        row, row_grad = delta[k, m], grad[k, m]
        for c in range(dim):
            row_grad[c] *= _sigmoid_of_softplus(row[c])


def _use_threads(torch_threads: int) -> None:
    """Use as many numba threads as torch uses (OMP_NUM_THREADS / torch.set_num_threads), so the two never
    oversubscribe the cores; numba's default is every core regardless. The count is read in forward, because
    autograd's backward reports its own pool size."""
    numba.set_num_threads(max(1, min(numba.config.NUMBA_NUM_THREADS, torch_threads)))


def _backward_splits(dim: int, items: int) -> int:
    """Channel blocks per work item in backward: the fewest (widest, at most MAX_BACKWARD_LANES channels; a block is
    a multiple of LANES) that spread the work items evenly over the threads, i.e. that minimise
    ceil(items * splits / threads) / splits."""
    blocks, threads = dim // LANES, numba.get_num_threads()
    splits = [s for s in range(1, blocks + 1) if blocks % s == 0 and dim // s <= MAX_BACKWARD_LANES]
    return min(splits, key=lambda s: (-(-items * s // threads) / s, s))


class NumbaScan(torch.autograd.Function):
    """The kernels on CPU tensors in kernel layout (see the module docstring; float32 or float64):
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
        # all C layout (for B, C the forward is 1.4x faster than with strided views)
        u, delta_raw, A_t, delta_bias, B, C = (t.detach().contiguous() for t in (u, delta_raw, A_t, delta_bias, B, C))
        delta = _delta(delta_raw, delta_bias, softplus)
        y = torch.empty_like(u)
        starts = u.new_empty(batch, n_dirs, -(-length // CHUNK), n_state, dim)
        _forward_kernel(u.numpy(), delta.numpy(), A_t.numpy(), B.numpy(), C.numpy(), positions.numpy(), u_stride,
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
        _backward_kernel(u.numpy(), delta.numpy(), A_t.numpy(), B.numpy(), C.numpy(), positions.numpy(), ctx.u_stride,
                         starts.numpy(), gy.numpy(), gu.numpy(), gdelta.numpy(), gA.numpy(), gB.numpy(), gC.numpy())
        if ctx.softplus:
            _softplus_grad_kernel(delta.view(n_dirs, -1, dim).numpy(), gdelta.view(n_dirs, -1, dim).numpy())
        return (gu, gdelta, gA.sum(0), gdelta.sum((1, 2)), gB.sum(0), gC.sum(0), None, None, None)


def _delta(raw: torch.Tensor, bias: torch.Tensor, softplus: bool) -> torch.Tensor:
    """softplus(raw + bias) (or raw + bias), raw (K, b, L, d), bias (K, d) -> (K, b, L, d)."""
    out = torch.empty_like(raw)
    n_dirs, dim = bias.shape
    _delta_kernel(raw.view(n_dirs, -1, dim).numpy(), bias.numpy(), softplus, out.view(n_dirs, -1, dim).numpy())
    return out


def _pad_channels(t: torch.Tensor, padded: int) -> torch.Tensor:
    """Zero-pad the last axis to ``padded`` entries (no copy when it already has them)."""
    return t if t.shape[-1] == padded else F.pad(t, (0, padded - t.shape[-1]))


@functools.lru_cache(maxsize=32)
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
