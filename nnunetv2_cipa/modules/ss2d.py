"""Token mixers and the layers built on them: SS2D (VMamba's cross-scan over a 2D map) and SS1D (one direction over
a token sequence). See docs/architecture.md, "SS2D and SS1D".

Both layers hold VMamba's per-direction SSM parameters under the official names (``x_proj_weight``,
``dt_projs_weight``, ``dt_projs_bias``, ``Ds`` and the mixer's state parameter, ``A_logs`` for the selective scan) so
that ImageNet VMamba checkpoints map onto them key by key. How a direction turns (u, delta, B, C) into its output is
the token mixer's job: :class:`SelectiveScanMixer` (CIPA) or :class:`MemorylessMixer` (the no-Mamba control), chosen
by name from ``TOKEN_MIXERS``.
"""

from __future__ import annotations

import functools
import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_cipa.modules.linear import Linear, linear
from nnunetv2_cipa.ops.directional_scan import directional_scan
from nnunetv2_cipa.ops.memoryless_mix import memoryless_mix


@functools.lru_cache(maxsize=64)
@torch.inference_mode(False)  # a first call under inference mode (prediction) must not cache an inference tensor
def _cross_scan_positions(height: int, width: int, device: torch.device) -> torch.Tensor:
    rows = torch.arange(height * width, device=device)
    cols = rows.view(height, width).t().reshape(-1)
    return torch.stack([rows, cols, rows.flip(0), cols.flip(0)])


