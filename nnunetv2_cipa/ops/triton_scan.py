"""The ``triton`` backend: the selective-scan core as two Triton kernels (forward, backward), for CUDA GPUs on which
mamba-ssm's compiled kernel is missing. Triton ships with PyTorch's Linux CUDA wheels, so nothing is built.

The kernels serve two layouts. Plain: one grouped scan of u, delta, y (b, D, L) with B, C (b, G, N, L). Directional
(``directional_scan``'s K scan orders of one map, each direction a group): u (b, L, d), delta (K, b, L, d), B, C
(b, L, K, N), all in position order, and step t of direction k reads position ``positions[k, t]``; nothing is
gathered into scan order, so no per-direction copies are made or kept for backward. The directions add their outputs
(and their gradients of u) into one (b, L, d) tensor by atomic adds.

Each program owns one (batch, group, block of channels) and walks the sequence in tiles of ``BLOCK_L`` steps,
keeping the state (channels, N) in registers. Inside a tile the recurrence h_t = exp(delta_t A) h_{t-1} + delta_t
u_t B_t is an associative scan along the tile, started from the state carried in from the previous tile. Forward
saves the state entering every tile; backward walks the tiles in reverse, recomputes the tile's states from the saved
one, and runs the adjoint recurrence dh_t = dy_t C_t + exp(delta_{t+1} A) dh_{t+1} as an associative scan over the
tile flipped in time.
The gradients of B and C sum over the group's channel blocks by atomic adds, those of A and delta_bias over the batch.

Imported lazily by the backend table (ImportError when triton is missing). With ``TRITON_INTERPRET=1`` set before
the import, the kernels run on CPU tensors through Triton's interpreter (the tests do this).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

BLOCK_L = 32  # sequence steps per tile
# registers: the backward kernel keeps several (channels, state, steps) tiles and about twice as many (channels, steps)
# rows live, so BLOCK_D * (BLOCK_N + 2) * BLOCK_L is bounded, per element size in bytes: bounds with which ptxas
# compiles CIPA's state sizes (1 to 16) at 4 warps without spilling to local memory for sm_90 in float32, and with
# at most 8 bytes elsewhere (benchmarks/bench_triton_compile.py; docs/benchmarks.md, "Triton kernels")
MAX_TILE_ELEMENTS = {4: 2048, 8: 1024}
NUM_WARPS = 4
# sizes not worth a compiled variant each (Triton specialises integer arguments on divisibility by 16 and on 1); the
# length and the channels per group stay specialised, as they set the alignment of the rows the kernels load (plain
# layout: a row per channel, L long; directional: a row per position, group_dim channels long)
_GENERIC_SIZES = ["batch_size", "dim", "n_state", "n_groups", "n_tiles"]


@triton.jit
def _linear_recurrence(a_left, x_left, a_right, x_right):
    """Compose h -> a_left h + x_left, then h -> a_right h + x_right (left is earlier in the scan's direction)."""
    return a_left * a_right, a_right * x_left + x_right


@triton.jit
def _softplus(x):
    """log1p(exp(x)) as torch computes it (x itself above 20). log1p(e) is log(u) * e / (u - 1) with u = 1 + e
    rounded (Kahan's trick: exact to a few ulp where log(1 + e) would lose e's digits that u cannot hold), e where
    u rounds to 1."""
    e = tl.exp(x)
    u = 1.0 + e
    return tl.where(x > 20.0, x, tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0))))


@triton.jit
def _column(tile, index: tl.constexpr, BLOCK_L: tl.constexpr):
    """tile[:, :, index] of a (BLOCK_D, BLOCK_N, BLOCK_L) tile."""
    steps = tl.arange(0, BLOCK_L)
    return tl.sum(tl.where((steps == index)[None, None, :], tile, 0.0), axis=2)


