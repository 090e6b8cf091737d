"""Low-level operators: the selective scan, the multi-directional scan over one map, and their backends."""

from nnunetv2_cipa.ops.directional_scan import directional_scan
from nnunetv2_cipa.ops.selective_scan import selective_scan

__all__ = ["directional_scan", "selective_scan"]
