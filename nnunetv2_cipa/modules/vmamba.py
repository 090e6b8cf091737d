"""The VMamba-v0 encoder CIPA shares between CT and PET (Siamese): patch embedding, VSS blocks, patch merging."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.regularization import DropPath
from torch import nn

from nnunetv2_cipa.modules.linear import Linear
from nnunetv2_cipa.modules.ss2d import SS2D, linspace


class PatchEmbed(nn.Module):
    """Conv(k=s=patch) + LayerNorm, (B, in, H, W) -> (B, H/p, W/p, C) channels-last."""

    def __init__(self, in_channels: int, dim: int, patch: int = 4):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class VSSBlock(nn.Module):
    """x + DropPath(SS2D(LN(x))) on (B, H, W, C); VMamba-T v0 has no MLP branch (mlp_ratio 0)."""

    def __init__(self, dim: int, d_state: int, ssm_ratio: float, d_conv: int, drop_path: float, use_mamba: bool):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.op = SS2D(dim, d_state, ssm_ratio, d_conv, use_mamba)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.op(self.norm(x)))


class PatchMerging2D(nn.Module):
    """2x2 space-to-depth + LN(4C) + Linear(4C -> 2C), (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[1:3]
        if height % 2 or width % 2:  # odd map: zero-pad one row/column at the bottom/right
            x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class VSSStage(nn.Module):
    """A stack of VSS blocks at one resolution, (B, H, W, C) -> (B, H, W, C)."""

    def __init__(self, dim: int, depth: int, d_state: int, ssm_ratio: float, d_conv: int,
                 drop_paths: list[float], use_mamba: bool):
        super().__init__()
        self.blocks = nn.ModuleList(
            VSSBlock(dim, d_state, ssm_ratio, d_conv, drop_paths[j], use_mamba) for j in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class VMambaEncoder(nn.Module):
    """Shared 4-stage VMamba encoder, (B, 1, H, W) -> [(B, C*2^i, H/2^(i+2), W/2^(i+2)) for i in 0..3] (NCHW).

    Each stage output is taken before downsampling and normalised by its own ``out_norms[i]`` (new, not in the
    ImageNet checkpoint). H and W must be multiples of 32 (the network pads to that).
    """

    def __init__(self, embed_dim: int, depths: tuple[int, ...], d_state: int, ssm_ratio: float, d_conv: int,
                 drop_path_rate: float, patch: int = 4, in_channels: int = 1, use_mamba: bool = True):
        super().__init__()
        dims = [embed_dim * 2 ** i for i in range(len(depths))]
        self.dims = dims
        rates = linspace(0.0, drop_path_rate, sum(depths))
        starts = [sum(depths[:i]) for i in range(len(depths))]
        self.patch_embed = PatchEmbed(in_channels, embed_dim, patch)
        self.stages = nn.ModuleList(
            VSSStage(dims[i], depths[i], d_state, ssm_ratio, d_conv, rates[starts[i]:starts[i] + depths[i]], use_mamba)
            for i in range(len(depths)))
        self.downsamples = nn.ModuleList(PatchMerging2D(dims[i]) for i in range(len(depths) - 1))
        self.out_norms = nn.ModuleList(nn.LayerNorm(d) for d in dims)
        self.apply(_init_vmamba)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(x)
        outputs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            outputs.append(self.out_norms[i](x).permute(0, 3, 1, 2).contiguous())
            if i < len(self.downsamples):
                x = self.downsamples[i](x)
        return outputs


def _init_vmamba(module: nn.Module) -> None:
    """VMamba init for the encoder: Linear trunc_normal(0.02) with zero bias, LayerNorm 1/0 (SSM params keep theirs)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
