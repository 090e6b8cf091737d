"""CIPA trainers and ablations, re-exported for nnU-Net's trainer lookup."""

from nnunetv2_cipa.training.cipa_trainer import nnUNetTrainerCIPA  # noqa: F401
from nnunetv2_cipa.training.variants import (  # noqa: F401
    nnUNetTrainerCIPA_noCRM,
    nnUNetTrainerCIPA_noDCIM,
    nnUNetTrainerCIPA_noMamba,
    nnUNetTrainerCIPA_pretrained,
)