@torch.compiler.disable  # eager under torch.compile: the cached tensors themselves reach the scan
def cross_scan_positions(height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """VMamba's 4 scan orders of an H x W map, (4, H*W) int64: step t of direction k visits row-major position
    ``[k, t]``; k = 0 row-major, 1 column-major (step w*H + h visits h*W + w), 2 and 3 the same reversed."""
    return _cross_scan_positions(height, width, torch.device(device))


@functools.lru_cache(maxsize=64)
@torch.inference_mode(False)
def _sequence_positions(length: int, device: torch.device) -> torch.Tensor:
    return _cross_scan_positions(1, length, device)[:1]


@torch.compiler.disable
def sequence_positions(length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The one scan order of a token sequence, (1, L) int64 (one cached tensor per length and device, so that the
    scan checks it once)."""
    return _sequence_positions(length, torch.device(device))


def dt_rank_for(d_model: int) -> int:
    """VMamba's ``dt_rank="auto"``: ceil(d_model / 16)."""
    return math.ceil(d_model / 16)


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors as float32, others unchanged (the mixers' output reaches ``out_norm`` unrounded)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class TokenMixer(Protocol):
    """How the K directions of a :class:`DirectionalSSM` mix tokens. ``runs_scans``: whether ``mix`` calls the
    selective scan (and so a scan backend); ``state_name`` is the name of the mixer's (K*D, N) parameter, initialised
    by ``init_state``; ``mix`` maps u (B, L, D), delta (K, B, L, D) (pre-bias),
    B, C (B, L, K, N), positions (K, L), the state, D and the delta bias (K*D,) to y (B, L, D), at least float32."""

    runs_scans: bool
    state_name: str

    @staticmethod
    def init_state(state: torch.Tensor) -> None: ...

    @staticmethod
    def mix(u, delta, Bs, Cs, positions, state, D, delta_bias) -> torch.Tensor: ...


class SelectiveScanMixer:
    """Mamba's selective scan in each direction's order, summed in position order:
    h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t, y_t = <C_t, h_t> + D u_t, dt_t = softplus(delta_t + bias),
    A = -exp(A_logs), h_0 = 0."""

    runs_scans = True
    state_name = "A_logs"

    @staticmethod
    def init_state(state: torch.Tensor) -> None:
        """A_logs = log(1..N) for every channel and direction."""
        state.copy_(torch.log(torch.arange(1, state.shape[1] + 1, dtype=torch.float32)).expand_as(state))

    @staticmethod
    def mix(u, delta, Bs, Cs, positions, state, D, delta_bias) -> torch.Tensor:
        return directional_scan(_at_least_float32(u), delta, -torch.exp(state.float()), Bs, Cs, positions, D=D,
                                delta_bias=delta_bias, delta_softplus=True)


class MemorylessMixer:
    """The no-Mamba control, per position and summed over the K directions:
    y_t = D u_t + softplus(delta_t + bias) u_t sum_n(state_weight[d, n] B_t[n] C_t[n]). Nothing is carried between
    positions, so tokens mix only through the depthwise convolution before it (a MambaOut-style gated CNN);
    ``state_weight`` replaces ``A_logs`` parameter for parameter."""

    runs_scans = False
    state_name = "state_weight"

    @staticmethod
    def init_state(state: torch.Tensor) -> None:
        """state_weight = 1."""
        state.fill_(1.0)

    @staticmethod
    def mix(u, delta, Bs, Cs, positions, state, D, delta_bias) -> torch.Tensor:
        k, dim, d_state = positions.shape[0], u.shape[-1], state.shape[1]
        with torch.autocast(u.device.type, enabled=False):
            u, delta, Bs, Cs = (_at_least_float32(t) for t in (u, delta, Bs, Cs))
            return memoryless_mix(u, delta, Bs * Cs, state.view(k, dim, d_state).to(u.dtype),
                                  D.view(k, dim).sum(0).to(u.dtype), delta_bias.view(k, dim).to(u.dtype))


TOKEN_MIXERS: dict[str, type[TokenMixer]] = {"selective_scan": SelectiveScanMixer, "memoryless": MemorylessMixer}


class DirectionalSSM(nn.Module):
    """Per-direction SSM projections and a token mixer: (B, L, D) mixed in K orders -> (B, L, D).

    Parameters: ``x_proj_weight`` (K, R + 2N, D), ``dt_projs_weight`` (K, D, R), ``dt_projs_bias`` (K, D), the
    mixer's state (K*D, N) under ``mixer.state_name``, ``Ds`` (K*D,).
    """

    def __init__(self, d_inner: int, d_state: int, dt_rank: int, num_directions: int,
                 mixer: type[TokenMixer] = SelectiveScanMixer, dt_min: float = 1e-3, dt_max: float = 0.1,
                 dt_floor: float = 1e-4):
        super().__init__()
        self.d_state, self.dt_rank, self.num_directions, self.mixer = d_state, dt_rank, num_directions, mixer
        k = num_directions
        self.x_proj_weight = nn.Parameter(torch.empty(k, dt_rank + 2 * d_state, d_inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d_inner, dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(k, d_inner))
        self.register_parameter(mixer.state_name, nn.Parameter(torch.empty(k * d_inner, d_state)))
        self.Ds = nn.Parameter(torch.empty(k * d_inner))
        self._dt_range = (dt_min, dt_max, dt_floor)
        for param in (self.dt_projs_bias, self.mixer_state, self.Ds):
            param._no_weight_decay = True
        self.reset_ssm_parameters()

    @property
    def mixer_state(self) -> nn.Parameter:
        """The mixer's (K*D, N) state parameter (``A_logs`` or ``state_weight``)."""
        return getattr(self, self.mixer.state_name)

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba init: x_proj U(+-1/sqrt(D)), dt_proj U(+-1/sqrt(R)), dt bias = softplus^-1(log-uniform dt),
        the mixer's state init, Ds = 1."""
        dt_min, dt_max, dt_floor = self._dt_range
        d_inner = self.x_proj_weight.shape[-1]
        nn.init.uniform_(self.x_proj_weight, -d_inner ** -0.5, d_inner ** -0.5)
        nn.init.uniform_(self.dt_projs_weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        dt = torch.exp(torch.rand_like(self.dt_projs_bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_floor)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.mixer.init_state(self.mixer_state)
        self.Ds.fill_(1.0)

    def scan(self, u: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, L, D), at least float32: direction k mixes u in the order ``positions[k]`` with its own
        projections and one B/C group. The projections are position-wise, so they are computed in position order,
        once for all directions."""
        batch, length, dim = u.shape
        k = self.num_directions
        x_dbl = linear(u, self.x_proj_weight.flatten(0, 1)).view(batch, length, k, -1)  # (B, L, K, R + 2N)
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=3)
        delta = torch.bmm(dts.reshape(batch * length, k, self.dt_rank).transpose(0, 1),
                          self.dt_projs_weight.transpose(1, 2)).view(k, batch, length, dim)  # (K, B, L, D)
        return self.mixer.mix(u, delta, Bs, Cs, positions, self.mixer_state, self.Ds, self.dt_projs_bias.flatten())


class SS2D(DirectionalSSM):
    """VMamba SS2D on channels-last maps, (B, H, W, C) -> (B, H, W, C): in_proj -> depthwise conv + SiLU ->
    4-direction cross-scan + cross-merge (one mixer call over the map) -> LayerNorm (on the float32 mixer output)
    -> SiLU(z) gate -> out_proj."""

    def __init__(self, d_model: int, d_state: int = 16, ssm_ratio: float = 2.0, d_conv: int = 3,
                 mixer: type[TokenMixer] = SelectiveScanMixer):
        d_inner = int(ssm_ratio * d_model)
        super().__init__(d_inner, d_state, dt_rank_for(d_model), num_directions=4, mixer=mixer)
        self.in_proj = Linear(d_model, 2 * d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=True)
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = Linear(d_inner, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = F.silu(self.conv2d(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)  # channels-last memory from the conv
        y = self.scan(x.reshape(batch, height * width, -1), cross_scan_positions(height, width, x.device))
        y = self.out_norm(y.view(batch, height, width, -1))
        return self.out_proj(y * F.silu(z))


class SS1D(DirectionalSSM):
    """Unidirectional Mamba over a token sequence (no conv), (B, L, C) -> (B, L, C): in_proj -> SiLU on both
    halves -> one scan -> LayerNorm (on the float32 mixer output) -> gate by z -> out_proj."""

    def __init__(self, d_model: int, d_state: int = 16, ssm_ratio: float = 2.0,
                 mixer: type[TokenMixer] = SelectiveScanMixer):
        d_inner = int(ssm_ratio * d_model)
        super().__init__(d_inner, d_state, dt_rank_for(d_model), num_directions=1, mixer=mixer)
        self.in_proj = Linear(d_model, 2 * d_inner, bias=False)
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = Linear(d_inner, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, z = F.silu(self.in_proj(x)).chunk(2, dim=-1)
        y = self.scan(x.contiguous(), sequence_positions(x.shape[1], x.device))
        return self.out_proj(self.out_norm(y) * z)
