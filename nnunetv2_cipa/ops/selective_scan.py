"""The Mamba selective scan with interchangeable backends.

Semantics follow ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``:

    delta = softplus(delta + delta_bias)                (bias / softplus optional)
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t,   h_0 = 0
    y_t   = <C_t, h_t> + D * u_t;   y *= silu(z) if z is given

Shapes: u, delta, z (batch, dim, L); A (dim, N); B, C (batch, N, L) or grouped (batch, G, N, L) with dim % G == 0;
D, delta_bias (dim,). Computed in float32 whatever the autocast state (float64 inputs: in float64, except by the
``cuda`` backend); the output has the dtype of ``u``. ``backends`` chooses the backend (``backend=``,
NNUNETV2_CIPA_SCAN_BACKEND or auto).
"""

from __future__ import annotations

import torch

from nnunetv2_cipa.ops.backends import BACKENDS, resolve_backend


def check_floating(op: str, named) -> None:
    """Raise ValueError unless every (name, t) of ``named`` is a floating-point tensor."""
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")


def check_optional(op: str, name: str, t, shape: tuple[int, ...]) -> None:
    """Raise ValueError unless ``t`` is None or a tensor of ``shape``."""
    if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != shape):
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{op}: {name} must have shape {shape}, got {got}")


def _check_inputs(u, delta, A, B, C, D, z, delta_bias) -> None:
    """Raise ValueError naming the argument whose shape or dtype is wrong."""
    check_floating("selective_scan", (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)))
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must have shape (batch, dim, L), got {tuple(u.shape)}")
    batch, dim, length = u.shape
    if tuple(delta.shape) != (batch, dim, length):
        raise ValueError(f"selective_scan: delta must have shape {(batch, dim, length)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must have shape ({dim}, N), got {tuple(A.shape)}")
    if A.is_complex():
        raise ValueError("selective_scan: A must be real")
    n_state = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 3:
            ok = tuple(t.shape) == (batch, n_state, length)
        elif t.dim() == 4:
            ok = t.shape[0] == batch and t.shape[2:] == (n_state, length) and dim % t.shape[1] == 0
        else:
            ok = False
        if not ok:
            raise ValueError(
                f"selective_scan: {name} must have shape ({batch}, {n_state}, {length}) or ({batch}, G, {n_state}, "
                f"{length}) with {dim} divisible by G, got {tuple(t.shape)}"
            )
    if B.dim() == 4 and C.dim() == 4 and B.shape[1] != C.shape[1]:
        raise ValueError(f"selective_scan: B and C must have the same number of groups, got {B.shape[1]} and "
                         f"{C.shape[1]}")
    check_optional("selective_scan", "D", D, (dim,))
    check_optional("selective_scan", "delta_bias", delta_bias, (dim,))
    check_optional("selective_scan", "z", z, (batch, dim, length))


@torch.compiler.disable  # eager under torch.compile, as directional_scan
def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, backend=None):
    """Selective scan, (batch, dim, L) -> (batch, dim, L), in float32 whatever the autocast state."""
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    name = resolve_backend(backend, u.device)
    with torch.autocast(u.device.type, enabled=False):
        return BACKENDS[name].selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