@triton.jit
def _program_setup(A_ptr, bias_ptr, batch_size, dim, length, n_state, group_dim, n_groups, n_tiles,
                   HAS_BIAS: tl.constexpr, DIRECTIONAL: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's group, channels (BLOCK_D,) with their mask, state indices (BLOCK_N,) with theirs, the mask of
    both (BLOCK_D, BLOCK_N); the offsets at step 0 of its rows (see the module docstring for the layouts): of u /
    y / dy / du (BLOCK_D,), of delta / ddelta (BLOCK_D,), of B / C (BLOCK_N,), of the saved states (BLOCK_D,); and
    its A (BLOCK_D, BLOCK_N) and delta_bias (BLOCK_D,; zeros without one)."""
    batch = tl.program_id(0).to(tl.int64)  # 64-bit offsets: b * D * L may pass 2**31
    group, block = tl.program_id(1), tl.program_id(2)
    local = block * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = local < group_dim
    channel = group * group_dim + local
    n = tl.arange(0, BLOCK_N)
    n_mask = n < n_state
    dn_mask = d_mask[:, None] & n_mask[None, :]
    A = tl.load(A_ptr + channel[:, None] * n_state + n[None, :], mask=dn_mask, other=0.0)
    bias = tl.zeros((BLOCK_D,), A.dtype)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + channel, mask=d_mask, other=0.0)
    if DIRECTIONAL:
        map_rows = batch * length * group_dim + local
        delta_rows = (group * batch_size + batch) * length * group_dim + local
        bc_rows = (batch * length * n_groups + group) * n_state + n
    else:
        map_rows = (batch * dim + channel) * length
        delta_rows = map_rows
        bc_rows = ((batch * n_groups + group) * n_state + n) * length
    state_rows = ((batch * dim + channel) * n_tiles) * n_state
    return group, channel, d_mask, n, n_mask, dn_mask, map_rows, delta_rows, bc_rows, state_rows, A, bias


@triton.jit
def _step_offsets(positions_ptr, group, t, t_mask, length, group_dim, n_groups, n_state, DIRECTIONAL: tl.constexpr):
    """Offsets (BLOCK_L,) of steps t from a row's step 0: in u / delta-like rows, and in B / C rows."""
    if DIRECTIONAL:
        position = tl.load(positions_ptr + group * length + t, mask=t_mask, other=0)
        return position * group_dim, position * n_groups * n_state
    else:
        return t, t


@triton.jit
def _store_or_add(pointers, values, mask, DIRECTIONAL: tl.constexpr):
    """Store, or (directional layout: every direction adds its part of the output) add atomically; relaxed: nothing
    reads the sums before the kernel ends."""
    if DIRECTIONAL:
        tl.atomic_add(pointers, values, mask=mask, sem="relaxed")
    else:
        tl.store(pointers, values, mask=mask)


@triton.jit
def _tile_states(dt, u, A, B, h_start):
    """The states (BLOCK_D, BLOCK_N, BLOCK_L) of one tile from its dt, u (BLOCK_D, BLOCK_L), B (BLOCK_N, BLOCK_L) and
    the state entering it; and the inputs delta_t u_t B_t of the recurrence."""
    decay = tl.exp(dt[:, None, :] * A[:, :, None])
    inputs = (dt * u)[:, None, :] * B[None, :, :]
    decay_product, local_states = tl.associative_scan((decay, inputs), 2, _linear_recurrence)
    return local_states + decay_product * h_start[:, :, None], inputs


@triton.jit(do_not_specialize=_GENERIC_SIZES)
def _scan_forward_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, bias_ptr, positions_ptr, y_ptr, states_ptr,
                         batch_size, dim, length, n_state, group_dim, n_groups, n_tiles,
                         HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, SAVE_STATES: tl.constexpr,
                         DIRECTIONAL: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_L: tl.constexpr):
    group, channel, d_mask, n, n_mask, dn_mask, map_rows, delta_rows, bc_rows, state_rows, A, bias = _program_setup(
        A_ptr, bias_ptr, batch_size, dim, length, n_state, group_dim, n_groups, n_tiles, HAS_BIAS, DIRECTIONAL,
        BLOCK_D, BLOCK_N)
    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=y_ptr.dtype.element_ty)
    for tile in range(n_tiles):
        t = tile * BLOCK_L + tl.arange(0, BLOCK_L)
        t_mask = t < length
        dt_mask = d_mask[:, None] & t_mask[None, :]
        nt_mask = n_mask[:, None] & t_mask[None, :]
        steps, bc_steps = _step_offsets(positions_ptr, group, t, t_mask, length, group_dim, n_groups, n_state,
                                        DIRECTIONAL)
        if SAVE_STATES:
            tl.store(states_ptr + state_rows[:, None] + tile * n_state + n[None, :], h, mask=dn_mask)
        u = tl.load(u_ptr + map_rows[:, None] + steps[None, :], mask=dt_mask, other=0.0)
        dt = tl.load(delta_ptr + delta_rows[:, None] + steps[None, :], mask=dt_mask, other=0.0)
        if HAS_BIAS:
            dt += bias[:, None]
        if SOFTPLUS:
            dt = _softplus(dt)
        dt = tl.where(dt_mask, dt, 0.0)  # padding steps: decay 1, no input
        B = tl.load(B_ptr + bc_rows[:, None] + bc_steps[None, :], mask=nt_mask, other=0.0)
        C = tl.load(C_ptr + bc_rows[:, None] + bc_steps[None, :], mask=nt_mask, other=0.0)
        states, inputs = _tile_states(dt, u, A, B, h)
        y = tl.sum(states * C[None, :, :], axis=1)
        _store_or_add(y_ptr + map_rows[:, None] + steps[None, :], y, dt_mask, DIRECTIONAL)
        h = _column(states, BLOCK_L - 1, BLOCK_L)


