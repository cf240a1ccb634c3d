"""Fine-tuning strategies: which parameters learn, at which rate, and in which mode.

A strategy turns a :class:`~medtl.backbones.Classifier` and the training settings into optimizer
parameter groups, and puts the model into the right train/eval mode each epoch.  The trainer
knows nothing else about transfer, so new strategies (LP-FT, gradual unfreezing, layer-wise
decay) plug in here.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from medtl.config import TrainConfig


class FullFineTuning:
    """Every parameter learns; the new head at ``head_lr`` (default 10x the backbone rate)."""

    name: ClassVar[str] = "full"

    def param_groups(self, model: nn.Module, cfg: TrainConfig) -> list[dict]:
        head_lr = cfg.head_lr if cfg.head_lr is not None else 10 * cfg.lr
        backbone = [p for p in model.backbone.parameters() if p.requires_grad]
        groups = [{"params": list(model.head.parameters()), "lr": head_lr, "name": "head"}]
        if backbone:
            groups.insert(0, {"params": backbone, "lr": cfg.lr, "name": "backbone"})
        return groups

    def train_mode(self, model: nn.Module) -> None:
        model.train()


class LinearProbe(FullFineTuning):
    """Frozen backbone (weights and normalisation statistics); only the head learns."""

    name: ClassVar[str] = "linear_probe"

    def param_groups(self, model: nn.Module, cfg: TrainConfig) -> list[dict]:
        model.backbone.requires_grad_(False)
        return super().param_groups(model, cfg)

    def train_mode(self, model: nn.Module) -> None:
        model.train()
        model.backbone.eval()


STRATEGIES: dict[str, type[FullFineTuning]] = {cls.name: cls for cls in (FullFineTuning, LinearProbe)}


def make_strategy(name: str) -> FullFineTuning:
    """The strategy registered under ``name`` (config ``train.strategy``)."""
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ValueError(f"unknown fine-tuning strategy '{name}'; choose one of {sorted(STRATEGIES)}") from None
