"""DCIM, dynamic cross-modality interaction: CT words in w x w windows guided by one PET token per window.
See docs/architecture.md, "DCIM"."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU
from torch import nn

from nnunetv2_cipa.modules.ss2d import SS2D, SelectiveScanMixer, TokenMixer


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> ConvDropoutNormReLU:
    """Conv3x3 (bias) + BatchNorm2d + ReLU, (B, in, H, W) -> (B, out, H/stride, W/stride)."""
    return ConvDropoutNormReLU(nn.Conv2d, in_channels, out_channels, 3, stride, conv_bias=True,
                               norm_op=nn.BatchNorm2d, nonlin=nn.ReLU, nonlin_kwargs={"inplace": True})


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * H/w * W/w, w, w, C); window r = hg*(W/w) + wg holds pixels (w*hg + i, w*wg + j)."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window, window, width // window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, channels)


def window_unpartition(windows: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * H/w * W/w, w, w, C) -> (B, H, W, C)."""
    window, channels = windows.shape[1], windows.shape[-1]
    x = windows.view(-1, height // window, width // window, window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


class ConvStem(nn.Module):
    """Conv-BN-ReLU layers from widths[j] to widths[j + 1] with strides[j], (B, widths[0], H, W) ->
    (B, widths[-1], H / prod(strides), W / prod(strides)); the output is >= 0 (final ReLU).

    DCIM's CT stem is C -> C/r -> C at stride 1; its PET stem C -> C/16 (s1) -> C/8 (s2) -> C/4 (s2) -> C (s1) for
    4 x 4 windows, one token per window (the widths and strides are derived in ``CIPAConfig``).
    """

    def __init__(self, widths: list[int], strides: list[int]):
        super().__init__()
        self.convs = nn.Sequential(*(_conv_bn_relu(c_in, c_out, stride)
                                     for c_in, c_out, stride in zip(widths[:-1], widths[1:], strides)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class RegionGlobalInteraction(nn.Module):
    """CT words (B*N, w, w, C) and PET window tokens (B, h, w', C) -> CT words (B*N, w, w, C).

    PET first: residual 4-direction SS2D over the whole token grid (global). CT second: residual SS2D inside each
    window (LayerNorm jointly over the window's w*w words x C; one grouped scan over B*N sequences of length w*w).
    Each window's PET token is then added to all its words.
    """

    def __init__(self, channels: int, window: int, d_state: int, ssm_ratio: float, d_conv: int,
                 mixer: type[TokenMixer] = SelectiveScanMixer):
        super().__init__()
        self.pet_norm = nn.LayerNorm(channels)
        self.pet_ssm = SS2D(channels, d_state, ssm_ratio, d_conv, mixer=mixer)
        self.ct_norm = nn.LayerNorm(window * window * channels)
        self.ct_ssm = SS2D(channels, d_state, ssm_ratio, d_conv, mixer=mixer)

    def forward(self, ct_words: torch.Tensor, pet_tokens: torch.Tensor) -> torch.Tensor:
        pet_tokens = pet_tokens + self.pet_ssm(self.pet_norm(pet_tokens))
        normed = self.ct_norm(ct_words.flatten(1)).view_as(ct_words)
        ct_words = ct_words + self.ct_ssm(normed)
        return ct_words + pet_tokens.reshape(-1, 1, 1, pet_tokens.shape[-1])


class DualCrossInteraction(nn.Module):
    """DCIM of one stage, (ct, pet) each (B, C, H, W) -> (B, C, H, W) =
    ct_stem(ct) + window-local CT scan + nearest-upsampled (x window) PET tokens after the global scan.

    ``ct_widths`` (C, C/r, C) and ``pet_widths`` / ``pet_strides`` (C ... C, strides multiplying to ``window``)
    define the two stems. Maps whose sides are not multiples of the window are zero-padded at the bottom/right
    before the stems; the padded pixels take part in the border windows and the PET stem and are cropped from the
    output.
    """

    def __init__(self, window: int, ct_widths: list[int], pet_widths: list[int], pet_strides: list[int],
                 d_state: int, ssm_ratio: float, d_conv: int, mixer: type[TokenMixer] = SelectiveScanMixer):
        super().__init__()
        self.window = window
        self.ct_stem = ConvStem(ct_widths, [1] * (len(ct_widths) - 1))
        self.pet_stem = ConvStem(pet_widths, pet_strides)
        self.interaction = RegionGlobalInteraction(ct_widths[-1], window, d_state, ssm_ratio, d_conv, mixer)

    def forward(self, ct: torch.Tensor, pet: torch.Tensor) -> torch.Tensor:
        height, width = ct.shape[2:]
        pad_h, pad_w = -height % self.window, -width % self.window
        if pad_h or pad_w:
            ct, pet = (F.pad(t, (0, pad_w, 0, pad_h)) for t in (ct, pet))
        words = window_partition(self.ct_stem(ct).permute(0, 2, 3, 1), self.window)
        tokens = self.pet_stem(pet).permute(0, 2, 3, 1).contiguous()
        words = self.interaction(words, tokens)
        out = window_unpartition(words, height + pad_h, width + pad_w).permute(0, 3, 1, 2)
        return out[:, :, :height, :width]