@triton.jit(do_not_specialize=_GENERIC_SIZES)
def _scan_backward_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, bias_ptr, positions_ptr, states_ptr, dy_ptr,
                          du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dbias_ptr,
                          batch_size, dim, length, n_state, group_dim, n_groups, n_tiles,
                          HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, DIRECTIONAL: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    group, channel, d_mask, n, n_mask, dn_mask, map_rows, delta_rows, bc_rows, state_rows, A, bias = _program_setup(
        A_ptr, bias_ptr, batch_size, dim, length, n_state, group_dim, n_groups, n_tiles, HAS_BIAS, DIRECTIONAL,
        BLOCK_D, BLOCK_N)
    dh_next = tl.zeros((BLOCK_D, BLOCK_N), dtype=dy_ptr.dtype.element_ty)  # dh at the first step after the tile
    dA = tl.zeros((BLOCK_D, BLOCK_N), dtype=dy_ptr.dtype.element_ty)
    dbias = tl.zeros((BLOCK_D,), dtype=dy_ptr.dtype.element_ty)
    for reverse_tile in range(n_tiles):
        tile = n_tiles - 1 - reverse_tile
        t = tile * BLOCK_L + tl.arange(0, BLOCK_L)
        t_mask = t < length
        dt_mask = d_mask[:, None] & t_mask[None, :]
        nt_mask = n_mask[:, None] & t_mask[None, :]
        next_mask = d_mask[:, None] & (t + 1 < length)[None, :]
        steps, bc_steps = _step_offsets(positions_ptr, group, t, t_mask, length, group_dim, n_groups, n_state,
                                        DIRECTIONAL)
        next_steps, _ = _step_offsets(positions_ptr, group, t + 1, t + 1 < length, length, group_dim, n_groups,
                                      n_state, DIRECTIONAL)
        u = tl.load(u_ptr + map_rows[:, None] + steps[None, :], mask=dt_mask, other=0.0)
        raw = tl.load(delta_ptr + delta_rows[:, None] + steps[None, :], mask=dt_mask, other=0.0)
        raw_next = tl.load(delta_ptr + delta_rows[:, None] + next_steps[None, :], mask=next_mask, other=0.0)
        if HAS_BIAS:
            raw += bias[:, None]
            raw_next += bias[:, None]
        dt, dt_next = raw, raw_next
        if SOFTPLUS:
            dt, dt_next = _softplus(raw), _softplus(raw_next)
        dt = tl.where(dt_mask, dt, 0.0)
        dt_next = tl.where(next_mask, dt_next, 0.0)  # beyond the sequence: decay 1, nothing flows back
        B = tl.load(B_ptr + bc_rows[:, None] + bc_steps[None, :], mask=nt_mask, other=0.0)
        C = tl.load(C_ptr + bc_rows[:, None] + bc_steps[None, :], mask=nt_mask, other=0.0)
        dy = tl.load(dy_ptr + map_rows[:, None] + steps[None, :], mask=dt_mask, other=0.0)
        h_start = tl.load(states_ptr + state_rows[:, None] + tile * n_state + n[None, :], mask=dn_mask, other=0.0)

        states, inputs = _tile_states(dt, u, A, B, h_start)

        # the adjoint runs against time: a forward scan over the tile flipped in time, flipped back after (Triton
        # leaves the operand order of a compiled reverse=True scan unspecified; tl.flip moves bits from Triton 3.3
        # on, and before multiplies by 0 / 1 and sums, exact for finite values)
        decay_next = tl.exp(tl.flip(dt_next, 1)[:, None, :] * A[:, :, None])
        sources = tl.flip(dy, 1)[:, None, :] * tl.flip(C, 1)[None, :, :]
        decay_suffix, local_dh = tl.associative_scan((decay_next, sources), 2, _linear_recurrence)
        dh = tl.flip(local_dh + decay_suffix * dh_next[:, :, None], 2)
        dh_next = _column(dh, 0, BLOCK_L)

        d_decay_arg = dh * (states - inputs)  # dL/d(dt A) = dh_t * h_{t-1} * exp(dt A) = dh_t * (h_t - inputs_t)
        dh_B = tl.sum(dh * B[None, :, :], axis=1)
        d_dt = dh_B * u + tl.sum(d_decay_arg * A[:, :, None], axis=1)
        dA += tl.sum(d_decay_arg * dt[:, None, :], axis=2)
        if SOFTPLUS:
            d_dt = d_dt / (1.0 + tl.exp(-raw))  # softplus' derivative: sigmoid
        d_dt = tl.where(dt_mask, d_dt, 0.0)
        dbias += tl.sum(d_dt, axis=1)
        _store_or_add(du_ptr + map_rows[:, None] + steps[None, :], dh_B * dt, dt_mask, DIRECTIONAL)
        tl.store(ddelta_ptr + delta_rows[:, None] + steps[None, :], d_dt, mask=dt_mask)
        # sums over the group's channel blocks; relaxed: nothing reads them before the kernel ends
        tl.atomic_add(dB_ptr + bc_rows[:, None] + bc_steps[None, :], tl.sum(dh * (dt * u)[:, None, :], axis=0),
                      mask=nt_mask, sem="relaxed")
        tl.atomic_add(dC_ptr + bc_rows[:, None] + bc_steps[None, :], tl.sum(dy[:, None, :] * states, axis=0),
                      mask=nt_mask, sem="relaxed")
    tl.atomic_add(dA_ptr + channel[:, None] * n_state + n[None, :], dA, mask=dn_mask, sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + channel, dbias, mask=d_mask, sem="relaxed")


