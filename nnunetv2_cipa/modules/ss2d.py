"""Selective-scan token mixers: SS2D (VMamba cross-scan over a 2D grid) and SS1D (one direction over a sequence).

Both hold VMamba's per-direction SSM parameters under the official names (``x_proj_weight``, ``dt_projs_weight``,
``dt_projs_bias``, ``A_logs``, ``Ds``) so that ImageNet VMamba checkpoints map onto them key by key.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_cipa.modules.linear import Linear, linear
from nnunetv2_cipa.ops.directional_scan import directional_scan


@functools.lru_cache(maxsize=64)
def _cross_scan_positions(height: int, width: int, device: torch.device) -> torch.Tensor:
    rows = torch.arange(height * width, device=device)
    cols = rows.view(height, width).t().reshape(-1)
    return torch.stack([rows, cols, rows.flip(0), cols.flip(0)])


def cross_scan_positions(height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """VMamba's 4 scan orders of an H x W map, (4, H*W) int64: step t of direction k visits row-major position
    ``[k, t]``; k = 0 row-major, 1 column-major (step w*H + h visits h*W + w), 2 and 3 the same reversed."""
    return _cross_scan_positions(height, width, torch.device(device))


def sequence_positions(length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The one scan order of a token sequence, (1, L) int64."""
    return _cross_scan_positions(1, length, torch.device(device))[:1]


def linspace(start: float, stop: float, num: int) -> list[float]:
    """``num`` evenly spaced floats from start to stop (drop-path schedules; works under a meta device)."""
    return [start + (stop - start) * i / max(num - 1, 1) for i in range(num)]


def dt_rank_for(d_model: int) -> int:
    """VMamba's ``dt_rank="auto"``: ceil(d_model / 16)."""
    return math.ceil(d_model / 16)


class DirectionalSSM(nn.Module):
    """Per-direction selective-scan parameters and the scan itself: (B, L, D) scanned in K orders -> (B, L, D).

    ``use_mamba=False`` gives the no-Mamba control: a memoryless gated mixer with the same projections,
    y_t = D*u_t + softplus(dt_t + bias) * u_t * sum_n(state_weight[d, n] * B_t[n] * C_t[n]) (``state_weight``
    replaces ``A_logs`` parameter for parameter); nothing is carried between positions, so token mixing comes
    only from the depthwise convolution (MambaOut-style gated CNN).
    """

    def __init__(self, d_inner: int, d_state: int, dt_rank: int, num_directions: int, use_mamba: bool = True,
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4):
        super().__init__()
        self.d_state, self.dt_rank, self.num_directions, self.use_mamba = d_state, dt_rank, num_directions, use_mamba
        k = num_directions
        self.x_proj_weight = nn.Parameter(torch.empty(k, dt_rank + 2 * d_state, d_inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d_inner, dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(k, d_inner))
        state = torch.empty(k * d_inner, d_state)
        if use_mamba:
            self.A_logs = nn.Parameter(state)
        else:
            self.state_weight = nn.Parameter(state)
        self.Ds = nn.Parameter(torch.empty(k * d_inner))
        self._dt_range = (dt_min, dt_max, dt_floor)
        for name in ("dt_projs_bias", "A_logs" if use_mamba else "state_weight", "Ds"):
            getattr(self, name)._no_weight_decay = True
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba init: x_proj U(+-1/sqrt(D)), dt_proj U(+-1/sqrt(R)), dt bias = softplus^-1(log-uniform dt),
        A_logs = log(1..N), Ds = 1 (the memoryless control starts from state_weight = 1)."""
        dt_min, dt_max, dt_floor = self._dt_range
        d_inner = self.x_proj_weight.shape[-1]
        nn.init.uniform_(self.x_proj_weight, -d_inner ** -0.5, d_inner ** -0.5)
        nn.init.uniform_(self.dt_projs_weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        dt = torch.exp(torch.rand_like(self.dt_projs_bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_floor)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        if self.use_mamba:
            self.A_logs.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand_as(self.A_logs))
        else:
            self.state_weight.fill_(1.0)
        self.Ds.fill_(1.0)

    def scan(self, u: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, L, D): direction k scans u in the order ``positions[k]`` with its own projections and
        one B/C group; the K outputs are summed in position order. The projections are position-wise, so they are
        computed in position order, once for all directions."""
        batch, length, dim = u.shape
        k = self.num_directions
        x_dbl = linear(u, self.x_proj_weight.flatten(0, 1)).view(batch, length, k, -1)  # (B, L, K, R + 2N)
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=3)
        delta = torch.bmm(dts.reshape(batch * length, k, self.dt_rank).transpose(0, 1),
                          self.dt_projs_weight.transpose(1, 2)).view(k, batch, length, dim)  # (K, B, L, D)
        if not self.use_mamba:
            return self._memoryless(u, delta, Bs, Cs)
        return directional_scan(u, delta, -torch.exp(self.A_logs.float()), Bs, Cs, positions, D=self.Ds,
                                delta_bias=self.dt_projs_bias.flatten(), delta_softplus=True)

    def _memoryless(self, u, delta, Bs, Cs) -> torch.Tensor:
        """No-Mamba control, u (B, L, D), delta (K, B, L, D), Bs, Cs (B, L, K, N) -> (B, L, D), summed over the
        directions (see the class docstring; position-wise, so the scan orders do not matter)."""
        k, dim = self.num_directions, u.shape[-1]
        delta = F.softplus(delta + self.dt_projs_bias[:, None, None, :])
        weight = self.state_weight.view(k, dim, self.d_state).to(Bs.dtype)
        mixed = torch.einsum("blkn,kdn->kbld", Bs * Cs, weight)
        return u * (self.Ds.view(k, dim).sum(0) + (delta * mixed).sum(0))


class SS2D(DirectionalSSM):
    """VMamba SS2D on channels-last maps, (B, H, W, C) -> (B, H, W, C): in_proj -> depthwise conv + SiLU ->
    4-direction cross-scan + cross-merge (one ``directional_scan`` over the map) -> LayerNorm -> SiLU(z) gate ->
    out_proj."""

    def __init__(self, d_model: int, d_state: int = 16, ssm_ratio: float = 2.0, d_conv: int = 3,
                 use_mamba: bool = True):
        d_inner = int(ssm_ratio * d_model)
        super().__init__(d_inner, d_state, dt_rank_for(d_model), num_directions=4, use_mamba=use_mamba)
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
    halves -> one scan -> LayerNorm -> gate by z -> out_proj."""

    def __init__(self, d_model: int, d_state: int = 16, ssm_ratio: float = 2.0, use_mamba: bool = True):
        d_inner = int(ssm_ratio * d_model)
        super().__init__(d_inner, d_state, dt_rank_for(d_model), num_directions=1, use_mamba=use_mamba)
        self.in_proj = Linear(d_model, 2 * d_inner, bias=False)
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = Linear(d_inner, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, z = F.silu(self.in_proj(x)).chunk(2, dim=-1)
        y = self.scan(x.contiguous(), sequence_positions(x.shape[1], x.device))
        return self.out_proj(self.out_norm(y) * z)
