"""CPU-sized CIPA trainers and the vanilla nnU-Net counterpart with the same short schedule."""

from nnunetv2_cipa.training.variants import (  # noqa: F401
    nnUNetTrainerCIPA_debug,
    nnUNetTrainerCIPAMicro,
    nnUNetTrainerVanilla_debug,
)
