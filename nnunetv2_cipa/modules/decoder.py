"""CIPA's Mamba decoder: PatchExpand, up-stages of CVSS blocks with additive skips, upsampling head.
See docs/architecture.md, "Decoder and heads"."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.regularization import DropPath
from torch import nn

from nnunetv2_cipa.modules.checkpointing import maybe_checkpoint
from nnunetv2_cipa.modules.linear import Linear
from nnunetv2_cipa.modules.ss2d import SS2D, SelectiveScanMixer, TokenMixer


def _upsample2x(x: torch.Tensor) -> torch.Tensor:
    """Bilinear x2 on channels-last maps, (B, H, W, C) -> (B, 2H, 2W, C)."""
    x = F.interpolate(x.permute(0, 3, 1, 2), scale_factor=2, mode="bilinear", align_corners=False)
    return x.permute(0, 2, 3, 1)


class PatchExpand(nn.Module):
    """Linear(C -> 2C) + pixel shuffle (p1, p2, c) + LN, (B, H, W, C) -> (B, 2H, 2W, C/2)."""

    def __init__(self, dim: int):
        super().__init__()
        self.expand = Linear(dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(dim // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, dim = x.shape
        x = self.expand(x).view(batch, height, width, 2, 2, dim // 2)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, 2 * height, 2 * width, dim // 2)
        return self.norm(x)


class UpsampleExpand(nn.Module):
    """Linear(C -> C/2) + bilinear x2 + LN, (B, H, W, C) -> (B, 2H, 2W, C/2)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = Linear(dim, dim // 2, bias=False)
        self.norm = nn.LayerNorm(dim // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(_upsample2x(self.linear(x)))


class ChannelAttention(nn.Module):
    """x * sigmoid(MLP(avgpool x) + MLP(maxpool x)), (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, dim: int, squeeze: int):
        super().__init__()
        hidden = max(dim // squeeze, 1)
        self.mlp = nn.Sequential(nn.Conv2d(dim, hidden, 1, bias=False), nn.SiLU(),
                                 nn.Conv2d(hidden, dim, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.mlp(x.mean(dim=(2, 3), keepdim=True)) + self.mlp(x.amax(dim=(2, 3), keepdim=True))
        return x * torch.sigmoid(attn)


class ConvChannelAttention(nn.Module):
    """CAB: Conv3x3(C -> C/compress) + GELU + Conv3x3(-> C) + channel attention, (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, dim: int, compress: int, squeeze: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(dim, dim // compress, 3, padding=1), nn.GELU(),
                                  nn.Conv2d(dim // compress, dim, 3, padding=1), ChannelAttention(dim, squeeze))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class CVSSBlock(nn.Module):
    """Decoder block on (B, H, W, C): x = in*scale1 + DropPath(SS2D(LN1 in)); out = CAB(LN2 x) + x*scale2."""

    def __init__(self, dim: int, d_state: int, ssm_ratio: float, d_conv: int, drop_path: float,
                 cab_compress: int, cab_squeeze: int, mixer: type[TokenMixer] = SelectiveScanMixer):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.scale1 = nn.Parameter(torch.ones(dim))
        self.op = SS2D(dim, d_state, ssm_ratio, d_conv, mixer=mixer)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.scale2 = nn.Parameter(torch.ones(dim))
        self.cab = ConvChannelAttention(dim, cab_compress, cab_squeeze)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.scale1 + self.drop_path(self.op(self.norm1(x)))
        local = self.cab(self.norm2(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return local + x * self.scale2


class DecoderUpStage(nn.Module):
    """CVSS blocks then (optionally) UpsampleExpand, (B, H, W, C) -> (features (B, H, W, C), next input)."""

    def __init__(self, dim: int, drop_paths: list[float], upsample: bool, **block_kwargs):
        super().__init__()
        self.blocks = nn.ModuleList(CVSSBlock(dim, drop_path=p, **block_kwargs) for p in drop_paths)
        self.upsample = UpsampleExpand(dim) if upsample else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for block in self.blocks:
            x = block(x)
        return x, (self.upsample(x) if self.upsample is not None else x)


class FinalUpsample(nn.Module):
    """(Linear + bilinear x2) log2(factor) times, then LN: (B, H, W, C) -> (B, factor*H, factor*W, C).
    The linear layers are ``linear1``, ``linear2``, ... (for the stem patch 4: two of them)."""

    def __init__(self, dim: int, factor: int):
        super().__init__()
        self._linears = [f"linear{j + 1}" for j in range(factor.bit_length() - 1)]
        for name in self._linears:
            self.add_module(name, Linear(dim, dim, bias=False))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self._linears:
            x = _upsample2x(getattr(self, name)(x))
        return self.norm(x)


class AuxHead(nn.Module):
    """Deep-supervision head LN + Conv1x1 (no bias), (B, H, W, C) -> (B, K, H, W)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv = nn.Conv2d(dim, num_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(x).permute(0, 3, 1, 2))


class CIPADecoder(nn.Module):
    """Fused features [(B, dims[i], H / s_i, W / s_i) for each stage i], s_i = patch * 2**i ->
    (logits (B, K, H, W), aux logits [(B, K, H / s_i, W / s_i) for i < last] or None without ``deep_supervision``).

    PatchExpand takes the deepest map up one stage; up-stage i (from the second-deepest stage to stage 0) adds the
    skip, runs one CVSS block per rate in ``drop_paths[i]`` and, except at stage 0, upsamples x2; the head
    normalises, upsamples by ``patch`` and applies a 1x1 convolution to K = ``out_channels``. The aux heads always
    exist (so state_dict keys do not depend on the flag); head i reads up-stage i's output before upsampling. With
    ``activation_checkpointing`` every up-stage and the head are recomputed in backward.
    """

    def __init__(self, dims: list[int], out_channels: int, drop_paths: list[list[float]], patch: int, d_state: int,
                 ssm_ratio: float, d_conv: int, cab_compress: int, cab_squeeze: int,
                 mixer: type[TokenMixer] = SelectiveScanMixer):
        super().__init__()
        self.deep_supervision = False
        self.activation_checkpointing = False
        block_kwargs = dict(d_state=d_state, ssm_ratio=ssm_ratio, d_conv=d_conv, cab_compress=cab_compress,
                            cab_squeeze=cab_squeeze, mixer=mixer)
        up_stages = list(reversed(range(len(dims) - 1)))  # deepest skip first
        self.patch_expand = PatchExpand(dims[-1])
        self.stages = nn.ModuleList(DecoderUpStage(dims[i], drop_paths[i], upsample=i > 0, **block_kwargs)
                                    for i in up_stages)
        self.norm_up = nn.LayerNorm(dims[0])
        self.final_upsample = FinalUpsample(dims[0], patch)
        self.head = nn.Conv2d(dims[0], out_channels, 1, bias=False)
        self.aux_heads = nn.ModuleList(AuxHead(dim, out_channels) for dim in dims[:-1])
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")

    def _up_stage(self, stage: DecoderUpStage, x: torch.Tensor, skip: torch.Tensor):
        return stage(x + skip.permute(0, 2, 3, 1))

    def _output(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.final_upsample(self.norm_up(x)).permute(0, 3, 1, 2))

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        ckpt = self.activation_checkpointing
        x = self.patch_expand(features[-1].permute(0, 2, 3, 1))
        stage_outputs = []  # stage order: deepest skip first
        for stage, skip in zip(self.stages, reversed(features[:-1])):
            out, x = maybe_checkpoint(ckpt, [stage], self._up_stage, stage, x, skip)
            stage_outputs.append(out)
        logits = maybe_checkpoint(ckpt, [self.norm_up, self.final_upsample, self.head], self._output, x)
        if not self.deep_supervision:
            return logits, None
        return logits, [head(out) for head, out in zip(self.aux_heads, reversed(stage_outputs))]
