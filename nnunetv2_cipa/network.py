"""CIPA for nnU-Net: shared VMamba encoder for CT and PET, per-stage CRM + DCIM fusion, Mamba decoder.

Padding scheme (any 2D patch size): the input is zero-padded at the bottom/right to the next multiple of 32 (the
encoder's total stride) and the logits are cropped back, so every encoder/decoder map divides exactly. DCIM pads a
stage map to a multiple of its 4x4 window only when needed (see ``DualCrossInteraction``). The CRM's spatial size
is taken from the padded patch size.

Training: every parameter is trainable and reached by the gradient. This deviates on purpose from the official
optimizer grouping, which left 8.67 M SSM parameters (x_proj/dt_proj weights, dt biases, A_logs, Ds, decoder
scale1/scale2) out of AdamW and so froze them; A_logs, Ds and dt biases carry ``_no_weight_decay = True``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_cipa.errors import InputError
from nnunetv2_cipa.modules.crm import ChannelRectification
from nnunetv2_cipa.modules.dcim import DualCrossInteraction
from nnunetv2_cipa.modules.decoder import CIPADecoder
from nnunetv2_cipa.modules.vmamba import VMambaEncoder

DEEP_SUPERVISION_STRIDES = (4, 8, 16)
OFFICIAL_INPUT_SCALE_SHIFT = (3.2, -1.6)  # the official model maps [0, 1] inputs to [-1.6, 1.6]
ENCODER_STRIDE = 32


@dataclass(frozen=True)
class CIPAConfig:
    """Every architecture constant of one preset. Stage i has width ``embed_dim * 2**i``."""

    embed_dim: int
    depths: tuple[int, int, int, int]
    d_state: int                    # encoder and DCIM SS2D state size
    drop_path_rate: float           # encoder, linspace over all blocks
    checkpoint: str | None          # matching ImageNet VMamba v0 checkpoint file name
    ssm_ratio: float = 2.0          # d_inner = ssm_ratio * d_model
    d_conv: int = 3                 # depthwise conv before each 2D scan
    patch: int = 4                  # stem kernel and stride
    crm_token_dim: int = 96         # CRM channel-token width
    crm_d_state: int = 16
    window: int = 4                 # DCIM window side (16 words)
    decoder_depth: int = 4          # CVSS blocks per up-stage
    decoder_d_state: int = 4
    decoder_drop_path_rate: float = 0.1
    cab_compress: int = 3           # CAB hidden width = C // cab_compress
    cab_squeeze: int = 30           # channel attention hidden width = C // cab_squeeze (at least 1)


PRESETS: dict[str, CIPAConfig] = {
    "tiny": CIPAConfig(96, (2, 2, 9, 2), 16, 0.0, "vssmtiny_dp01_ckpt_epoch_292.pth"),
    "small": CIPAConfig(96, (2, 2, 27, 2), 16, 0.3, "vssmsmall_dp03_ckpt_epoch_238.pth"),
    "base": CIPAConfig(128, (2, 2, 27, 2), 16, 0.6, "vssmbase_dp06_ckpt_epoch_241.pth"),
    "micro": CIPAConfig(16, (1, 1, 1, 1), 4, 0.0, None, ssm_ratio=1.0, crm_token_dim=16, crm_d_state=4, decoder_depth=1,
                        decoder_d_state=2, decoder_drop_path_rate=0.0),
}


def padded_size(patch_size: tuple[int, ...]) -> tuple[int, int]:
    """Patch size rounded up per axis to a multiple of the encoder stride (32)."""
    return tuple(math.ceil(s / ENCODER_STRIDE) * ENCODER_STRIDE for s in patch_size)


def deep_supervision_size(size: tuple[int, int], stride: int) -> tuple[int, int]:
    """Target size nnU-Net's DownsampleSegForDSTransform gives for scale 1/stride: Python round() per axis."""
    return tuple(round(s * (1 / stride)) for s in size)


