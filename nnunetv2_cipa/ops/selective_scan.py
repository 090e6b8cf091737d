"""The Mamba selective scan with interchangeable backends.

Semantics follow ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``:

    delta = softplus(delta + delta_bias)                (bias / softplus optional)
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t,   h_0 = 0
    y_t   = <C_t, h_t> + D * u_t;   y *= silu(z) if z is given

Shapes: u, delta, z (batch, dim, L); A (dim, N); B, C (batch, N, L) or grouped (batch, G, N, L) with dim % G == 0;
D, delta_bias (dim,). Always computed in float32; the output has the dtype of ``u``.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "torch", "cuda", "reference")
_ENV_VAR = "NNUNETV2_CIPA_SCAN_BACKEND"
_logger = logging.getLogger(__name__)
_logged_backends: set[str] = set()


def _check_inputs(u, delta, A, B, C, D, z, delta_bias) -> None:
    """Raise ValueError naming the argument whose shape or dtype is wrong."""
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"selective_scan: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"selective_scan: {name} must be a floating-point tensor, got {t.dtype}")
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
        raise ValueError(f"selective_scan: B and C must have the same number of groups, got {B.shape[1]} and {C.shape[1]}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != (dim,)):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"selective_scan: {name} must have shape ({dim},), got {shape}")
    if z is not None and (not isinstance(z, torch.Tensor) or tuple(z.shape) != (batch, dim, length)):
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"selective_scan: z must have shape {(batch, dim, length)}, got {shape}")


def expand_groups(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(batch, N, L) or (batch, G, N, L) -> (batch, dim, N, L), each group shared by dim // G channels."""
    if t.dim() == 3:
        return t.unsqueeze(1).expand(-1, dim, -1, -1)
    groups = t.shape[1]
    return t.repeat_interleave(dim // groups, dim=1)


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Plain sequential loop over L in float32 (for tests only). (batch, dim, L) -> (batch, dim, L)."""
    dtype_out = u.dtype
    u, delta, A, B, C = (t.float() for t in (u, delta, A, B, C))
    dim = u.shape[1]
    if delta_bias is not None:
        delta = delta + delta_bias.float()[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    B, C = expand_groups(B, dim), expand_groups(C, dim)  # (batch, dim, N, L)
    h = u.new_zeros(u.shape[0], dim, A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[..., t]
        ys.append((h * C[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.float()[None, :, None] * u
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype_out)


def _cuda_scan_fn():
    """mamba-ssm's fused kernel, imported lazily; None when it cannot be imported."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # ImportError, or a broken CUDA extension
        return None
    return selective_scan_fn


def available_backends() -> list[str]:
    """Backends usable on this machine (``cuda`` only with a GPU and an importable mamba-ssm)."""
    names = ["torch", "reference"]
    if torch.cuda.is_available() and _cuda_scan_fn() is not None:
        names.insert(0, "cuda")
    return names


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Resolve ``backend`` (or env NNUNETV2_CIPA_SCAN_BACKEND, default auto) for tensors on ``device``."""
    name = (backend or os.environ.get(_ENV_VAR, "auto")).lower()
    if name not in BACKENDS:
        raise ValueError(f"selective_scan: unknown backend {name!r} (from {'argument' if backend else _ENV_VAR}); "
                         f"choose one of {BACKENDS}")
    if name == "auto":
        name = "cuda" if device.type == "cuda" and _cuda_scan_fn() is not None else "torch"
    elif name == "cuda" and (device.type != "cuda" or _cuda_scan_fn() is None):
        raise ValueError("selective_scan: backend 'cuda' needs CUDA tensors and an importable mamba-ssm")
    if name not in _logged_backends:
        _logged_backends.add(name)
        _logger.info("selective_scan: using the %r backend", name)
    return name


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, backend=None):
    """Selective scan, (batch, dim, L) -> (batch, dim, L), in float32 whatever the autocast state."""
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    name = resolve_backend(backend, u.device)
    with torch.autocast(u.device.type, enabled=False):
        if name == "cuda":
            args = [t.float().contiguous() for t in (u, delta, A, B, C)]
            out = _cuda_scan_fn()(*args, D=None if D is None else D.float(), z=None if z is None else z.float(),
                                  delta_bias=None if delta_bias is None else delta_bias.float(),
                                  delta_softplus=delta_softplus)
            return out.to(u.dtype)
        return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
