"""Multi-directional selective scan over one channels-last map: VMamba's cross-scan -> scan -> cross-merge as one op.

Direction k scans the L positions of u in the order ``positions[k]`` (step t visits position ``positions[k, t]``) with
its own parameters, and the K outputs are summed back in position order:

    y[b, p] = sum_k ( scan_k(u)[b, step of p in direction k] + D_k * u[b, p] )

where scan_k is :func:`~nnunetv2_cipa.ops.selective_scan.selective_scan` with delta_k, A_k, and B_k, C_k shared by
the direction's channels. Shapes: u (b, L, d); delta (K, b, L, d) in position order (pre-bias, pre-softplus);
A (K*d, N); B, C (b, L, K, N) in position order; D, delta_bias (K*d,); positions (K, L), each row a permutation of
0..L-1. A backend with its own directional scan (``cpu``, ``triton``) reads everything in position order (no
per-direction copies); for the others (``cuda``, ``torch``, ``reference``), or with ``gather=True``, the K scan orders
are gathered, ``selective_scan`` runs once with grouped B/C and the outputs are scattered back.

Under ``torch.compile`` the op runs eagerly (``torch.compiler.disable``: a graph break): its backends are numba
kernels, mamba-ssm's CUDA extension, Triton kernels or Python loops over chunks, none of which a compiler traces.
"""

from __future__ import annotations

import weakref

import torch

from nnunetv2_cipa.ops.backends import BACKENDS, resolve_backend
from nnunetv2_cipa.ops.reference_scan import compute_dtype
from nnunetv2_cipa.ops.selective_scan import check_floating, check_optional, selective_scan


# Position lists on a GPU that passed the permutation check: checking needs a device-to-host sync, so each tensor
# (SS2D passes the same cached ones every call) is checked once. On CPU the check runs every call: the numba kernel
# indexes memory with the positions.
_checked_positions: dict[int, weakref.ref] = {}


def _was_checked(positions: torch.Tensor) -> bool:
    ref = _checked_positions.get(id(positions))
    return ref is not None and ref() is positions


def _mark_checked(positions: torch.Tensor) -> None:
    key = id(positions)
    _checked_positions[key] = weakref.ref(positions, lambda _: _checked_positions.pop(key, None))


def _check_inputs(u, delta, A, B, C, positions, D, delta_bias) -> None:
    """Raise ValueError naming the argument whose shape or type is wrong."""
    check_floating("directional_scan", (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)))
    if u.dim() != 3:
        raise ValueError(f"directional_scan: u must have shape (batch, L, d), got {tuple(u.shape)}")
    batch, length, dim = u.shape
    if not isinstance(positions, torch.Tensor) or positions.dim() != 2 or positions.shape[1] != length \
            or positions.dtype != torch.int64:
        shape = tuple(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__
        raise ValueError(f"directional_scan: positions must be an int64 tensor (K, {length}), got {shape}")
    n_dirs = positions.shape[0]
    if positions.device.type == "cpu" or not _was_checked(positions):
        order = torch.arange(length, device=positions.device).expand(n_dirs, length)
        if not torch.equal(positions.sort(dim=1).values, order):
            raise ValueError("directional_scan: every row of positions must be a permutation of 0..L-1")
        if positions.device.type != "cpu":
            _mark_checked(positions)
    if tuple(delta.shape) != (n_dirs, batch, length, dim):
        raise ValueError(f"directional_scan: delta must have shape {(n_dirs, batch, length, dim)}, "
                         f"got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != n_dirs * dim:
        raise ValueError(f"directional_scan: A must have shape ({n_dirs * dim}, N), got {tuple(A.shape)}")
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (batch, length, n_dirs, A.shape[1]):
            raise ValueError(f"directional_scan: {name} must have shape {(batch, length, n_dirs, A.shape[1])}, "
                             f"got {tuple(t.shape)}")
    check_optional("directional_scan", "D", D, (n_dirs * dim,))
    check_optional("directional_scan", "delta_bias", delta_bias, (n_dirs * dim,))


def _gathered_scan(u, delta, A, B, C, positions, delta_bias, delta_softplus, backend):
    """The bare directional scan through ``selective_scan``: gather each direction's order, one grouped call,
    scatter back and sum. (b, L, d) -> (b, L, d)."""
    batch, length, dim = u.shape
    n_dirs = positions.shape[0]
    steps = positions.to(u.device)
    dirs = torch.arange(n_dirs, device=u.device)[:, None]
    us, deltas = u[:, steps], delta.transpose(0, 1)[:, dirs, steps]  # (b, K, L, d) in scan order
    Bs, Cs = B[:, steps, dirs], C[:, steps, dirs]  # (b, K, L, N)
    y = selective_scan(us.transpose(2, 3).reshape(batch, n_dirs * dim, length),
                       deltas.transpose(2, 3).reshape(batch, n_dirs * dim, length), A,
                       Bs.transpose(2, 3), Cs.transpose(2, 3), delta_bias=delta_bias, delta_softplus=delta_softplus,
                       backend=backend)
    y = y.view(batch, n_dirs, dim, length).transpose(2, 3)  # (b, K, L, d) in scan order
    return y[:, dirs, torch.argsort(steps, dim=1)].sum(1)  # argsort[k, p]: the step at which k visits p


@torch.compiler.disable
def directional_scan(u, delta, A, B, C, positions, D=None, delta_bias=None, delta_softplus=False, backend=None,
                     gather=False):
    """K-direction selective scan of u summed in position order, (b, L, d) -> (b, L, d) (see the module docstring);
    computed in float32 whatever the autocast state, returned in u's dtype. ``gather=True`` takes the gathered path
    even where the backend reads the orders in place (benchmarks/bench_gpu.py compares the two layouts)."""
    _check_inputs(u, delta, A, B, C, positions, D, delta_bias)
    name = resolve_backend(backend, u.device)
    dtype = compute_dtype(u, delta, A, B, C, D, delta_bias)
    with torch.autocast(u.device.type, enabled=False):
        x = u.to(dtype)
        args = [t.to(dtype) for t in (delta, A, B, C)]
        bias = None if delta_bias is None else delta_bias.to(dtype)
        in_place = None if gather else BACKENDS[name].directional_scan
        if in_place is not None:
            y = in_place(x, *args, positions, bias, delta_softplus)
        else:
            y = _gathered_scan(x, *args, positions, bias, delta_softplus, name)
        if D is not None:
            y = torch.addcmul(y, x, D.to(dtype).view(positions.shape[0], -1).sum(0))
    return y.to(u.dtype)
