"""nnU-Net trainers for CIPA. nnU-Net finds them through ``nnUNet_extTrainer`` (see ``discovery``)."""
