"""nnunetv2-cipa: the CIPA PET-CT segmentation network as an nnU-Net v2 extension."""

__version__ = "0.1.0"
