"""CIPA for nnU-Net: shared VMamba encoder for CT and PET, per-stage CRM + DCIM fusion, Mamba decoder.

The structure (stage widths, depths, strides, DCIM stems, decoder stages, drop-path rates, output upsampling) is
derived in one place, :class:`CIPAConfig`; the modules receive those lists. docs/architecture.md describes the blocks,
the shapes of a 512 x 512 forward pass and the decisions taken on the official code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_cipa.modules.checkpointing import maybe_checkpoint
from nnunetv2_cipa.modules.crm import ChannelRectification
from nnunetv2_cipa.modules.dcim import DualCrossInteraction
from nnunetv2_cipa.modules.decoder import CIPADecoder
from nnunetv2_cipa.modules.ss2d import TOKEN_MIXERS
from nnunetv2_cipa.modules.vmamba import VMambaEncoder

OFFICIAL_INPUT_SCALE_SHIFT = (3.2, -1.6)  # the official model maps [0, 1] inputs to [-1.6, 1.6]
AUTOCAST_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)


def linspace(start: float, stop: float, num: int) -> list[float]:
    """``num`` evenly spaced floats from start to stop (drop-path schedules; plain floats, no tensor)."""
    return [start + (stop - start) * i / max(num - 1, 1) for i in range(num)]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(ok: bool, field: str, value, requirement: str) -> None:
    if not ok:
        raise ValueError(f"CIPAConfig.{field}={value!r}: {requirement}")


@dataclass(frozen=True)
class CIPAConfig:
    """Every architecture constant of one CIPA model; the per-stage structure is derived from it by the properties
    below. Stage i has width ``embed_dim * 2**i`` at stride ``patch * 2**i``. Invalid values raise ValueError
    naming the field."""

    embed_dim: int
    depths: tuple[int, ...]         # VSS blocks per encoder stage; its length is the number of stages (>= 2)
    d_state: int                    # encoder and DCIM SS2D state size
    drop_path_rate: float           # encoder, evenly spaced over all blocks
    checkpoint: str | None          # matching ImageNet VMamba v0 checkpoint file name
    ssm_ratio: float = 2.0          # d_inner = ssm_ratio * d_model (encoder, DCIM, decoder)
    d_conv: int = 3                 # depthwise conv before each 2D scan (odd)
    patch: int = 4                  # stem kernel and stride, and the output upsampling factor (a power of two)
    crm_token_dim: int = 96         # CRM channel-token width
    crm_d_state: int = 16
    crm_ssm_ratio: float = 2.0
    window: int = 4                 # DCIM window side (window**2 words; a power of two)
    ct_stem_reduction: int = 4      # DCIM CT stem: C -> C / r -> C
    pet_stem_reduction: int = 16    # DCIM PET stem: C -> C / r, doubled by each stride-2 conv, -> C
    decoder_depth: int = 4          # CVSS blocks per up-stage
    decoder_d_state: int = 4
    decoder_drop_path_rate: float = 0.1
    cab_compress: int = 3           # CAB hidden width = C // cab_compress
    cab_squeeze: int = 30           # channel attention hidden width = C // cab_squeeze (at least 1)

    def __post_init__(self):
        depths = tuple(self.depths) if isinstance(self.depths, (tuple, list)) else self.depths
        object.__setattr__(self, "depths", depths)
        _require(isinstance(depths, tuple) and len(depths) >= 2 and all(_is_int(d) and d >= 1 for d in depths),
                 "depths", depths, "must list two or more positive block counts, one per stage")
        for name in ("embed_dim", "d_state", "d_conv", "patch", "crm_token_dim", "crm_d_state", "window",
                     "ct_stem_reduction", "pet_stem_reduction", "decoder_depth", "decoder_d_state", "cab_compress",
                     "cab_squeeze"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 1, name, value, "must be a positive integer")
        for name in ("drop_path_rate", "decoder_drop_path_rate"):
            value = getattr(self, name)
            _require(isinstance(value, (int, float)) and 0 <= value < 1, name, value, "must be in [0, 1)")
        for name, width in (("ssm_ratio", self.embed_dim), ("crm_ssm_ratio", self.crm_token_dim)):
            value = getattr(self, name)
            _require(isinstance(value, (int, float)) and int(value * width) >= 1, name, value,
                     f"must be a number giving at least one inner channel for width {width}")
        _require(self.d_conv % 2 == 1, "d_conv", self.d_conv, "must be odd (the depthwise convolution keeps the size)")
        _require(self.patch & (self.patch - 1) == 0, "patch", self.patch,
                 "must be a power of two (the output head upsamples in x2 steps)")
        _require(self.window & (self.window - 1) == 0, "window", self.window,
                 "must be a power of two (the PET stem reaches one token per window in stride-2 steps)")
        for name in ("ct_stem_reduction", "pet_stem_reduction", "cab_compress"):
            _require(getattr(self, name) <= self.embed_dim, name, getattr(self, name),
                     f"must not exceed embed_dim ({self.embed_dim}): the narrowest stage would get no channels")
        _require(self.checkpoint is None or isinstance(self.checkpoint, str), "checkpoint", self.checkpoint,
                 "must be a file name or None")

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def dims(self) -> tuple[int, ...]:
        """Width of each stage (encoder, fusion, decoder): embed_dim * 2**i."""
        return tuple(self.embed_dim * 2 ** i for i in range(self.num_stages))

    @property
    def strides(self) -> tuple[int, ...]:
        """Downsampling of each stage's maps relative to the input: patch * 2**i."""
        return tuple(self.patch * 2 ** i for i in range(self.num_stages))

    @property
    def encoder_stride(self) -> int:
        """Total stride of the encoder; the input is padded to a multiple of it."""
        return self.strides[-1]

    @property
    def deep_supervision_strides(self) -> tuple[int, ...]:
        """Strides of the auxiliary outputs, one per decoder up-stage (every stage but the deepest)."""
        return self.strides[:-1]

    @property
    def encoder_drop_paths(self) -> tuple[tuple[float, ...], ...]:
        """Drop-path rate of every encoder block, per stage: evenly spaced from 0 over all blocks."""
        rates = linspace(0.0, self.drop_path_rate, sum(self.depths))
        starts = [sum(self.depths[:i]) for i in range(self.num_stages)]
        return tuple(tuple(rates[s:s + d]) for s, d in zip(starts, self.depths))

    @property
    def decoder_drop_paths(self) -> tuple[tuple[float, ...], ...]:
        """Drop-path rates of the up-stage at each stage i < last (finest first): evenly spaced from 0 over
        num_stages * decoder_depth slots, stage i taking slots i*depth .. (i+1)*depth - 1 (the deepest stage's slots
        stay unused, as in the official decoder)."""
        depth = self.decoder_depth
        rates = linspace(0.0, self.decoder_drop_path_rate, self.num_stages * depth)
        return tuple(tuple(rates[i * depth:(i + 1) * depth]) for i in range(self.num_stages - 1))

    @property
    def ct_stem_widths(self) -> tuple[tuple[int, ...], ...]:
        """DCIM CT stem widths per stage: (C, C // ct_stem_reduction, C)."""
        return tuple((c, c // self.ct_stem_reduction, c) for c in self.dims)

    @property
    def pet_stem_strides(self) -> tuple[int, ...]:
        """DCIM PET stem conv strides: 1, then log2(window) times 2, then 1 (one token per window)."""
        return (1, *[2] * (self.window.bit_length() - 1), 1)

    @property
    def pet_stem_widths(self) -> tuple[tuple[int, ...], ...]:
        """DCIM PET stem widths per stage: C, then C * 2**j // pet_stem_reduction after conv j, then C."""
        steps = len(self.pet_stem_strides) - 1
        return tuple((c, *(c * 2 ** j // self.pet_stem_reduction for j in range(steps)), c) for c in self.dims)


PRESETS: dict[str, CIPAConfig] = {
    "tiny": CIPAConfig(96, (2, 2, 9, 2), 16, 0.0, "vssmtiny_dp01_ckpt_epoch_292.pth"),
    "small": CIPAConfig(96, (2, 2, 27, 2), 16, 0.3, "vssmsmall_dp03_ckpt_epoch_238.pth"),
    "base": CIPAConfig(128, (2, 2, 27, 2), 16, 0.6, "vssmbase_dp06_ckpt_epoch_241.pth"),
    "micro": CIPAConfig(16, (1, 1, 1, 1), 4, 0.0, None, ssm_ratio=1.0, crm_token_dim=16, crm_d_state=4, decoder_depth=1,
                        decoder_d_state=2, decoder_drop_path_rate=0.0),
}


def deep_supervision_size(size: tuple[int, int], stride: int) -> tuple[int, int]:
    """Target size nnU-Net's DownsampleSegForDSTransform gives for scale 1/stride: Python round() per axis."""
    return tuple(round(s * (1 / stride)) for s in size)


def two_class_logits(z: torch.Tensor) -> torch.Tensor:
    """One sigmoid logit (B, 1, H, W) -> the two-class logits [0, z] (B, 2, H, W): softmax gives
    [1 - sigmoid(z), sigmoid(z)] and argmax is sigmoid(z) > 0.5; channel 1 is z itself."""
    return torch.cat([torch.zeros_like(z), z], dim=1)


class CIPA(nn.Module):
    """CIPA, (B, in_channels, H, W) -> logits (B, num_classes, H, W), with H, W <= the padded ``patch_size``.

    ``preset``: a name in ``PRESETS`` or a :class:`CIPAConfig`. With ``deep_supervision`` True, returns
    [main, aux at each of ``deep_supervision_strides``]; the aux output at stride s has the size
    ``deep_supervision_size((H, W), s)``. Ablations: ``use_crm``/``use_dcim`` select the official fusion branches
    (both: ct + pet + DCIM(CRM(ct, pet)); CRM only: ct' + pet'; DCIM only: ct + pet + DCIM(ct, pet); neither:
    ct + pet). ``token_mixer`` names the mixer of every SS2D/SS1D in ``TOKEN_MIXERS``: ``"selective_scan"`` (CIPA)
    or ``"memoryless"`` (the parameter-matched no-Mamba control). ``binary_logit`` (needs ``num_classes=2``): the
    heads have one output channel z (the official head) and every output is ``two_class_logits(z)``, so channel 1 of
    each output is the raw logit for a sigmoid loss. ``input_scale``/``input_shift`` map the input affinely first
    (official: x*3.2 - 1.6 on [0, 1] inputs). ``autocast_dtype`` fixes the precision of every forward whatever the
    caller's autocast: None follows the caller, ``torch.float32`` runs without autocast, ``torch.bfloat16`` /
    ``torch.float16`` under autocast to that type, with float32 outputs (the loss outside is computed in float32).
    Setting ``activation_checkpointing`` recomputes every encoder
    stage, fusion stage and decoder stage in backward instead of keeping their activations.
    """

    def __init__(self, num_classes: int, patch_size, preset: str | CIPAConfig = "tiny", in_channels: int = 2,
                 ct_channel: int = 0, pet_channel: int = 1, use_crm: bool = True, use_dcim: bool = True,
                 token_mixer: str = "selective_scan", deep_supervision: bool = False, binary_logit: bool = False,
                 input_scale: float = OFFICIAL_INPUT_SCALE_SHIFT[0],
                 input_shift: float = OFFICIAL_INPUT_SCALE_SHIFT[1], autocast_dtype: torch.dtype | None = None):
        super().__init__()
        cfg = _resolve_config(preset)
        if token_mixer not in TOKEN_MIXERS:
            raise ValueError(f"CIPA: unknown token_mixer {token_mixer!r}; choose one of {sorted(TOKEN_MIXERS)}")
        if not _is_int(num_classes):
            raise TypeError(f"CIPA: num_classes must be an int, got {type(num_classes).__name__}")
        if num_classes < 1 or (binary_logit and num_classes != 2):
            raise ValueError(f"CIPA: num_classes={num_classes}: need >= 1, and exactly 2 with binary_logit")
        patch_size = tuple(int(s) for s in patch_size)
        if len(patch_size) != 2 or min(patch_size) < 1:
            raise ValueError(f"CIPA: patch_size must be two positive ints (a 2D patch), got {patch_size}")
        for name, idx in (("ct_channel", ct_channel), ("pet_channel", pet_channel)):
            if not 0 <= idx < in_channels:
                raise ValueError(f"CIPA: {name}={idx} is not a channel of the {in_channels}-channel input")
        if ct_channel == pet_channel:
            raise ValueError(f"CIPA: ct_channel and pet_channel must differ, both are {ct_channel}")
        if autocast_dtype not in AUTOCAST_DTYPES:
            raise ValueError(f"CIPA: autocast_dtype must be one of {AUTOCAST_DTYPES}, got {autocast_dtype!r}")
        mixer = TOKEN_MIXERS[token_mixer]
        self.config, self.num_classes, self.patch_size, self.token_mixer = cfg, num_classes, patch_size, token_mixer
        self.in_channels, self.ct_channel, self.pet_channel = in_channels, ct_channel, pet_channel
        self.input_scale, self.input_shift, self.binary_logit = input_scale, input_shift, binary_logit
        self.autocast_dtype = autocast_dtype
        stride = cfg.encoder_stride
        self.padded_patch_size = tuple(math.ceil(s / stride) * stride for s in patch_size)
        self.stage_sizes = tuple((self.padded_patch_size[0] // s, self.padded_patch_size[1] // s) for s in cfg.strides)

        self.encoder = VMambaEncoder(cfg.dims, cfg.encoder_drop_paths, cfg.d_state, cfg.ssm_ratio, cfg.d_conv,
                                     cfg.patch, in_channels=1, mixer=mixer)
        self.crm = nn.ModuleList(
            ChannelRectification(dim, h * w, cfg.crm_token_dim, cfg.crm_d_state, cfg.crm_ssm_ratio, mixer)
            for dim, (h, w) in zip(cfg.dims, self.stage_sizes)) if use_crm else None
        self.dcim = nn.ModuleList(
            DualCrossInteraction(cfg.window, ct_widths, pet_widths, cfg.pet_stem_strides, cfg.d_state, cfg.ssm_ratio,
                                 cfg.d_conv, mixer)
            for ct_widths, pet_widths in zip(cfg.ct_stem_widths, cfg.pet_stem_widths)) if use_dcim else None
        self.decoder = CIPADecoder(cfg.dims, 1 if binary_logit else num_classes, cfg.decoder_drop_paths, cfg.patch,
                                   cfg.decoder_d_state, cfg.ssm_ratio, cfg.d_conv, cfg.cab_compress, cfg.cab_squeeze,
                                   mixer)
        self.deep_supervision = deep_supervision

    @property
    def deep_supervision(self) -> bool:
        """Whether ``forward`` returns the deep-supervision list (stored on the decoder, as nnU-Net expects)."""
        return self.decoder.deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, enabled: bool) -> None:
        self.decoder.deep_supervision = bool(enabled)

    @property
    def deep_supervision_strides(self) -> tuple[int, ...]:
        """Strides of the auxiliary outputs (after the main output) in deep-supervision mode, e.g. (4, 8, 16)."""
        return self.config.deep_supervision_strides

    @property
    def min_training_batch(self) -> int:
        """Smallest batch that trains: 2 when DCIM's BatchNorm would see one PET token per channel (a deepest stage
        map of at most one window), else 1."""
        height, width = self.stage_sizes[-1]
        window = self.config.window
        single_token = math.ceil(height / window) * math.ceil(width / window) == 1
        return 2 if self.dcim is not None and single_token else 1

    @property
    def activation_checkpointing(self) -> bool:
        """Whether encoder, fusion and decoder stages are recomputed in backward (off by default)."""
        return self.encoder.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, enabled: bool) -> None:
        self.encoder.activation_checkpointing = self.decoder.activation_checkpointing = bool(enabled)

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
        if self.autocast_dtype is None:
            return self._forward(x)
        enabled = self.autocast_dtype != torch.float32
        with torch.autocast(x.device.type, dtype=self.autocast_dtype if enabled else None, enabled=enabled):
            outputs = self._forward(x)
        return [o.float() for o in outputs] if isinstance(outputs, list) else outputs.float()

    def _forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        batch, channels, height, width = x.shape
        pad_h, pad_w = self.padded_patch_size[0] - height, self.padded_patch_size[1] - width
        if channels != self.in_channels or pad_h < 0 or pad_w < 0:
            raise ValueError(f"CIPA: expected input (B, {self.in_channels}, H <= {self.padded_patch_size[0]}, "
                             f"W <= {self.padded_patch_size[1]}), got {tuple(x.shape)}")
        x = F.pad(x * self.input_scale + self.input_shift, (0, pad_w, 0, pad_h))
        modalities = torch.cat([x[:, self.ct_channel:self.ct_channel + 1], x[:, self.pet_channel:self.pet_channel + 1]])
        features = []
        for i, feature in enumerate(self.encoder(modalities)):  # CT and PET stacked along the batch
            fusion = [m[i] for m in (self.crm, self.dcim) if m is not None]
            ct, pet = feature.split(batch)
            features.append(maybe_checkpoint(self.activation_checkpointing, fusion, self.fuse, i, ct, pet))
        logits, aux = self.decoder(features)
        outputs = [logits[:, :, :height, :width]]
        if aux is not None:
            outputs += [_crop_or_resize(a, (height, width), s) for a, s in zip(aux, self.deep_supervision_strides)]
        if self.binary_logit:
            outputs = [two_class_logits(o) for o in outputs]
        return outputs if aux is not None else outputs[0]


def _resolve_config(preset: str | CIPAConfig) -> CIPAConfig:
    if isinstance(preset, CIPAConfig):
        return preset
    if not isinstance(preset, str):
        raise TypeError(f"CIPA: preset must be a preset name or a CIPAConfig, got {type(preset).__name__}")
    if preset not in PRESETS:
        raise ValueError(f"CIPA: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset]


def _crop_or_resize(aux: torch.Tensor, size: tuple[int, int], stride: int) -> torch.Tensor:
    """Aux logits on the padded grid -> nnU-Net's target size for scale 1/stride: crop the cells covering the
    input (ceil(size/stride)), then bilinearly resize if rounding differs (only when stride does not divide size)."""
    target = deep_supervision_size(size, stride)
    aux = aux[:, :, :math.ceil(size[0] / stride), :math.ceil(size[1] / stride)]
    if tuple(aux.shape[2:]) != target:
        aux = F.interpolate(aux, size=target, mode="bilinear", align_corners=False)
    return aux
