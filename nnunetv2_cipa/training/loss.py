"""The official CIPA loss for a one-logit sigmoid head, in nnU-Net's two-class output convention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BCEAndSoftDiceLoss(nn.Module):
    """mean BCE-with-logits(z, y) + 1 - mean_b Dice_b(sigmoid(z), y), Dice per sample with ``smooth`` (official: 1).

    ``output`` (B, 2, H, W) are the two-class logits [0, z] of ``CIPA(binary_logit=True)`` (channel 1 is the one logit
    z); ``target`` (B, 1, H, W) holds labels 0/1 (nnU-Net's target layout). Per-sample Dice sums over all pixels of
    one sample, then the batch mean is taken (the official ``batch=False``), unlike nnU-Net's batch Dice.
    """

    def __init__(self, smooth: float = 1.0):
        super().__init__()
        self.smooth = smooth

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if output.dim() != target.dim() or output.shape[1] != 2 or target.shape[1] != 1 \
                or output.shape[2:] != target.shape[2:]:
            raise ValueError(f"BCEAndSoftDiceLoss: expected output (B, 2, *S) and target (B, 1, *S), got "
                             f"{tuple(output.shape)} and {tuple(target.shape)}")
        logit = output[:, 1:].to(torch.promote_types(output.dtype, torch.float32))
        target = target.to(logit.dtype)
        bce = F.binary_cross_entropy_with_logits(logit, target)
        prob = torch.sigmoid(logit)
        dims = tuple(range(1, logit.dim()))
        intersection = (prob * target).sum(dims)
        dice = (2 * intersection + self.smooth) / (prob.sum(dims) + target.sum(dims) + self.smooth)
        return bce + 1 - dice.mean()
