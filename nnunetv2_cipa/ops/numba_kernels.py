"""The compiled CPU selective scan (numba): forward, backward, and the elementwise delta passes around them.

Scan orders are position lists: direction k visits position ``positions[k, t]`` at step t. One kernel pair serves
both operators through the channel stride ``u_stride``:
- 0 (``directional_scan``: SS2D, SS1D): the K directions scan the *same* channels-last map (b, L, d) in K orders and
  their outputs are summed in position order, so cross-scan copies, flips and the cross-merge never exist;
- P (``selective_scan``, B/C grouped): group k reads its own channels [k * P, (k + 1) * P) of u in plain order
  (``positions[k] = 0..L-1``).

Layouts: u, y, gy, gu (b, L, Du) channels innermost; delta, gdelta (K, b, L, d); A transposed to (K, N, d);
B, C (b, L, K, N); all C-contiguous, d a multiple of LANES (the callers zero-pad). A forward work item scans LANES
channels of one direction (one SIMD register per state index), a backward work item a wider block, so the recurrences
need no horizontal sums and nothing of size (b, d, L, N) exists. Forward stores the state at every CHUNK-th step;
backward recomputes one chunk of states at a time into small cache-resident buffers and runs the adjoint recurrence
over it. delta = softplus(raw + bias) is formed by a separate elementwise kernel (inside the scan loops LLVM does not
vectorise it) and kept for backward, where softplus' derivative is taken from it: sigmoid(x) = 1 - exp(-softplus(x)).
Rows are read and written through 1-D slices (``delta[k, b, p, d0:d0 + LANES]``), which lets LLVM vectorise the
per-step lane loops (element indexing with a run-time position p goes through numba's negative-index wraparound).
The first call per dtype compiles (seconds); ``cache=True`` keeps the machine code on disk. Design measurements:
docs/benchmarks.md, "Selective scan".
"""

from __future__ import annotations

import numba
import numpy as np

from nnunetv2_cipa.ops.numba_math import exp, sigmoid_of_softplus, softplus

LANES = 16  # channels scanned together: one float32 AVX-512 register (two AVX2 registers)
CHUNK = 32  # steps between stored states; backward recomputes one chunk at a time


@numba.njit(parallel=True, cache=True, fastmath=True, error_model="numpy")
def forward_kernel(u, delta, At, B, C, positions, u_stride, y, starts):  # pragma: no cover - compiled
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
                        h_n[c] = exp(dtv[c] * a_n[c]) * h_n[c] + duv[c] * bn
                        acc[c] += h_n[c] * cn
                yv = y[b, p, uc:uc + LANES]
                if first:
                    for c in range(LANES):
                        yv[c] = acc[c]
                else:
                    for c in range(LANES):
                        yv[c] += acc[c]


@numba.njit(parallel=True, cache=True, fastmath=True, error_model="numpy")
def backward_kernel(u, delta, At, B, C, positions, u_stride, starts, gy, gu, gdelta, gA, gB, gC):  # pragma: no cover
    """Work item (b, directions, s) owns the s-th of splits = gB.shape[0] channel blocks; per direction and chunk
    (last first) it recomputes the chunk's states from starts, then runs lam_t = exp(delta_{t+1} A) lam_{t+1} +
    gy_t C_t backwards. gB, gC (splits, b, L, K, N) and gdelta are written once per cell; gu (b, L, Du) is summed over
    the directions of the item; gA (b, K, N, d) per batch element. The block width is a run-time number of
    channels, so that LLVM's loop vectoriser handles the lane loops (a constant 16-trip loop is fully unrolled first
    and then stays scalar); wide blocks amortise the per-loop set-up and sum gB, gC inside the vectorised loop."""
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
                            dec[c] = exp(dtv[c] * a_n[c])
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
def delta_kernel(raw, bias, with_softplus, out):  # pragma: no cover - compiled
    """out = softplus(raw + bias), or raw + bias, for raw, out (K, M, d), bias (K, d); a run-time trip count over the
    channels, so that LLVM's loop vectoriser handles softplus (the scan kernels' 16-lane loops are unrolled first)."""
    n_dirs, rows, dim = raw.shape
    for item in numba.prange(n_dirs * rows):
        k, m = item // rows, item % rows
        row, row_bias, row_out = raw[k, m], bias[k], out[k, m]
        if with_softplus:
            for c in range(dim):
                row_out[c] = softplus(row[c] + row_bias[c])
        else:
            for c in range(dim):
                row_out[c] = row[c] + row_bias[c]


@numba.njit(parallel=True, cache=True, fastmath=True, error_model="numpy")
def softplus_grad_kernel(delta, grad):  # pragma: no cover - compiled
    """grad *= sigmoid(raw + bias) in place, from delta = softplus(raw + bias) (the forward's output, so raw is
    neither kept nor recomputed); delta, grad (K, M, d)."""
    n_dirs, rows, dim = delta.shape
    for item in numba.prange(n_dirs * rows):
        k, m = item // rows, item % rows
        row, row_grad = delta[k, m], grad[k, m]
        for c in range(dim):
            row_grad[c] *= sigmoid_of_softplus(row[c])
