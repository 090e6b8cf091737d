"""One integer agreed on by all DDP processes (nnU-Net's ``-num_gpus``); the value itself without a process group."""

from __future__ import annotations

import torch
import torch.distributed as dist


def reduce_across_processes(value: int, op: dist.ReduceOp, device: torch.device) -> int:
    """``value`` all-reduced with ``op`` (MIN, SUM, ...) over the processes; on ``device`` for NCCL, else on CPU."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    on = device if dist.get_backend() == dist.Backend.NCCL else torch.device("cpu")
    tensor = torch.tensor([value], dtype=torch.int64, device=on)
    dist.all_reduce(tensor, op=op)
    return int(tensor.item())
