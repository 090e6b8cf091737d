"""nnUNetTrainerCIPA: the CIPA network trained by the stock nnU-Net 2.8 pipeline.

What differs from nnU-Net's default trainer, and why:
- network: ``CIPA`` (preset ``tiny``) built from ``configuration_manager.patch_size``; CT is input channel 0
  (``_0000``), PET channel 1 (``_0001``), the convention of ``nnunetv2_cipa convert``. With the default ``rgb_to_0_1``
  normalisation the network maps [0, 1] to the official [-1.6, 1.6] range itself.
- optimiser: AdamW (betas 0.9/0.999, weight decay 0.01 as in the official recipe) with no weight decay on norms,
  biases and SSM parameters (A_log, D, dt bias); every parameter is optimised (the official grouping froze 8.67 M).
- schedule: linear warm-up over ``warmup_epochs`` (at most a tenth of the epochs) then nnU-Net's polynomial decay;
  nnU-Net's epoch length is kept so CIPA and vanilla nnU-Net get the same number of iterations.
- deep supervision: on, with the network's auxiliary heads at strides 4, 8 and 16; targets are downsampled by nnU-Net
  to the same sizes; loss weights 1, 1/2, 1/4, 1/8 (normalised; unlike nnU-Net's default the last head is not
  zero-weighted, because its parameters would otherwise never train).
- torch.compile: off unless ``nnUNet_compile`` is set to true (the scan kernels are not compile-friendly).
- AMP: nnU-Net's fp16 autocast on CUDA; the selective scan always runs in float32 inside the operator.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel

from nnunetv2.preprocessing.normalization.default_normalization_schemes import RGBTo01Normalization
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager

from nnunetv2_cipa.network import CIPA, DEEP_SUPERVISION_STRIDES, OFFICIAL_INPUT_SCALE_SHIFT
from nnunetv2_cipa.training.lr_schedule import WarmupPolyLRScheduler



def unwrap(network: nn.Module) -> nn.Module:
    """The bare network inside DDP and/or torch.compile wrappers."""
    if isinstance(network, DistributedDataParallel):
        network = network.module
    if isinstance(network, OptimizedModule):
        network = network._orig_mod
    return network


def weight_decay_groups(network: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: decay on weight matrices/kernels; none on biases, norms (ndim <= 1) and parameters
    marked ``_no_weight_decay`` (A_log, D, dt bias)."""
    decay, no_decay = [], []
    for param in network.parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or getattr(param, "_no_weight_decay", False):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class nnUNetTrainerCIPA(nnUNetTrainer):
    """CIPA (preset ``tiny``, faithful to the official sigma_tiny model) under nnU-Net's pipeline."""

    cipa_preset = "tiny"
    use_crm = True
    use_dcim = True
    use_mamba = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 2e-4
        self.weight_decay = 1e-2
        self.warmup_epochs = 10

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """CIPA for ``configuration_manager.patch_size``; called on the class by nnU-Net's predictor as well."""
        patch_size = tuple(int(s) for s in configuration_manager.patch_size)
        if len(patch_size) != 2:
            raise ValueError(f"{cls.__name__} is a 2D network: use the '2d' configuration (patch size {patch_size})")
        if num_input_channels != 2:
            raise ValueError(f"{cls.__name__} needs 2 input channels (_0000 = CT, _0001 = PET), the dataset has "
                             f"{num_input_channels}")
        schemes = configuration_manager.normalization_schemes
        rgb_to_0_1 = all(s == RGBTo01Normalization.__name__ for s in schemes)
        scale, shift = OFFICIAL_INPUT_SCALE_SHIFT if rgb_to_0_1 else (1.0, 0.0)
        return CIPA(num_classes=num_output_channels, patch_size=patch_size, preset=cls.cipa_preset,
                    in_channels=num_input_channels, ct_channel=0, pet_channel=1, use_crm=cls.use_crm,
                    use_dcim=cls.use_dcim, use_mamba=cls.use_mamba, deep_supervision=enable_deep_supervision,
                    input_scale=scale, input_shift=shift)

    def _get_deep_supervision_scales(self):
        if not self.enable_deep_supervision:
            return None
        return [[1.0, 1.0]] + [[1.0 / s, 1.0 / s] for s in DEEP_SUPERVISION_STRIDES]

    def _build_loss(self):
        loss = super()._build_loss()
        if isinstance(loss, DeepSupervisionWrapper):
            weights = np.array([1 / 2 ** i for i in range(len(loss.weight_factors))])
            loss.weight_factors = tuple(weights / weights.sum())
        return loss

    def _do_i_compile(self):
        return "nnUNet_compile" in os.environ and super()._do_i_compile()  # opt-in: off when unset

    def configure_optimizers(self):
        groups = weight_decay_groups(unwrap(self.network), self.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=self.initial_lr, betas=(0.9, 0.999), eps=1e-8)
        warmup = min(self.warmup_epochs, self.num_epochs // 10)  # short (debug) schedules get a shorter warm-up
        scheduler = WarmupPolyLRScheduler(optimizer, self.initial_lr, warmup, self.num_epochs)
        return optimizer, scheduler
