"""Fine-tuning strategies: which parameters learn, at which rate, in which mode, each epoch.

A strategy turns a classifier (anything with ``.backbone`` and ``.head``) and the training
settings into optimizer parameter groups, says each epoch which backbone blocks learn, puts the
model into the right train/eval mode, and may add a penalty to the loss.  The trainer knows
nothing else about transfer.

Every strategy takes the same options from :class:`~medtl.config.AdaptConfig`: layer-wise rate
decay (each backbone block its own optimizer group at ``lr * layer_decay**depth``, depth counted
from the top block), the head rate multiplier, L2-SP (penalty towards the pretrained weights) and
the BatchNorm mode (``train``, ``frozen_stats``: running statistics kept, affine learns;
``frozen``: both kept).  A frozen block is bit-identical after training: its parameters get no
gradient and its normalisation layers stay in eval mode.
"""

from __future__ import annotations

from typing import ClassVar, TypeVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from medtl.adapt.blocks import Block, backbone_blocks
from medtl.config import AdaptConfig, TrainConfig
from medtl.registry import STRATEGIES

_S = TypeVar("_S", bound="type[FullFineTuning]")


def register_strategy(cls: _S) -> _S:
    """Class decorator: make a :class:`FullFineTuning` subclass an ``adapt.strategy`` under its ``name``."""
    return STRATEGIES.register(cls.name)(cls)


@register_strategy
class FullFineTuning:
    """Every parameter learns from the first epoch; the new head at ``lr * head_lr_multiplier``."""

    name: ClassVar[str] = "full"

    def __init__(self, cfg: AdaptConfig | None = None) -> None:
        self.cfg = cfg or AdaptConfig(strategy=self.name)
        self.blocks: list[Block] = []
        self.trainable: set[int] = set()
        self._anchor: list[tuple[nn.Parameter, torch.Tensor]] = []

    # -- set-up --------------------------------------------------------------------------
    def param_groups(self, model: nn.Module, cfg: TrainConfig) -> list[dict]:
        """Optimizer groups: the backbone (one group, or one per block with layer decay), the head.

        Also records the blocks and, for L2-SP, the starting (pretrained) weights."""
        self.blocks = backbone_blocks(model.backbone)
        head_lr = cfg.head_lr if cfg.head_lr is not None else cfg.lr * self.cfg.head_lr_multiplier
        backbone_decay = 0.0 if self.cfg.l2sp > 0 else cfg.weight_decay  # L2-SP replaces decay towards zero
        groups: list[dict] = []
        if self.cfg.layer_decay == 1.0:
            params = [p for b in self.blocks for p in b.params]
            if params:
                groups.append({"params": params, "lr": cfg.lr, "name": "backbone", "weight_decay": backbone_decay})
        else:
            top = len(self.blocks) - 1
            for depth, block in zip(range(top, -1, -1), self.blocks):
                lr = cfg.lr * self.cfg.layer_decay**depth
                groups.append({"params": block.params, "lr": lr, "name": block.name, "weight_decay": backbone_decay})
        groups.append({"params": list(model.head.parameters()), "lr": head_lr, "name": "head", "weight_decay": cfg.weight_decay})
        if self.cfg.l2sp > 0:
            self._anchor = [(p, p.detach().clone()) for b in self.blocks for p in b.params]
        self.trainable = self.trainable_blocks(1, cfg.epochs)
        self._apply_trainable()
        return groups

    # -- per epoch -----------------------------------------------------------------------
    def trainable_blocks(self, epoch: int, epochs: int) -> set[int]:
        """Indices of the backbone blocks that learn in ``epoch`` (1-based)."""
        return set(range(len(self.blocks)))

    def lr_scale(self, epoch: int, epochs: int) -> float:
        """Factor on every group's scheduled rate in ``epoch``."""
        return 1.0

    def last_stage_start(self, epochs: int) -> int:
        """The first epoch of the last stage: early stopping waits for it, so LP-FT never ends
        as a linear probe and gradual unfreezing always reaches the full network."""
        final = self.trainable_blocks(epochs, epochs)
        epoch = epochs
        while epoch > 1 and self.trainable_blocks(epoch - 1, epochs) == final:
            epoch -= 1
        return epoch

    def start_epoch(self, epoch: int, epochs: int) -> bool:
        """Unfreeze/freeze blocks for ``epoch``; True when the set of learning blocks changed
        (a new stage: the trainer restarts its early-stopping patience)."""
        trainable = self.trainable_blocks(epoch, epochs)
        changed = trainable != self.trainable
        self.trainable = trainable
        self._apply_trainable()
        return changed

    def _apply_trainable(self) -> None:
        for i, block in enumerate(self.blocks):
            for p in block.params:
                p.requires_grad_(i in self.trainable)
            if self.cfg.bn == "frozen":
                for module in block.modules:
                    for m in module.modules():
                        if isinstance(m, _BatchNorm):
                            m.requires_grad_(False)

    def train_mode(self, model: nn.Module) -> None:
        """``model.train()``, except frozen blocks and (unless ``bn: train``) BatchNorm layers."""
        model.train()
        for i, block in enumerate(self.blocks):
            for module in block.modules:
                if i not in self.trainable:
                    module.eval()
                elif self.cfg.bn != "train":
                    for m in module.modules():
                        if isinstance(m, _BatchNorm):
                            m.eval()

    def penalty(self) -> torch.Tensor | None:
        """L2-SP: ``l2sp / 2 * ||w - w_pretrained||^2`` over the backbone, or None."""
        if not self._anchor:
            return None
        return self.cfg.l2sp / 2 * sum((p - p0).pow(2).sum() for p, p0 in self._anchor)


