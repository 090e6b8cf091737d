"""Trainer variants: ablations, the pretrained encoder, and CPU-sized schedules. Each changes one thing."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_cipa.errors import InputError
from nnunetv2_cipa.training.cipa_trainer import nnUNetTrainerCIPA, unwrap

PRETRAINED_ENV_VAR = "nnUNet_CIPA_pretrained"


class nnUNetTrainerCIPA_noCRM(nnUNetTrainerCIPA):
    """Ablation: no channel-wise rectification (DCIM takes the raw CT/PET features)."""

    use_crm = False


class nnUNetTrainerCIPA_noDCIM(nnUNetTrainerCIPA):
    """Ablation: no dynamic cross-modality interaction (fused feature = CRM-rectified CT + PET)."""

    use_dcim = False


class nnUNetTrainerCIPA_noMamba(nnUNetTrainerCIPA):
    """Control: every selective scan replaced by a parameter-matched non-SSM token mixer."""

    use_mamba = False


class nnUNetTrainerCIPA_pretrained(nnUNetTrainerCIPA):
    """The shared encoder starts from an ImageNet VMamba-T checkpoint given by env ``nnUNet_CIPA_pretrained``."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.pretrained_checkpoint = pretrained_checkpoint_path()

    def initialize(self):
        from nnunetv2_cipa.pretrained import load_vmamba_checkpoint

        super().initialize()
        report = load_vmamba_checkpoint(unwrap(self.network), self.pretrained_checkpoint)
        self.print_to_log_file(f"Loaded the ImageNet VMamba encoder from {self.pretrained_checkpoint.parent}/"
                               f"{report.summary()}")


def pretrained_checkpoint_path() -> Path:
    """The checkpoint named by env nnUNet_CIPA_pretrained; InputError if unset or not a file."""
    value = os.environ.get(PRETRAINED_ENV_VAR)
    if not value:
        raise InputError(f"{PRETRAINED_ENV_VAR} is not set: export it to the path of the ImageNet VMamba-T checkpoint "
                         "(vssmtiny_dp01_ckpt_epoch_292.pth)")
    path = Path(value).expanduser()
    if not path.is_file():
        raise InputError(f"{PRETRAINED_ENV_VAR}={value}: no such file")
    return path


class nnUNetTrainerCIPAMicro(nnUNetTrainerCIPA):
    """The ``micro`` preset (a few hundred thousand parameters) with the normal schedule: CPU-sized CIPA."""

    cipa_preset = "micro"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-3


def _shorten_schedule(trainer: nnUNetTrainer, epochs: int, iterations: int, val_iterations: int) -> None:
    trainer.num_epochs = epochs
    trainer.num_iterations_per_epoch = iterations
    trainer.num_val_iterations_per_epoch = val_iterations


DEBUG_SCHEDULE = {"epochs": 2, "iterations": 4, "val_iterations": 2}


class nnUNetTrainerCIPA_debug(nnUNetTrainerCIPAMicro):
    """micro preset, 2 epochs of 4 iterations and 2 validation iterations: smoke tests and ``demo --quick``."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _shorten_schedule(self, **DEBUG_SCHEDULE)


class nnUNetTrainerVanilla_debug(nnUNetTrainer):
    """Vanilla nnU-Net with the same short schedule as nnUNetTrainerCIPA_debug (like-for-like comparisons)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _shorten_schedule(self, **DEBUG_SCHEDULE)


DEMO_SCHEDULE = {"epochs": 30, "iterations": 25, "val_iterations": 5}


class nnUNetTrainerCIPAMicro_demo(nnUNetTrainerCIPAMicro):
    """micro preset with the fixed CPU budget of ``nnunetv2_cipa demo`` (DEMO_SCHEDULE)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _shorten_schedule(self, **DEMO_SCHEDULE)


class nnUNetTrainerVanilla_demo(nnUNetTrainer):
    """Vanilla nnU-Net with the same budget as nnUNetTrainerCIPAMicro_demo."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _shorten_schedule(self, **DEMO_SCHEDULE)
