"""Learning-rate schedule for the CIPA trainers: linear warm-up, then nnU-Net's polynomial decay."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import _LRScheduler


class WarmupPolyLRScheduler(_LRScheduler):
    """lr(e) = initial_lr * (e + 1) / warmup for e < warmup, then initial_lr * (1 - (e - warmup) / (max - warmup))^0.9.

    Stepped once per epoch with the epoch index, like nnU-Net's PolyLRScheduler, so it is stateless and resumes
    correctly from a checkpoint (``nnUNetv2_train --c``).
    """

    def __init__(self, optimizer: Optimizer, initial_lr: float, warmup_steps: int, max_steps: int,
                 exponent: float = 0.9):
        if not 0 <= warmup_steps < max_steps:
            raise ValueError(f"warmup_steps must be in [0, max_steps={max_steps}), got {warmup_steps}")
        self.optimizer = optimizer
        self.initial_lr = initial_lr
        self.warmup_steps = warmup_steps
        self.max_steps = max_steps
        self.exponent = exponent
        self.ctr = 0
        super().__init__(optimizer, -1)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.initial_lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.max_steps - self.warmup_steps))
        return self.initial_lr * (1 - progress) ** self.exponent

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        lr = self.lr_at(current_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
