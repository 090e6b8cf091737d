"""Folder to export as nnUNet_extTrainer (``nnunetv2_cipa ext-path`` prints it). Each module only re-exports
trainer classes defined in ``nnunetv2_cipa.training``, so they pickle by reference."""
