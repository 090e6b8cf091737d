"""Low-level operators (the selective scan and its backends)."""

from nnunetv2_cipa.ops.selective_scan import selective_scan

__all__ = ["selective_scan"]
