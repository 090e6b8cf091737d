"""nnUNetTrainerCIPA_paper: the official CIPA training recipe inside nnU-Net's loop and data pipeline.

Item by item (docs/recipes.md compares it with the official code, nnUNetTrainerCIPA and nnU-Net's default):
- head and loss: one sigmoid logit z (the official head), served to nnU-Net as the two-class logits [0, z], so that
  nnU-Net's softmax / argmax give sigmoid(z) > 0.5 and saved probabilities, ``nnUNetv2_ensemble`` and
  ``nnUNetv2_find_best_configuration`` work as for any nnU-Net model; loss BCE-with-logits (mean) + 1 - per-sample
  soft Dice (smooth 1); no deep supervision (dead code in the official model).
- optimiser: AdamW, lr 6e-5, betas (0.9, 0.999), eps 1e-8, weight decay 0.01 on weight matrices, none on biases,
  norms, A_log, D and dt biases; every parameter is trained. ``faithful_frozen_ssm`` reproduces the official
  grouping instead, which leaves every parameter outside Linear / Conv / norm layers (8.67 M SSM parameters of
  CIPA-tiny) out of the optimiser.
- schedule: cosine per iteration down to 1e-6 of the peak, no warm-up (the official default; a subclass that sets
  ``self.warmup_epochs = 5`` after ``super().__init__()`` gives the official optional warm-up).
- length: 50 epochs of floor(N_train / 4) iterations at batch 4 (N_train: the fold's training cases; a smaller batch
  if the GPU cannot hold 4, then floor(N_train / batch)); ceil(N_val / batch) validation iterations per epoch.
- input: the 8-bit PNGs as nnU-Net's RGBTo01Normalization gives them (x / 255), as the official x / 255 * 3.2 - 1.6
  inside the network; training on any other normalisation is refused.
- augmentation: the official one only (``augmentation.official_augmentation``); no gradient clipping.
- inference: no mirroring (``inference_allowed_mirroring_axes`` None), one forward pass per slice, so ``--val`` and
  ``nnUNetv2_predict`` follow the official single-pass protocol.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from torch import nn

from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

from nnunetv2_cipa.training.augmentation import official_augmentation
from nnunetv2_cipa.training.cipa_trainer import nnUNetTrainerCIPA, unwrap, uses_rgb_to_0_1, weight_decay_groups
from nnunetv2_cipa.training.distributed import reduce_across_processes
from nnunetv2_cipa.training.loss import BCEAndSoftDiceLoss
from nnunetv2_cipa.training.lr_schedule import PerIterationCosineLRScheduler

PAPER_BATCH_SIZE = 4
PAPER_EPOCHS = 50


def official_parameter_groups(network: nn.Module, weight_decay: float) -> tuple[list[dict], list[nn.Parameter]]:
    """The official ``group_weight``: decay on Linear / Conv weights, none on their biases and on BatchNorm /
    LayerNorm / GroupNorm parameters; (AdamW groups, the parameters it leaves out, never updated)."""
    decay, no_decay = [], []
    for module in network.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            decay.append(module.weight)
            no_decay += [module.bias] if module.bias is not None else []
        elif isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
            no_decay += [p for p in (module.weight, module.bias) if p is not None]
    grouped = {id(p) for p in decay + no_decay}
    left_out = [p for p in network.parameters() if id(p) not in grouped]
    groups = [{"params": [p for p in decay if p.requires_grad], "weight_decay": weight_decay},
              {"params": [p for p in no_decay if p.requires_grad], "weight_decay": 0.0}]
    return groups, left_out


class nnUNetTrainerCIPA_paper(nnUNetTrainerCIPA):
    """The official CIPA recipe (see the module docstring)."""

    binary_logit = True
    grad_clip_norm = None
    faithful_frozen_ssm = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 6e-5
        self.weight_decay = 0.01
        self.warmup_epochs = 0
        self.num_epochs = PAPER_EPOCHS
        self.enable_deep_supervision = False
        # the recipe's batch replaces the plan's for nnU-Net's batch logic (DDP split, logging); plans stay as planned
        self.configuration_manager = ConfigurationManager(
            {**self.configuration_manager.configuration, "batch_size": PAPER_BATCH_SIZE})

    def on_train_start(self):
        """Refuse to train on another normalisation than the official x / 255 (checked here, not when the trainer is
        built, so that ``--val`` of an existing model still runs)."""
        schemes = self.configuration_manager.normalization_schemes
        if not uses_rgb_to_0_1(schemes):
            raise SystemExit(f"{self.__class__.__name__} reproduces the official recipe, whose inputs are the 8-bit "
                             "PNGs scaled by x / 255 (the network then applies * 3.2 - 1.6, and the crop step "
                             f"saturates at the 8-bit range); this plan normalises with {', '.join(schemes)}. "
                             "Convert again with `nnunetv2_cipa convert --normalization rgb --overwrite` (rgb is the "
                             "default) and re-run nnUNetv2_plan_and_preprocess, or train nnUNetTrainerCIPA")
        super().on_train_start()

    def _set_batch_size_and_oversample(self):
        plan = self.plans_manager.get_configuration(self.configuration_name).batch_size
        self.print_to_log_file(f"Paper recipe: batch {PAPER_BATCH_SIZE} in place of the plan's {plan} (the 'planned' "
                               "batch of the next line is the recipe's)")
        super()._set_batch_size_and_oversample()

    def _build_loss(self):
        return BCEAndSoftDiceLoss()

    def loss_gathers_samples_across_gpus(self) -> bool:
        return False  # its Dice is computed on each GPU's own batch: nnU-Net's uneven split ([2, 1, 1]) stays

    def configure_optimizers(self):
        network = unwrap(self.network)
        if self.faithful_frozen_ssm:
            groups, left_out = official_parameter_groups(network, self.weight_decay)
            for param in left_out:
                param.requires_grad_(False)
            self.print_to_log_file(f"faithful_frozen_ssm: {sum(p.numel() for p in left_out):,} parameters outside "
                                   "Linear/Conv/norm layers are never updated, as in the official optimiser")
        else:
            groups = weight_decay_groups(network, self.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=self.initial_lr, betas=(0.9, 0.999), eps=1e-8)
        train_cases, val_cases = self.do_split()
        global_batch = reduce_across_processes(self.batch_size, dist.ReduceOp.SUM, self.device)  # DDP: [2, 1, 1]...
        self.num_iterations_per_epoch = max(1, len(train_cases) // global_batch)
        self.num_val_iterations_per_epoch = max(1, math.ceil(len(val_cases) / global_batch))
        self.print_to_log_file(f"Paper schedule: {self.num_epochs} epochs x {self.num_iterations_per_epoch} "
                               f"iterations (floor({len(train_cases)} training cases / batch {global_batch})), "
                               f"{self.num_val_iterations_per_epoch} validation iterations")
        scheduler = PerIterationCosineLRScheduler(optimizer, self.initial_lr, self.num_epochs,
                                                  self.num_iterations_per_epoch, self.warmup_epochs)
        return optimizer, scheduler

    def train_step(self, batch: dict) -> dict:
        result = super().train_step(batch)
        self.lr_scheduler.step_iteration()
        return result

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        """No rotation, no 3D dummy augmentation, the patch itself as the initial patch, no mirroring (neither in
        augmentation nor at inference)."""
        self.inference_allowed_mirroring_axes = None
        return (0.0, 0.0), False, tuple(self.configuration_manager.patch_size), None

    @staticmethod
    def get_training_transforms(patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                do_dummy_2d_data_aug, use_mask_for_norm=None, is_cascaded=False,
                                foreground_labels=None, regions=None, ignore_label=None):
        if is_cascaded or regions is not None or ignore_label is not None or (use_mask_for_norm and
                                                                              any(use_mask_for_norm)):
            raise ValueError("nnUNetTrainerCIPA_paper supports plain binary label maps only (no cascade, regions, "
                             "ignore label or masked normalisation)")
        transforms = official_augmentation()
        if deep_supervision_scales is not None:
            transforms.append(DownsampleSegForDSTransform(ds_scales=deep_supervision_scales))
        return ComposeTransforms(transforms)


class nnUNetTrainerCIPA_paper_pretrained(nnUNetTrainerCIPA_paper):
    """The paper recipe with the ImageNet VMamba-T encoder of env ``nnUNet_CIPA_pretrained`` (the paper's start)."""

    imagenet_encoder = True


class nnUNetTrainerCIPA_paper_frozenSSM(nnUNetTrainerCIPA_paper):
    """The paper recipe with the official optimiser's parameter groups, bug included (see the module docstring)."""

    faithful_frozen_ssm = True


class nnUNetTrainerCIPA_paper_debug(nnUNetTrainerCIPA_paper):
    """The paper recipe on the micro preset for 2 epochs (iterations per epoch from the split as above): smoke tests."""

    cipa_preset = "micro"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
