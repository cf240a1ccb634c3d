"""Training: data loaders and the fine-tuning loop."""

from medtl.train.data import class_weights, labelled_items, make_loader, resolve_classes
from medtl.train.trainer import FitResult, Trainer, auroc, resolve_device

__all__ = [
    "FitResult",
    "Trainer",
    "auroc",
    "class_weights",
    "labelled_items",
    "make_loader",
    "resolve_classes",
    "resolve_device",
]
