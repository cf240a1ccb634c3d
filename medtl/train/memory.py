"""Memory layout and activation memory: channels-last for 2D CNNs, checkpointing for 3D.

Channels-last (NHWC) lets cuDNN use its fastest convolution kernels (tensor cores) for 2D CNNs.
Activation checkpointing keeps only each backbone block's input during the forward pass and
recomputes the block in the backward pass: a large 3D volume fits at the cost of one more forward.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from medtl.adapt.blocks import backbone_blocks


def is_2d(model: nn.Module) -> bool:
    """True when the model has 2D convolutions and no 3D ones (where channels-last applies)."""
    dims = {p.dim() for p in model.parameters()}
    return 4 in dims and 5 not in dims


@contextmanager
def _bn_statistics_kept(module: nn.Module) -> Iterator[None]:
    """BatchNorm running statistics untouched by the recomputation of a checkpointed block
    (otherwise every batch would be counted twice)."""
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


def _checkpointed(module: nn.Module):
    forward = module.forward

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False,
                          context_fn=lambda: (nullcontext(), _bn_statistics_kept(module)), **kwargs)

    return run


def checkpoint_blocks(backbone: nn.Module) -> int:
    """Checkpoint the activations of every backbone block (see :mod:`medtl.adapt.blocks`);
    returns how many modules were wrapped."""
    count = 0
    for block in backbone_blocks(backbone):
        for module in block.modules:
            module.forward = _checkpointed(module)
            count += 1
    return count
