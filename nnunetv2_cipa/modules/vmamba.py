"""The VMamba-v0 encoder CIPA shares between CT and PET (Siamese): patch embedding, VSS blocks, patch merging.
See docs/architecture.md, "Shared VMamba encoder"."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.regularization import DropPath
from torch import nn

from nnunetv2_cipa.modules.checkpointing import maybe_checkpoint
from nnunetv2_cipa.modules.linear import Linear
from nnunetv2_cipa.modules.ss2d import SS2D, SelectiveScanMixer, TokenMixer


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

    def __init__(self, dim: int, d_state: int, ssm_ratio: float, d_conv: int, drop_path: float,
                 mixer: type[TokenMixer] = SelectiveScanMixer):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.op = SS2D(dim, d_state, ssm_ratio, d_conv, mixer=mixer)
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
    """One VSS block per drop-path rate, at one resolution, (B, H, W, C) -> (B, H, W, C)."""

    def __init__(self, dim: int, drop_paths: list[float], d_state: int, ssm_ratio: float, d_conv: int,
                 mixer: type[TokenMixer] = SelectiveScanMixer):
        super().__init__()
        self.blocks = nn.ModuleList(VSSBlock(dim, d_state, ssm_ratio, d_conv, p, mixer) for p in drop_paths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class VMambaEncoder(nn.Module):
    """Shared VMamba encoder, (B, in, H, W) -> [(B, dims[i], H / strides[i], W / strides[i]) for each stage] (NCHW),
    strides[i] = patch * 2**i; stage i has one block per entry of ``drop_paths[i]``.

    Each stage output is taken before downsampling and normalised by its own ``out_norms[i]`` (new, not in the
    ImageNet checkpoint). H and W must be multiples of the last stride (the network pads to that). With
    ``activation_checkpointing`` each stage (with the downsampling or patch embedding before it) is recomputed in
    backward instead of keeping its activations.
    """

    def __init__(self, dims: list[int], drop_paths: list[list[float]], d_state: int, ssm_ratio: float, d_conv: int,
                 patch: int, in_channels: int = 1, mixer: type[TokenMixer] = SelectiveScanMixer):
        super().__init__()
        self.dims = list(dims)
        self.activation_checkpointing = False
        self.patch_embed = PatchEmbed(in_channels, dims[0], patch)
        self.stages = nn.ModuleList(VSSStage(dim, rates, d_state, ssm_ratio, d_conv, mixer)
                                    for dim, rates in zip(dims, drop_paths))
        self.downsamples = nn.ModuleList(PatchMerging2D(dim) for dim in dims[:-1])
        self.out_norms = nn.ModuleList(nn.LayerNorm(dim) for dim in dims)
        self.apply(_init_vmamba)

    def _stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Stage i on the previous stage's output (or the image for i = 0), channels-last."""
        x = self.patch_embed(x) if i == 0 else self.downsamples[i - 1](x)
        return self.stages[i](x)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for i, out_norm in enumerate(self.out_norms):
            x = maybe_checkpoint(self.activation_checkpointing, [self], functools.partial(self._stage, i), x)
            outputs.append(out_norm(x).permute(0, 3, 1, 2).contiguous())
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