@register_strategy
class LinearProbe(FullFineTuning):
    """Frozen backbone (weights and normalisation statistics); only the head learns."""

    name: ClassVar[str] = "linear_probe"

    def param_groups(self, model: nn.Module, cfg: TrainConfig) -> list[dict]:
        groups = super().param_groups(model, cfg)
        return [g for g in groups if g["name"] == "head"]

    def trainable_blocks(self, epoch: int, epochs: int) -> set[int]:
        return set()


@register_strategy
class LPFT(FullFineTuning):
    """LP-FT (Kumar et al. 2022): probe the head with the backbone frozen for ``probe_epochs``,
    then fine-tune everything with every rate times ``stage2_lr_factor``, so the features that
    a well-fitted head already uses are not distorted by a random head's gradients."""

    name: ClassVar[str] = "lp_ft"

    def probe_epochs(self, epochs: int) -> int:
        return self.cfg.probe_epochs if self.cfg.probe_epochs is not None else max(1, epochs // 2)

    def trainable_blocks(self, epoch: int, epochs: int) -> set[int]:
        return set() if epoch <= self.probe_epochs(epochs) else set(range(len(self.blocks)))

    def lr_scale(self, epoch: int, epochs: int) -> float:
        return 1.0 if epoch <= self.probe_epochs(epochs) else self.cfg.stage2_lr_factor


@register_strategy
class GradualUnfreeze(FullFineTuning):
    """Head only at first, then one more backbone block from the top every ``unfreeze_every`` epochs
    (ULMFiT, Howard & Ruder 2018)."""

    name: ClassVar[str] = "gradual_unfreeze"

    def trainable_blocks(self, epoch: int, epochs: int) -> set[int]:
        count = min(len(self.blocks), (epoch - 1) // self.cfg.unfreeze_every)
        return set(range(len(self.blocks) - count, len(self.blocks)))


def make_strategy(spec: str | AdaptConfig) -> FullFineTuning:
    """The strategy for an :class:`AdaptConfig` (or a bare strategy name, with default options)."""
    name = spec if isinstance(spec, str) else spec.strategy
    return STRATEGIES[name](None if isinstance(spec, str) else spec)