class CIPA(nn.Module):
    """CIPA, (B, in_channels, H, W) -> logits (B, num_classes, H, W), with H, W <= the padded ``patch_size``.

    With ``deep_supervision`` True, returns [main, aux stride 4, aux stride 8, aux stride 16]; aux i has the size
    ``deep_supervision_size((H, W), stride)``. Ablations: ``use_crm``/``use_dcim`` select the official fusion
    branches (both: ct + pet + DCIM(CRM(ct, pet)); CRM only: ct' + pet'; DCIM only: ct + pet + DCIM(ct, pet);
    neither: ct + pet). ``use_mamba=False`` replaces every selective scan by the parameter-matched memoryless gated
    mixer of ``DirectionalSSM`` (the no-Mamba control). ``input_scale``/``input_shift`` map the input affinely
    first (official: x*3.2 - 1.6 on [0, 1] inputs).
    """

    def __init__(self, num_classes: int, patch_size, preset: str = "tiny", in_channels: int = 2,
                 ct_channel: int = 0, pet_channel: int = 1, use_crm: bool = True, use_dcim: bool = True,
                 use_mamba: bool = True, deep_supervision: bool = False,
                 input_scale: float = OFFICIAL_INPUT_SCALE_SHIFT[0],
                 input_shift: float = OFFICIAL_INPUT_SCALE_SHIFT[1]):
        super().__init__()
        if preset not in PRESETS:
            raise InputError(f"CIPA: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        patch_size = tuple(int(s) for s in patch_size)
        if len(patch_size) != 2 or min(patch_size) < 1:
            raise InputError(f"CIPA: patch_size must be two positive ints (a 2D patch), got {patch_size}")
        for name, idx in (("ct_channel", ct_channel), ("pet_channel", pet_channel)):
            if not 0 <= idx < in_channels:
                raise InputError(f"CIPA: {name}={idx} is not a channel of the {in_channels}-channel input")
        if ct_channel == pet_channel:
            raise InputError(f"CIPA: ct_channel and pet_channel must differ, both are {ct_channel}")
        cfg = PRESETS[preset]
        self.config, self.num_classes, self.patch_size = cfg, num_classes, patch_size
        self.in_channels, self.ct_channel, self.pet_channel = in_channels, ct_channel, pet_channel
        self.input_scale, self.input_shift = input_scale, input_shift
        self.padded_patch_size = padded_size(patch_size)

        self.encoder = VMambaEncoder(cfg.embed_dim, cfg.depths, cfg.d_state, cfg.ssm_ratio, cfg.d_conv,
                                     cfg.drop_path_rate, cfg.patch, in_channels=1, use_mamba=use_mamba)
        dims = self.encoder.dims
        maps = [(self.padded_patch_size[0] // (cfg.patch * 2 ** i), self.padded_patch_size[1] // (cfg.patch * 2 ** i))
                for i in range(4)]
        self.crm = nn.ModuleList(
            ChannelRectification(dims[i], maps[i][0] * maps[i][1], cfg.crm_token_dim, cfg.crm_d_state, use_mamba)
            for i in range(4)) if use_crm else None
        self.dcim = nn.ModuleList(
            DualCrossInteraction(dims[i], cfg.window, cfg.d_state, cfg.ssm_ratio, cfg.d_conv, use_mamba)
            for i in range(4)) if use_dcim else None
        self.decoder = CIPADecoder(dims, num_classes, cfg.decoder_depth, cfg.decoder_d_state, cfg.ssm_ratio,
                                   cfg.d_conv, cfg.decoder_drop_path_rate, cfg.cab_compress, cfg.cab_squeeze,
                                   use_mamba)
        self.deep_supervision = deep_supervision

    @property
    def deep_supervision(self) -> bool:
        """Whether ``forward`` returns the deep-supervision list (stored on the decoder, as nnU-Net expects)."""
        return self.decoder.deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, enabled: bool) -> None:
        self.decoder.deep_supervision = bool(enabled)

    def fuse(self, stage: int, ct: torch.Tensor, pet: torch.Tensor) -> torch.Tensor:
        """Fused stage feature from raw encoder features ct, pet (B, C, h, w) -> (B, C, h, w)."""
        if self.crm is not None:
            ct_rect, pet_rect = self.crm[stage](ct, pet)
            if self.dcim is None:
                return ct_rect + pet_rect
            return ct + pet + self.dcim[stage](ct_rect, pet_rect)
        if self.dcim is not None:
            return ct + pet + self.dcim[stage](ct, pet)
        return ct + pet

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        batch, channels, height, width = x.shape
        pad_h, pad_w = self.padded_patch_size[0] - height, self.padded_patch_size[1] - width
        if channels != self.in_channels or pad_h < 0 or pad_w < 0:
            raise ValueError(f"CIPA: expected input (B, {self.in_channels}, H <= {self.padded_patch_size[0]}, "
                             f"W <= {self.padded_patch_size[1]}), got {tuple(x.shape)}")
        x = F.pad(x * self.input_scale + self.input_shift, (0, pad_w, 0, pad_h))
        modalities = torch.cat([x[:, self.ct_channel:self.ct_channel + 1], x[:, self.pet_channel:self.pet_channel + 1]])
        features = [self.fuse(i, *f.split(batch)) for i, f in enumerate(self.encoder(modalities))]
        logits, aux = self.decoder(features)
        logits = logits[:, :, :height, :width]
        if aux is None:
            return logits
        return [logits] + [_crop_or_resize(a, (height, width), s) for a, s in zip(aux, DEEP_SUPERVISION_STRIDES)]


def _crop_or_resize(aux: torch.Tensor, size: tuple[int, int], stride: int) -> torch.Tensor:
    """Aux logits on the padded grid -> nnU-Net's target size for scale 1/stride: crop the cells covering the
    input (ceil(size/stride)), then bilinearly resize if rounding differs (only when stride does not divide size)."""
    target = deep_supervision_size(size, stride)
    aux = aux[:, :, :math.ceil(size[0] / stride), :math.ceil(size[1] / stride)]
    if tuple(aux.shape[2:]) != target:
        aux = F.interpolate(aux, size=target, mode="bilinear", align_corners=False)
    return aux
