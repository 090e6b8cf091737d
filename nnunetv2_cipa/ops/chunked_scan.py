"""The ``torch`` backend: a chunked pure-PyTorch selective scan whose backward recomputes the states.

The sequence is cut into n_chunks chunks of ``chunk`` steps (chunk ~ sqrt(L)). A step loop runs over the position
inside the chunk for all chunks at once, a short loop over chunks carries the chunk-start states, and a second step
loop produces the outputs. Only exp(delta * A) of single steps or whole chunks is formed (never exp of a positive
cumulative sum), so large delta * |A| decays to 0 without overflow. Channels are processed in blocks, the same
channels of every group at once (a group axis), so that the (B, G, N, L) inputs are broadcast, never expanded per
channel, and memory stays bounded.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# State elements (batch * channels * L * N) per channel block: cache-sized on a CPU; large on a GPU, where every block
# costs about 3 sqrt(L) kernel launches forward and 6 sqrt(L) backward, at about 6 block-sized float32 tensors alive
# (1.5 GiB there).
_BLOCK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}


def _to_chunks(t: torch.Tensor, n_chunks: int, chunk: int) -> torch.Tensor:
    """(..., L) -> (chunk, ..., n_chunks), zero-padded at the end (zero delta: decay 1, no input)."""
    t = F.pad(t, (0, n_chunks * chunk - t.shape[-1]))
    return t.unflatten(-1, (n_chunks, chunk)).movedim(-1, 0).contiguous()


def _from_chunks(t: torch.Tensor, length: int) -> torch.Tensor:
    """(chunk, ..., n_chunks) -> (..., L)."""
    return t.movedim(0, -1).flatten(-2)[..., :length]


def _chunk_start_states(decay, inputs):
    """States entering each chunk, (..., n_chunks, N), from decay, inputs (chunk, ..., n_chunks, N)."""
    h = inputs[0]
    for t in range(1, decay.shape[0]):
        h = torch.addcmul(inputs[t], decay[t], h)
    chunk_decay = decay.prod(0)
    starts = torch.zeros_like(h)
    for k in range(1, h.shape[-2]):
        torch.addcmul(h[..., k - 1, :], chunk_decay[..., k - 1, :], starts[..., k - 1, :], out=starts[..., k, :])
    return starts, chunk_decay


def _all_states(decay, inputs):
    """Every state h_t, (chunk, ..., n_chunks, N), plus the chunk-start states and whole-chunk decays."""
    starts, chunk_decay = _chunk_start_states(decay, inputs)
    states = torch.empty_like(inputs)
    h = starts
    for t in range(decay.shape[0]):
        h = torch.addcmul(inputs[t], decay[t], h, out=states[t])
    return states, starts, chunk_decay


def _adjoint_states(decay, grad_inputs, chunk_decay):
    """lam_t = decay_{t+1} lam_{t+1} + grad_inputs_t for every step, (chunk, ..., n_chunks, N)."""
    chunk = decay.shape[0]
    lam = grad_inputs[-1]
    for t in range(chunk - 2, -1, -1):  # lam at each chunk's first step, ignoring later chunks
        lam = torch.addcmul(grad_inputs[t], decay[t + 1], lam)
    incoming = torch.zeros_like(lam)  # decay * lam carried into each chunk's last step from the next chunk
    for k in range(incoming.shape[-2] - 2, -1, -1):
        incoming[..., k, :] = (decay[0][..., k + 1, :] * lam[..., k + 1, :]
                               + chunk_decay[..., k + 1, :] * incoming[..., k + 1, :])
    lams = torch.empty_like(grad_inputs)
    lam = torch.add(grad_inputs[-1], incoming, out=lams[-1])
    for t in range(chunk - 2, -1, -1):
        lam = torch.addcmul(grad_inputs[t], decay[t + 1], lam, out=lams[t])
    return lams


def _chunked_blocks(u, delta, A, B, C, gy=None):
    """Run the chunked scan block by block; forward outputs y, or with ``gy`` the gradients (gu, gdelta, gA, gB, gC).
    All B/C groups run together (a group axis); a block takes the same channels of every group.

    u, delta, gy (b, d, L); A (d, N); B, C (b, G, N, L)."""
    batch, dim, length = u.shape
    groups, n_state = B.shape[1], A.shape[1]
    chunk = min(length, 1 << round(math.log2(length) / 2))
    n_chunks = -(-length // chunk)
    per_group = dim // groups
    budget = _BLOCK_ELEMENTS.get(u.device.type, _BLOCK_ELEMENTS["cpu"])
    block = max(1, min(per_group, budget // (batch * groups * n_chunks * chunk * n_state)))
    u, delta = (t.unflatten(1, (groups, per_group)) for t in (u, delta))  # (b, G, P, L)
    gy = None if gy is None else gy.unflatten(1, (groups, per_group))
    A = A.reshape(groups, per_group, 1, n_state)  # broadcasts against (chunk, b, G, c, n_chunks, N)
    Bc = _to_chunks(B, n_chunks, chunk).transpose(-1, -2).unsqueeze(3)  # (chunk, b, G, 1, n_chunks, N)
    Cc = _to_chunks(C, n_chunks, chunk).transpose(-1, -2).unsqueeze(3)
    outs = [torch.zeros_like(u)] if gy is None else [torch.zeros_like(t) for t in (u, delta, A[:, :, 0], B, C)]
    for c0 in range(0, per_group, block):
        ch = slice(c0, min(c0 + block, per_group))
        A_ = A[:, ch]
        dl = _to_chunks(delta[:, :, ch], n_chunks, chunk)  # (chunk, b, G, c, n_chunks)
        uc = _to_chunks(u[:, :, ch], n_chunks, chunk)
        du = dl * uc
        decay = torch.exp(dl[..., None] * A_)  # (chunk, b, G, c, n_chunks, N)
        states, starts, chunk_decay = _all_states(decay, du[..., None] * Bc)
        if gy is None:
            outs[0][:, :, ch] = _from_chunks((states * Cc).sum(-1), length)
            continue
        gyc = _to_chunks(gy[:, :, ch], n_chunks, chunk)
        lams = _adjoint_states(decay, gyc[..., None] * Cc, chunk_decay)
        lam_b = (lams * Bc).sum(-1)
        outs[3] += _from_chunks((lams * du[..., None]).sum(3).transpose(-1, -2), length)
        outs[4] += _from_chunks((states * gyc[..., None]).sum(3).transpose(-1, -2), length)
        # d/d(decay_t) = lam_t * h_{t-1}; times decay_t gives the gradient of dl_t * A
        grad_log_decay = torch.cat([starts[None], states[:-1]]).mul_(lams).mul_(decay)
        outs[0][:, :, ch] = _from_chunks(lam_b * dl, length)
        outs[1][:, :, ch] = _from_chunks((grad_log_decay * A_).sum(-1) + lam_b * uc, length)
        outs[2][:, ch] = (grad_log_decay * dl[..., None]).sum((0, 1, 4))
    if gy is None:
        return outs[0].flatten(1, 2)
    gu, gdelta, gA, gB, gC = outs
    return gu.flatten(1, 2), gdelta.flatten(1, 2), gA.flatten(0, 1), gB, gC


class _ChunkedScan(torch.autograd.Function):
    """y_t = <C_t, h_t> of the bare recurrence; nothing of size (b, d, L, N) is kept for backward."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        ctx.save_for_backward(u, delta, A, B, C)
        return _chunked_blocks(u, delta, A, B, C)

    @staticmethod
    def backward(ctx, gy):
        return _chunked_blocks(*ctx.saved_tensors, gy=gy.contiguous())


def chunked_selective_scan(u, delta, A, B, C, delta_bias, delta_softplus):
    """The ``torch`` backend's bare scan y_t = <C_t, h_t>: bias and softplus in torch, then the chunked scan.
    u, delta (b, d, L); A (d, N); B, C (b, G, N, L); delta_bias (d,) or None -> y (b, d, L)."""
    if delta_bias is not None:
        delta = delta + delta_bias[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return _ChunkedScan.apply(u, delta, A, B, C)
