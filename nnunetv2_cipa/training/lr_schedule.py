"""Learning-rate schedules of the CIPA trainers: warm-up + nnU-Net's polynomial decay per epoch (the default), and
the official per-iteration cosine (the paper recipe)."""

from __future__ import annotations

import math

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


class PerIterationCosineLRScheduler(_LRScheduler):
    """The official CIPA schedule, stepped every iteration: factor(t) = (1 + cos(pi t / T)) / 2 * (1 - floor) + floor
    of ``peak_lr`` over T = epochs * iterations_per_epoch, optionally after a linear warm-up from 1e-3 to 1 over
    ``warmup_epochs`` (the cosine then spans the remaining iterations).

    nnU-Net calls ``step(epoch)`` at the start of every epoch: it sets the lr of that epoch's first iteration, so the
    schedule resumes exactly from a checkpoint (``--c``); the trainer calls ``step_iteration()`` after every optimiser
    step.
    """

    def __init__(self, optimizer: Optimizer, peak_lr: float, epochs: int, iterations_per_epoch: int,
                 warmup_epochs: int = 0, floor: float = 1e-6, warmup_start: float = 1e-3):
        if epochs < 1 or iterations_per_epoch < 1 or not 0 <= warmup_epochs < epochs:
            raise ValueError(f"need epochs >= 1, iterations_per_epoch >= 1 and 0 <= warmup_epochs < epochs, got "
                             f"{epochs}, {iterations_per_epoch}, {warmup_epochs}")
        self.optimizer = optimizer
        self.peak_lr, self.floor, self.warmup_start = peak_lr, floor, warmup_start
        self.iterations_per_epoch = iterations_per_epoch
        self.total_steps = epochs * iterations_per_epoch
        self.warmup_steps = warmup_epochs * iterations_per_epoch
        self.iteration = 0
        super().__init__(optimizer, -1)

    def lr_at(self, iteration: int) -> float:
        if iteration < self.warmup_steps:
            return self.peak_lr * (self.warmup_start + (1 - self.warmup_start) * iteration / self.warmup_steps)
        progress = (iteration - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return self.peak_lr * ((1 + math.cos(math.pi * progress)) / 2 * (1 - self.floor) + self.floor)

    def _set(self, iteration: int) -> None:
        self.iteration = iteration
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(iteration)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def step(self, epoch=None):
        self._set(0 if epoch is None or epoch == -1 else epoch * self.iterations_per_epoch)

    def step_iteration(self) -> None:
        self._set(self.iteration + 1)
