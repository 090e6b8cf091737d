"""The selective scan as a plain sequential loop: the oracle every backend is tested against, and the ``reference``
backend; the directional scan by its definition on top of it (:func:`directional_reference`). Also the dtype rule
all backends share (:func:`compute_dtype`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (the scan never runs in half precision)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _expand_groups(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(batch, N, L) or (batch, G, N, L) -> (batch, dim, N, L), each group shared by dim // G channels."""
    if t.dim() == 3:
        return t.unsqueeze(1).expand(-1, dim, -1, -1)
    groups = t.shape[1]
    return t.repeat_interleave(dim // groups, dim=1)


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Plain sequential loop over L in at least float32. (batch, dim, L) -> (batch, dim, L), u's dtype.

    Deliberately independent of the backends' code (bias, softplus, D, z written out again): it is the test oracle
    for the whole operator, so it shares no code with the backends it checks."""
    dtype_out, dtype = u.dtype, compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    u, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))
    dim = u.shape[1]
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    B, C = _expand_groups(B, dim), _expand_groups(C, dim)  # (batch, dim, N, L)
    h = u.new_zeros(u.shape[0], dim, A.shape[1])
    ys = []  # unbind, not indexing, so that backward stays linear in L
    for delta_t, u_t, B_t, C_t in zip(delta.unbind(-1), u.unbind(-1), B.unbind(-1), C.unbind(-1)):
        h = torch.exp(delta_t[..., None] * A) * h + (delta_t * u_t)[..., None] * B_t
        ys.append((h * C_t).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.to(dtype)[None, :, None] * u
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(dtype_out)


def directional_reference(u, delta, A, B, C, positions, delta_bias, delta_softplus):
    """A backend's bare ``directional_scan`` by its definition: each direction's order gathered, scanned by the
    reference loop, put back in position order and summed; shapes as in ``ops.directional_scan``."""
    dim, out = u.shape[2], torch.zeros_like(u)
    for k, order in enumerate(positions):
        ch = slice(k * dim, (k + 1) * dim)
        y = selective_scan_reference(u[:, order].transpose(1, 2), delta[k][:, order].transpose(1, 2), A[ch],
                                     B[:, order, k].transpose(1, 2), C[:, order, k].transpose(1, 2),
                                     delta_bias=None if delta_bias is None else delta_bias[ch],
                                     delta_softplus=delta_softplus)
        out = out.index_add(1, order, y.transpose(1, 2))
    return out
