"""Compiled CPU selective scan (numba): parallel over batch x channel, one channel's state at a time, no (b, d, L, N)
tensor anywhere. Imported lazily by ``selective_scan`` (ImportError when numba is missing).

Kernel layouts: u, delta, gy (b, d, L); A (d, N); B, C transposed to (b, G, L, N) so the state loop reads contiguously.
The first call of each dtype compiles (a few seconds); ``cache=True`` keeps the machine code on disk for later runs.
"""

from __future__ import annotations

import numba
import numpy as np
import torch


@numba.njit(parallel=True, cache=True, fastmath=True)
def _forward_kernel(u, delta, A, B, C, y):  # pragma: no cover - compiled
    batch, dim, length = u.shape
    per_group = dim // B.shape[1]
    n_state = A.shape[1]
    for i in numba.prange(batch * dim):
        b, d = i // dim, i % dim
        g = d // per_group
        h = np.zeros(n_state, dtype=u.dtype)
        for t in range(length):
            dt = delta[b, d, t]
            du = dt * u[b, d, t]
            acc = 0.0
            for n in range(n_state):
                h[n] = np.exp(dt * A[d, n]) * h[n] + du * B[b, g, t, n]
                acc += h[n] * C[b, g, t, n]
            y[b, d, t] = acc


@numba.njit(parallel=True, cache=True, fastmath=True)
def _backward_kernel(u, delta, A, B, C, gy, gu, gdelta, gA, gB, gC):  # pragma: no cover - compiled
    """Worker w handles a contiguous range of (b, d) channels: it recomputes the channel's states into its own (L, N)
    buffers, then runs the adjoint recurrence lam_t = exp(delta_{t+1} A) lam_{t+1} + gy_t C_t backwards. gA is per
    (b, d); gB, gC (workers, b, G, L, N) are per worker so that channels sharing a group never write the same cell."""
    batch, dim, length = u.shape
    per_group = dim // B.shape[1]
    n_state = A.shape[1]
    n_workers = gB.shape[0]
    per_worker = (batch * dim + n_workers - 1) // n_workers
    for w in numba.prange(n_workers):
        states = np.empty((length, n_state), dtype=u.dtype)
        decays = np.empty((length, n_state), dtype=u.dtype)
        lam = np.empty(n_state, dtype=u.dtype)
        for i in range(w * per_worker, min((w + 1) * per_worker, batch * dim)):
            b, d = i // dim, i % dim
            g = d // per_group
            for t in range(length):
                dt = delta[b, d, t]
                du = dt * u[b, d, t]
                for n in range(n_state):
                    decays[t, n] = np.exp(dt * A[d, n])
                    previous = states[t - 1, n] if t > 0 else 0.0
                    states[t, n] = decays[t, n] * previous + du * B[b, g, t, n]
            lam[:] = 0.0
            for t in range(length - 1, -1, -1):
                dt = delta[b, d, t]
                ut = u[b, d, t]
                du = dt * ut
                gyt = gy[b, d, t]
                grad_dt = 0.0
                lam_b = 0.0
                for n in range(n_state):
                    if t < length - 1:
                        lam[n] *= decays[t + 1, n]
                    lam[n] += gyt * C[b, g, t, n]
                    gC[w, b, g, t, n] += gyt * states[t, n]
                    gB[w, b, g, t, n] += lam[n] * du
                    lam_b += lam[n] * B[b, g, t, n]
                    previous = states[t - 1, n] if t > 0 else 0.0
                    grad_log_decay = lam[n] * previous * decays[t, n]
                    grad_dt += grad_log_decay * A[d, n]
                    gA[b, d, n] += grad_log_decay * dt
                gu[b, d, t] = lam_b * dt
                gdelta[b, d, t] = grad_dt + lam_b * ut


def _arrays(u, delta, A, B, C):
    """Contiguous numpy views; B, C (b, G, N, L) -> (b, G, L, N)."""
    return (u.detach().contiguous().numpy(), delta.detach().contiguous().numpy(), A.detach().contiguous().numpy(),
            B.detach().transpose(-1, -2).contiguous().numpy(), C.detach().transpose(-1, -2).contiguous().numpy())


def _use_threads(torch_threads: int) -> None:
    """Use as many numba threads as torch uses (OMP_NUM_THREADS / torch.set_num_threads), so the two never
    oversubscribe the cores; numba's default is every core regardless. The count is read in forward, because
    autograd's backward reports its own pool size."""
    numba.set_num_threads(max(1, min(numba.config.NUMBA_NUM_THREADS, torch_threads)))


class NumbaScan(torch.autograd.Function):
    """y_t = <C_t, h_t> of the bare recurrence on CPU tensors (float32 or float64); u, delta (b, d, L), A (d, N),
    B, C (b, G, N, L) -> (b, d, L). Backward recomputes the states per channel."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        ctx.save_for_backward(u, delta, A, B, C)
        y = torch.empty_like(u)
        ctx.torch_threads = torch.get_num_threads()
        _use_threads(ctx.torch_threads)
        _forward_kernel(*_arrays(u, delta, A, B, C), y.numpy())
        return y

    @staticmethod
    def backward(ctx, gy):
        u, delta, A, B, C = ctx.saved_tensors
        batch, dim, length = u.shape
        _use_threads(ctx.torch_threads)
        workers = max(1, min(numba.get_num_threads(), batch * dim))
        grouped_shape = (workers, batch, B.shape[1], length, A.shape[1])
        gu, gdelta = torch.empty_like(u), torch.empty_like(u)
        gA = u.new_zeros(batch, dim, A.shape[1])
        gB, gC = u.new_zeros(grouped_shape), u.new_zeros(grouped_shape)
        _backward_kernel(*_arrays(u, delta, A, B, C), gy.detach().contiguous().numpy(), gu.numpy(),
                         gdelta.numpy(), gA.numpy(), gB.numpy(), gC.numpy())
        return gu, gdelta, gA.sum(0), gB.sum(0).transpose(-1, -2), gC.sum(0).transpose(-1, -2)
