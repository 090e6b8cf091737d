"""torch.compile settings for CIPA, applied when nnU-Net compiles the network (``nnUNet_compile=true``, on GPU).

nnU-Net calls ``torch.compile(network)``, whose default turns a dimension dynamic (symbolic) once it has seen two
sizes of it. CIPA runs the same layer code (SS2D, VSS block, CRM, DCIM) at every stage's map size, on DCIM's windows
and token grids and at the training and the prediction batch, so its shapes turn symbolic, and inductor (torch
2.13) fails on them: on DCIM's window arithmetic (``AttributeError: ... 'TensorReferenceAnalysis' has no attribute
'python_mod'``, in a pass that runs before code generation for any device) and, on CPU, on the linear layers run as
1x1 convolutions (``InductorError`` on an undecidable sympy relation); docs/benchmarks.md, "torch.compile".

With static shapes each shape gets its own graphs instead. CIPA-micro at 64 x 64, one training step with deep
supervision and one batch-1 prediction in eval mode: 278 graphs, 313 recompilations, at most 54 of one function
(the second half of SS2D). nnU-Net's training adds the validation step (eval mode, training batch) and
out-of-memory retries (new micro-batch sizes); the limit below leaves room for several times that. A function that
still reaches its limit runs eagerly, with torch's warning. The scans always run eagerly: the ops are
``torch.compiler.disable``d.
"""

from __future__ import annotations

import os

RECOMPILE_LIMIT = 256  # compiled variants of one function (torch's default: 8; its per-function cap is 256)


def compile_requested() -> bool:
    """Env nnUNet_compile as nnU-Net reads it (true / 1 / t); its predictor then compiles the network, on any device,
    without a trainer's ``initialize``."""
    return os.environ.get("nnUNet_compile", "").lower() in ("true", "1", "t")


def use_static_shape_compile() -> str:
    """Make torch.compile (process-wide) specialise on every shape, with the limit above; returns the log line."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.automatic_dynamic_shapes = False
    prefix = "recompile" if hasattr(dynamo_config, "recompile_limit") else "cache_size"  # renamed in torch 2.7
    for name in (f"{prefix}_limit", f"accumulated_{prefix}_limit"):
        setattr(dynamo_config, name, max(getattr(dynamo_config, name), RECOMPILE_LIMIT))
    return (f"torch.compile: static shapes (a graph per map size and batch; at most "
            f"{getattr(dynamo_config, prefix + '_limit')} per function); the selective scans run eagerly")
