"""The Mamba selective scan with interchangeable backends.

Semantics follow ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``:

    delta = softplus(delta + delta_bias)                (bias / softplus optional)
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t,   h_0 = 0
    y_t   = <C_t, h_t> + D * u_t;   y *= silu(z) if z is given

Shapes: u, delta, z (batch, dim, L); A (dim, N); B, C (batch, N, L) or grouped (batch, G, N, L) with dim % G == 0;
D, delta_bias (dim,). Always computed in float32; the output has the dtype of ``u``.
"""

from __future__ import annotations

import functools
import logging
import math
import os

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "torch", "cpu", "cuda", "reference")
_ENV_VAR = "NNUNETV2_CIPA_SCAN_BACKEND"
_logger = logging.getLogger(__name__)
_logged_backends: set[str] = set()


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
        raise ValueError(f"selective_scan: B and C must have the same number of groups, got {B.shape[1]} and {C.shape[1]}")
    check_optional("selective_scan", "D", D, (dim,))
    check_optional("selective_scan", "delta_bias", delta_bias, (dim,))
    check_optional("selective_scan", "z", z, (batch, dim, length))


def expand_groups(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(batch, N, L) or (batch, G, N, L) -> (batch, dim, N, L), each group shared by dim // G channels."""
    if t.dim() == 3:
        return t.unsqueeze(1).expand(-1, dim, -1, -1)
    groups = t.shape[1]
    return t.repeat_interleave(dim // groups, dim=1)


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (the scan never runs in half precision)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Plain sequential loop over L in at least float32 (for tests only). (batch, dim, L) -> (batch, dim, L).

    Deliberately independent of ``scan_with_core`` (bias, softplus, D, z written out again): it is the test oracle
    for the whole operator, so it shares no code with the backends it checks."""
    dtype_out, dtype = u.dtype, compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    u, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))
    dim = u.shape[1]
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    B, C = expand_groups(B, dim), expand_groups(C, dim)  # (batch, dim, N, L)
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


# ---- torch backend: chunked scan, recomputed in backward ------------------------------------------------------------
# The sequence is cut into n_chunks chunks of `chunk` steps (chunk ~ sqrt(L)). A step loop runs over the position inside
# the chunk for all chunks at once, a short loop over chunks carries the chunk-start states, and a second step loop
# produces the outputs. Only exp(delta * A) of single steps or whole chunks is formed (never exp of a positive
# cumulative sum), so large delta * |A| decays to 0 without overflow. Channels are processed in blocks, the same
# channels of every group at once (a group axis), so that the (B, G, N, L) inputs are broadcast, never expanded per
# channel, and memory stays bounded.
# State elements (batch * channels * L * N) per channel block: cache-sized on a CPU; large on a GPU, where every block
# costs about 3 sqrt(L) kernel launches forward and 6 sqrt(L) backward (at 4 channels per block CIPA-tiny's first stage
# would need tens of thousands per scan), for about 6 block-sized float32 tensors alive (1.5 GiB).
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


def _torch_core(u, delta, A, B, C, delta_bias, delta_softplus):
    """The torch backend's core: bias and softplus in torch, then the chunked scan."""
    if delta_bias is not None:
        delta = delta + delta_bias[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return _ChunkedScan.apply(u, delta, A, B, C)


def scan_with_core(core, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Apply the D skip and z gate around ``core(u, delta, A, B4, C4, delta_bias, delta_softplus) -> (b, d, L)``
    (B4, C4 grouped; the core applies bias and softplus itself).

    Computes in at least float32 and returns u's dtype; autograd covers everything outside the core."""
    dtype = compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    out_dtype = u.dtype
    u, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))  # any memory layout; each core picks its own
    y = core(u, delta, A, B if B.dim() == 4 else B.unsqueeze(1), C if C.dim() == 4 else C.unsqueeze(1),
             None if delta_bias is None else delta_bias.to(dtype), delta_softplus)
    if D is not None:
        y = y + D.to(dtype)[None, :, None] * u
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(out_dtype)


def _cuda_scan_fn():
    """mamba-ssm's fused kernel, imported lazily; None when it cannot be imported."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # ImportError, or a broken CUDA extension
        return None
    return selective_scan_fn


@functools.cache
def cpu_kernels():
    """The numba kernels' module (imported lazily); None when numba is missing."""
    try:
        from nnunetv2_cipa.ops import cpu_scan
    except ImportError:
        return None
    return cpu_scan


def available_backends() -> list[str]:
    """Backends usable on this machine (``cuda`` needs a GPU and an importable mamba-ssm, ``cpu`` needs numba)."""
    names = ["torch", "reference"]
    if cpu_kernels() is not None:
        names.insert(0, "cpu")
    if torch.cuda.is_available() and _cuda_scan_fn() is not None:
        names.insert(0, "cuda")
    return names


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Resolve ``backend`` (or env NNUNETV2_CIPA_SCAN_BACKEND, default auto) for tensors on ``device``.

    auto: cuda for CUDA tensors when mamba-ssm imports, cpu for CPU tensors when numba imports, torch otherwise."""
    name = (backend or os.environ.get(_ENV_VAR, "auto")).lower()
    if name not in BACKENDS:
        raise ValueError(f"selective_scan: unknown backend {name!r} (from {'argument' if backend else _ENV_VAR}); "
                         f"choose one of {BACKENDS}")
    if name == "auto":
        if device.type == "cuda" and _cuda_scan_fn() is not None:
            name = "cuda"
        else:
            name = "cpu" if device.type == "cpu" and cpu_kernels() is not None else "torch"
    elif name == "cuda" and (device.type != "cuda" or _cuda_scan_fn() is None):
        raise ValueError("selective_scan: backend 'cuda' needs CUDA tensors and an importable mamba-ssm")
    elif name == "cpu" and (device.type != "cpu" or cpu_kernels() is None):
        raise ValueError("selective_scan: backend 'cpu' needs CPU tensors and numba (pip install numba)")
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
        if name in ("torch", "cpu"):
            core = _torch_core if name == "torch" else cpu_kernels().cpu_selective_scan
            return scan_with_core(core, u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
