"""Training: data loaders, the fine-tuning loop, distributed runs and resumable checkpoints."""

from medtl.tasks import class_weights, resolve_classes, softmax
from medtl.train.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from medtl.train.data import labelled_items, make_loader, micro_batch_size
from medtl.train.distributed import distributed_session, is_main, world_size
from medtl.train.folds import Member, cross_validation_members, seed_members
from medtl.train.inference import predict_logits
from medtl.train.trainer import FitResult, Trainer, resolve_device

__all__ = [
    "CHECKPOINT_FILE",
    "FitResult",
    "Member",
    "Trainer",
    "class_weights",
    "cross_validation_members",
    "distributed_session",
    "is_main",
    "labelled_items",
    "load_checkpoint",
    "make_loader",
    "micro_batch_size",
    "predict_logits",
    "resolve_classes",
    "resolve_device",
    "save_checkpoint",
    "seed_members",
    "softmax",
    "world_size",
]