def _blocks(group_dim: int, n_state: int, element_size: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_N): the state padded to a power of two, as many channels (a power of two) as the budget
    allows."""
    block_n = triton.next_power_of_2(n_state)
    fitting = MAX_TILE_ELEMENTS[element_size] // ((block_n + 2) * BLOCK_L)
    block_d = min(triton.next_power_of_2(group_dim), 1 << max(0, fitting.bit_length() - 1))
    return block_d, block_n


def _launch(u: torch.Tensor, A: torch.Tensor, B: torch.Tensor, positions: torch.Tensor | None) -> tuple:
    """(grid, the kernels' size arguments, BLOCK_D, BLOCK_N) for A (D, N) and, plain, u (b, D, L), B (b, G, N, L),
    or, directional, u (b, L, d) and positions (K, L)."""
    if positions is None:
        batch, dim, length = u.shape
        n_groups = B.shape[1]
    else:
        batch, length = u.shape[:2]
        dim, n_groups = A.shape[0], positions.shape[0]
    group_dim, n_state = dim // n_groups, A.shape[1]
    block_d, block_n = _blocks(group_dim, n_state, u.element_size())
    sizes = (batch, dim, length, n_state, group_dim, n_groups, triton.cdiv(length, BLOCK_L))
    return (batch, n_groups, triton.cdiv(group_dim, block_d)), sizes, block_d, block_n


def _on_device(t: torch.Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current device); nothing to do for the interpreter."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


class TritonScan(torch.autograd.Function):
    """Plain (``positions`` None): u, delta (b, D, L), B, C (b, G, N, L) with G dividing D -> y (b, D, L).
    Directional: u (b, L, d), delta (K, b, L, d), B, C (b, L, K, N), positions (K, L) int64 -> y (b, L, d), the sum
    over the K directions. Both: A (D = K d, N), delta_bias (D,) or None; float32 or float64, any layout; delta =
    softplus(delta + bias) (or delta + bias). Saved for backward: the inputs and, with ``save_states``, the state
    entering every tile, (b, D, ceil(L / BLOCK_L), N)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, delta_bias, positions, delta_softplus: bool, save_states: bool):
        u, delta, A, B, C = (t.detach().contiguous() for t in (u, delta, A, B, C))
        bias = None if delta_bias is None else delta_bias.detach().contiguous()
        positions = None if positions is None else positions.to(u.device, torch.int64).contiguous()
        dtypes = {t.dtype for t in (u, delta, A, B, C, bias) if t is not None}
        if len(dtypes) != 1 or u.dtype not in (torch.float32, torch.float64):
            raise ValueError("the triton scan needs float32 or float64 inputs of one dtype, got "
                             f"{sorted(map(str, dtypes))}")
        grid, sizes, block_d, block_n = _launch(u, A, B, positions)
        y = torch.empty_like(u) if positions is None else torch.zeros_like(u)  # directional: the directions add
        states = u.new_empty(sizes[0], sizes[1], sizes[-1], A.shape[1]) if save_states else None
        with _on_device(u):
            _scan_forward_kernel[grid](u, delta, A, B, C, u if bias is None else bias,  # u: a pointer never read
                                       u if positions is None else positions, y, u if states is None else states,
                                       *sizes,
                                       HAS_BIAS=bias is not None, SOFTPLUS=bool(delta_softplus),
                                       SAVE_STATES=save_states, DIRECTIONAL=positions is not None,
                                       BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_L=BLOCK_L, num_warps=NUM_WARPS)
        ctx.save_for_backward(u, delta, A, B, C, bias, positions, states)
        ctx.delta_softplus = bool(delta_softplus)
        return y

    @staticmethod
    def backward(ctx, dy):
        u, delta, A, B, C, bias, positions, states = ctx.saved_tensors
        grid, sizes, block_d, block_n = _launch(u, A, B, positions)
        dy = dy.to(u.dtype).contiguous()
        du = torch.empty_like(u) if positions is None else torch.zeros_like(u)  # directional: the directions add
        ddelta = torch.empty_like(delta)
        dA, dB, dC = torch.zeros_like(A), torch.zeros_like(B), torch.zeros_like(C)
        dbias = None if bias is None else torch.zeros_like(bias)
        with _on_device(u):
            _scan_backward_kernel[grid](u, delta, A, B, C, u if bias is None else bias,
                                        u if positions is None else positions, states, dy,
                                        du, ddelta, dA, dB, dC, du if dbias is None else dbias, *sizes,
                                        HAS_BIAS=bias is not None, SOFTPLUS=ctx.delta_softplus,
                                        DIRECTIONAL=positions is not None,
                                        BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_L=BLOCK_L, num_warps=NUM_WARPS)
        return du, ddelta, dA, dB, dC, dbias, None, None, None


def _needs_states(*tensors) -> bool:
    """Whether a gradient will be asked for (not under no_grad / inference mode, as in prediction): only then are
    the tile states saved."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def triton_selective_scan(u, delta, A, B, C, delta_bias, delta_softplus):
    """The bare grouped scan (the core of ``backends.scan_with_core``): u, delta (b, D, L), A (D, N), B, C
    (b, G, N, L), delta_bias (D,) or None -> y (b, D, L), in the inputs' (float32 or float64) dtype."""
    return TritonScan.apply(u, delta, A, B, C, delta_bias, None, delta_softplus,
                            _needs_states(u, delta, A, B, C, delta_bias))


def triton_directional_scan(u, delta, A, B, C, positions, delta_bias, delta_softplus):
    """Sum over K directions of the bare scan of u in the orders ``positions``, read in position order (the
    backend's ``directional_scan``): u (b, L, d), delta (K, b, L, d), A (K*d, N), B, C (b, L, K, N), positions
    (K, L), delta_bias (K*d,) or None -> (b, L, d), in the inputs' (float32 or float64) dtype."""
    return TritonScan.apply(u, delta, A, B, C, delta_bias, positions, delta_softplus,
                            _needs_states(u, delta, A, B, C, delta_bias))
