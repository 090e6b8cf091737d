"""CPU-sized CIPA trainers and their vanilla nnU-Net counterparts with the same short schedules."""

from nnunetv2_cipa.training.paper_trainer import nnUNetTrainerCIPA_paper_debug  # noqa: F401
from nnunetv2_cipa.training.variants import (  # noqa: F401
    nnUNetTrainerCIPA_debug,
    nnUNetTrainerCIPAMicro,
    nnUNetTrainerCIPAMicro_demo,
    nnUNetTrainerVanilla_debug,
    nnUNetTrainerVanilla_demo,
)
