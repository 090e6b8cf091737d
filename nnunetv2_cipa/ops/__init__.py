"""Low-level operators: the selective scan, the multi-directional scan over one map, and their backends.

Import the operators from their modules: ``nnunetv2_cipa.ops.selective_scan.selective_scan`` and
``nnunetv2_cipa.ops.directional_scan.directional_scan``; the backend table is ``nnunetv2_cipa.ops.backends``.
"""
