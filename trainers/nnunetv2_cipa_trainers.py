"""CIPA trainers, ablations and variants, re-exported for nnU-Net's trainer lookup."""

from nnunetv2_cipa.training.cipa_trainer import nnUNetTrainerCIPA  # noqa: F401
from nnunetv2_cipa.training.paper_trainer import (  # noqa: F401
    nnUNetTrainerCIPA_paper,
    nnUNetTrainerCIPA_paper_frozenSSM,
    nnUNetTrainerCIPA_paper_pretrained,
)
from nnunetv2_cipa.training.variants import (  # noqa: F401
    nnUNetTrainerCIPA_accumulate,
    nnUNetTrainerCIPA_bf16,
    nnUNetTrainerCIPA_checkpointing,
    nnUNetTrainerCIPA_noAMP,
    nnUNetTrainerCIPA_noCRM,
    nnUNetTrainerCIPA_noDCIM,
    nnUNetTrainerCIPA_noMamba,
    nnUNetTrainerCIPA_pretrained,
)
