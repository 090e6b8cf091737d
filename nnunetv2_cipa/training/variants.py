"""Trainer variants: ablations, the pretrained encoder, precision, memory, and CPU-sized schedules. Each changes
one thing."""

from __future__ import annotations

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_cipa.training.cipa_trainer import nnUNetTrainerCIPA


class nnUNetTrainerCIPA_noCRM(nnUNetTrainerCIPA):
    """Ablation: no channel-wise rectification (DCIM takes the raw CT/PET features)."""

    use_crm = False


class nnUNetTrainerCIPA_noDCIM(nnUNetTrainerCIPA):
    """Ablation: no dynamic cross-modality interaction (fused feature = CRM-rectified CT + PET)."""

    use_dcim = False


class nnUNetTrainerCIPA_noMamba(nnUNetTrainerCIPA):
    """Control: every selective scan replaced by a parameter-matched non-SSM token mixer."""

    token_mixer = "memoryless"


class nnUNetTrainerCIPA_pretrained(nnUNetTrainerCIPA):
    """The shared encoder starts from an ImageNet VMamba-T checkpoint given by env ``nnUNet_CIPA_pretrained``."""

    imagenet_encoder = True


class nnUNetTrainerCIPA_bf16(nnUNetTrainerCIPA):
    """The network runs under bfloat16 autocast (training, validation and prediction), without loss scaling."""

    network_autocast = torch.bfloat16


class nnUNetTrainerCIPA_noAMP(nnUNetTrainerCIPA):
    """The network runs in float32 (no autocast), in training, validation and prediction."""

    network_autocast = torch.float32


class nnUNetTrainerCIPA_checkpointing(nnUNetTrainerCIPA):
    """Activation checkpointing: stages recomputed in backward, so larger batches fit a GPU (a second forward pass
    in backward; docs/usage.md, "Batch size and GPU memory")."""

    activation_checkpointing = True


class nnUNetTrainerCIPA_accumulate(nnUNetTrainerCIPA):
    """The planned batch (vanilla nnU-Net's) on any GPU: gradients accumulated over micro-batches that fit."""

    accumulate_to_planned_batch = True


class nnUNetTrainerCIPAMicro(nnUNetTrainerCIPA):
    """The ``micro`` preset (a few hundred thousand parameters) with the normal schedule: CPU-sized CIPA."""

    cipa_preset = "micro"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-3


def shorten_schedule(trainer: nnUNetTrainer, epochs: int, iterations: int, val_iterations: int) -> None:
    trainer.num_epochs = epochs
    trainer.num_iterations_per_epoch = iterations
    trainer.num_val_iterations_per_epoch = val_iterations


DEBUG_SCHEDULE = {"epochs": 2, "iterations": 4, "val_iterations": 2}


class nnUNetTrainerCIPA_debug(nnUNetTrainerCIPAMicro):
    """micro preset, 2 epochs of 4 iterations and 2 validation iterations: smoke tests and ``demo --quick``."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        shorten_schedule(self, **DEBUG_SCHEDULE)


class nnUNetTrainerVanilla_debug(nnUNetTrainer):
    """Vanilla nnU-Net with the same short schedule as nnUNetTrainerCIPA_debug (like-for-like comparisons)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        shorten_schedule(self, **DEBUG_SCHEDULE)


DEMO_SCHEDULE = {"epochs": 30, "iterations": 25, "val_iterations": 5}


class nnUNetTrainerCIPAMicro_demo(nnUNetTrainerCIPAMicro):
    """micro preset with the fixed CPU budget of ``nnunetv2_cipa demo`` (DEMO_SCHEDULE)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        shorten_schedule(self, **DEMO_SCHEDULE)


class nnUNetTrainerVanilla_demo(nnUNetTrainer):
    """Vanilla nnU-Net with the same budget as nnUNetTrainerCIPAMicro_demo."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        shorten_schedule(self, **DEMO_SCHEDULE)
