"""Adaptation through the normalisation layers, after training, on unlabelled target scans.

- :func:`adabn` (Li et al. 2016): re-estimate every BatchNorm layer's running statistics on the
  target data; no weight changes.
- :class:`Tent` (Wang et al. 2021): minimise the entropy of the predictions by updating only the
  affine parameters of the normalisation layers (BatchNorm 1d/2d/3d, GroupNorm, InstanceNorm,
  LayerNorm), normalising with each batch's own statistics.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from medtl.adapt.domain import prediction_entropy
from medtl.registry import NORMALIZATION

log = logging.getLogger(__name__)

NORM_LAYERS = (_BatchNorm, nn.GroupNorm, _InstanceNorm, nn.LayerNorm)


def register_normalization(name: str):
    """Decorator: make ``step(model, target, *, device, tent_lr, tent_steps)`` an ``adapt.domain``
    value applied after training (and by ``medtl adapt``); it adapts ``model`` in place."""
    return NORMALIZATION.register(name)


def _images(batch) -> torch.Tensor:
    return batch["image"] if isinstance(batch, dict) else batch


@torch.no_grad()
def has_batch_norm(model: nn.Module) -> bool:
    """Whether ``model`` has BatchNorm layers with running statistics (what :func:`adabn` re-estimates)."""
    return any(isinstance(m, _BatchNorm) and m.track_running_stats for m in model.modules())


def adabn(model: nn.Module, target: Iterable, device: torch.device | str | None = None) -> nn.Module:
    """Replace every BatchNorm layer's running mean and variance by their values over ``target``
    (batches of images, or dicts with ``"image"``); returns ``model`` in eval mode.

    The statistics are a cumulative average over all target batches (momentum ``None``), so
    batch order does not matter.  Nothing but BatchNorm buffers changes."""
    device = device or next(model.parameters()).device
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not layers:
        log.warning("adabn: the model has no BatchNorm layer with running statistics; nothing to adapt")
        return model.eval()
    momenta = [m.momentum for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for batch in target:
            model(_images(batch).to(device))
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
    return model.eval()


def norm_affine_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The affine weights and biases of every normalisation layer in ``model``."""
    return [p for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)]


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode, except that BatchNorm layers normalise with the batch's own
    statistics and leave their running statistics untouched."""
    was_training = model.training
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    tracking = [m.track_running_stats for m in layers]
    model.eval()
    for m in layers:
        m.train()
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, track in zip(layers, tracking):
            m.track_running_stats = track
        model.train(was_training)


class Tent(nn.Module):
    """Test-time entropy minimisation on the normalisation affine parameters of ``model``.

    Each call ``tent(images)`` takes ``steps`` Adam steps on the batch's mean prediction
    entropy and returns the logits of the last forward pass (made before its update, as in the
    reference implementation).  Only the affine parameters change: running statistics are left
    alone.  With ``episodic`` the model and optimizer are reset before every batch, so each
    batch is adapted on its own.
    """

    def __init__(self, model: nn.Module, *, lr: float = 1e-4, steps: int = 1, episodic: bool = False) -> None:
        super().__init__()
        if steps < 1:
            raise ValueError(f"Tent: steps must be at least 1, got {steps}")
        self.params = norm_affine_parameters(model)
        if not self.params:
            raise ValueError("Tent: the model has no normalisation layer with affine parameters")
        self.model, self.steps, self.episodic = model, steps, episodic
        self.optimizer = torch.optim.Adam(self.params, lr=lr, betas=(0.9, 0.999))
        self._initial = (copy.deepcopy(model.state_dict()), copy.deepcopy(self.optimizer.state_dict()))

    def reset(self) -> None:
        """Back to the weights and optimizer state Tent started from."""
        self.model.load_state_dict(self._initial[0])
        self.optimizer.load_state_dict(self._initial[1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.episodic:
            self.reset()
        with torch.enable_grad(), batch_statistics(self.model):
            for _ in range(self.steps):
                logits = self.model(images)
                loss = prediction_entropy(logits).mean()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward(inputs=self.params)
                self.optimizer.step()
        return logits.detach()

    def adapt(self, target: Iterable, device: torch.device | str | None = None, epochs: int = 1) -> nn.Module:
        """Run over ``target`` (batches of images or dicts with ``"image"``) ``epochs`` times;
        returns the adapted model in eval mode."""
        device = device or self.params[0].device
        for _ in range(epochs):
            for batch in target:
                self(_images(batch).to(device))
        return self.model.eval()


@register_normalization("adabn")
def _adabn_step(model: nn.Module, target: Iterable, *, device=None, **_) -> None:
    adabn(model, target, device)


@register_normalization("tent")
def _tent_step(model: nn.Module, target: Iterable, *, device=None, tent_lr: float = 1e-4, tent_steps: int = 1, **_) -> None:
    adabn(model, target, device)
    Tent(model, lr=tent_lr).adapt(target, device, epochs=tent_steps)


def adapt_normalization(model: nn.Module, method: str, target: Iterable, *, tent_lr: float = 1e-4, tent_steps: int = 1,
                        device: torch.device | str | None = None) -> nn.Module:
    """The after-training step of ``adapt.domain``: ``adabn`` re-estimates BatchNorm statistics
    on ``target``; ``tent`` does the same and then runs :class:`Tent` for ``tent_steps`` passes, so
    the saved model (used in eval mode) normalises with target statistics, as TENT adapted it to.
    Any other method leaves the model as it is."""
    if method in NORMALIZATION:
        NORMALIZATION[method](model, target, device=device, tent_lr=tent_lr, tent_steps=tent_steps)
    return model.eval()
