"""Activation checkpointing of one network segment that keeps BatchNorm statistics and randomness exact.
See docs/architecture.md, "Activation checkpointing"."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint


def maybe_checkpoint(enabled: bool, modules: Iterable[nn.Module], fn: Callable, *args):
    """``fn(*args)``; with ``enabled`` (and autograd recording) through ``torch.utils.checkpoint``: only the inputs
    are kept, and ``fn`` runs again in backward. ``modules`` are the modules ``fn`` runs: during that recomputation
    their BatchNorm layers normalise with the batch statistics as in the forward but do not update their running
    statistics again. The RNG state is restored for the recomputation, so DropPath draws the same masks."""
    if not (enabled and torch.is_grad_enabled()):
        return fn(*args)
    norms = [m for module in modules for m in module.modules() if isinstance(m, _BatchNorm)]
    return _eager_checkpoint(fn, args, tuple(norms))


@torch.compiler.disable
def _eager_checkpoint(fn: Callable, args: tuple, norms: tuple[_BatchNorm, ...]):
    """``checkpoint`` with the BatchNorm context, run eagerly under torch.compile too. Traced, checkpoint accepts only
    TorchDispatchMode contexts; and torch runs a checkpointed segment with a graph break (every CIPA stage has them:
    the scans run eagerly) eagerly anyway, where, without the context, the recomputation would update the running
    statistics a second time. So under torch.compile the checkpointed stages run eagerly, the rest compiled."""
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True,
                      context_fn=functools.partial(_contexts, norms))


def _contexts(norms: tuple[_BatchNorm, ...]):
    """(forward context, recomputation context) for ``checkpoint``."""
    return contextlib.nullcontext(), _running_statistics_frozen(norms)


@contextlib.contextmanager
def _running_statistics_frozen(norms: tuple[_BatchNorm, ...]):
    """BatchNorm layers in training mode normalise with the batch statistics but keep running mean, variance and
    batch count: momentum 0 (running = 1 * running + 0 * batch) and the count restored afterwards. The layers still
    receive their running buffers, so the recomputation saves the same tensors as the forward."""
    tracking = [m for m in norms if m.training and m.track_running_stats]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in tracking]
    for m in tracking:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(tracking, saved):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)
