"""CRM: channel-wise rectification of CT and PET features by a Mamba over their channel tokens.
See docs/architecture.md, "CRM"."""

from __future__ import annotations

import torch
from torch import nn

from nnunetv2_cipa.modules.linear import Linear
from nnunetv2_cipa.modules.ss2d import SS1D, SelectiveScanMixer, TokenMixer


class ChannelRectification(nn.Module):
    """(ct, pet) each (B, C, H, W) -> ((1 + w_ct) * ct, (1 + w_pet) * pet), with w in (0, 1) per channel.

    The 2C channel tokens (CT channels first, then PET) are each one channel's whole spatial map: LayerNorm(H*W),
    Linear(H*W -> token_dim), GELU, a unidirectional SS1D over the 2C tokens, LayerNorm, Linear(token_dim -> 1),
    sigmoid. ``spatial_size`` = H*W is fixed at construction (the Linear is position-specific, as in the paper).
    """

    def __init__(self, channels: int, spatial_size: int, token_dim: int = 96, d_state: int = 16,
                 ssm_ratio: float = 2.0, mixer: type[TokenMixer] = SelectiveScanMixer):
        super().__init__()
        self.channels, self.spatial_size = channels, spatial_size
        self.spatial_norm = nn.LayerNorm(spatial_size)
        self.embed = Linear(spatial_size, token_dim)
        self.act = nn.GELU()
        self.channel_ssm = SS1D(token_dim, d_state, ssm_ratio, mixer=mixer)
        self.token_norm = nn.LayerNorm(token_dim)
        self.to_weight = Linear(token_dim, 1)

    def forward(self, ct: torch.Tensor, pet: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, channels, height, width = ct.shape
        if channels != self.channels or height * width != self.spatial_size:
            raise ValueError(f"ChannelRectification: expected maps with {self.channels} channels and "
                             f"{self.spatial_size} pixels, got {tuple(ct.shape)}")
        tokens = torch.cat([ct, pet], dim=1).flatten(2)  # (B, 2C, H*W)
        tokens = self.act(self.embed(self.spatial_norm(tokens)))
        weights = torch.sigmoid(self.to_weight(self.token_norm(self.channel_ssm(tokens))))  # (B, 2C, 1)
        w_ct, w_pet = weights.view(batch, 2, channels, 1, 1).unbind(1)
        return ct * (1 + w_ct), pet * (1 + w_pet)
