"""The training loop: AdamW, warm-up + cosine schedule, early stopping on validation AUROC.

The loop is deliberately plain; what is specific to transfer lives in the strategy
(:mod:`medtl.adapt`), and what is specific to data in the loaders.
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from medtl.adapt import FullFineTuning
from medtl.config import TrainConfig

log = logging.getLogger(__name__)

HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_auroc", "lr", "seconds")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` means this process's CUDA device when there is one (``LOCAL_RANK`` under
    torchrun, else the first), and the CPU otherwise."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def auroc(labels: np.ndarray, logits: np.ndarray) -> float:
    """Validation AUROC: positive-class score for two classes, macro one-vs-rest otherwise.

    NaN when the labels hold a single class (AUROC is undefined there)."""
    if len(np.unique(labels)) < 2:
        return float("nan")
    probs = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1).numpy()
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    return float(roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=np.arange(probs.shape[1])))


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` leaves behind (the model itself holds the best weights)."""

    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_auroc: float = float("nan")


def _warmup_cosine(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class Trainer:
    """Fit a classifier with a fine-tuning strategy; keep the best epoch by validation AUROC."""

    def __init__(
        self,
        model: nn.Module,
        strategy: FullFineTuning,
        cfg: TrainConfig,
        *,
        device: torch.device | None = None,
        class_weights: torch.Tensor | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = device or resolve_device(cfg.device)
        self.model = model.to(self.device)
        self.strategy = strategy
        self.optimizer = torch.optim.AdamW(strategy.param_groups(model, cfg), weight_decay=cfg.weight_decay)
        weight = class_weights.to(self.device) if class_weights is not None else None
        self.loss_fn = nn.CrossEntropyLoss(weight=weight)

    def _train_epoch(self, loader: DataLoader, scheduler, epoch: int) -> float:
        self.strategy.train_mode(self.model)
        total, count = 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch}/{self.cfg.epochs}", leave=False, unit="batch")
        for batch in bar:
            images = batch["image"].to(self.device, non_blocking=True)
            labels = batch["label"].to(self.device, non_blocking=True)
            loss = self.loss_fn(self.model(images), labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            scheduler.step()
            total += loss.item() * len(labels)
            count += len(labels)
            bar.set_postfix(loss=f"{total / count:.4f}")
        return total / max(count, 1)

    @torch.inference_mode()
    def predict_logits(self, loader: DataLoader) -> tuple[np.ndarray, np.ndarray]:
        """Logits and labels of every item in ``loader`` (model in eval mode)."""
        self.model.eval()
        logits, labels = [], []
        for batch in loader:
            logits.append(self.model(batch["image"].to(self.device)).float().cpu())
            labels.append(batch["label"])
        return torch.cat(logits).numpy(), torch.cat(labels).numpy()

    def fit(self, train_loader: DataLoader, val_loader: DataLoader, *, log_path: Path | None = None) -> FitResult:
        """Train for ``cfg.epochs`` (or until ``cfg.patience`` epochs bring no AUROC gain), then
        restore the best epoch's weights.  Ties in AUROC go to the lower validation loss."""
        steps = self.cfg.epochs * len(train_loader)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _warmup_cosine(steps, warmup_steps=min(len(train_loader), steps // 10 + 1))
        )
        result = FitResult()
        best_key, best_state, stale = (-math.inf, -math.inf), None, 0
        writer, handle = None, None
        if log_path is not None:
            handle = open(log_path, "w", newline="")
            writer = csv.DictWriter(handle, fieldnames=HISTORY_FIELDS)
            writer.writeheader()
        try:
            for epoch in range(1, self.cfg.epochs + 1):
                start = time.perf_counter()
                train_loss = self._train_epoch(train_loader, scheduler, epoch)
                logits, labels = self.predict_logits(val_loader)
                val_loss = float(self.loss_fn(torch.as_tensor(logits).to(self.device), torch.as_tensor(labels).to(self.device)))
                val_auroc = auroc(labels, logits)
                row = {
                    "epoch": epoch,
                    "train_loss": round(train_loss, 6),
                    "val_loss": round(val_loss, 6),
                    "val_auroc": round(val_auroc, 6),
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "seconds": round(time.perf_counter() - start, 2),
                }
                result.history.append(row)
                if writer is not None:
                    writer.writerow(row)
                    handle.flush()
                log.info("epoch %d: train loss %.4f, val loss %.4f, val AUROC %.4f (%.1fs)", epoch, train_loss, val_loss, val_auroc, row["seconds"])
                key = (val_auroc if not math.isnan(val_auroc) else -math.inf, -val_loss)
                if key > best_key:
                    best_key, stale = key, 0
                    best_state = copy.deepcopy({k: v.detach().cpu() for k, v in self.model.state_dict().items()})
                    result.best_epoch, result.best_auroc = epoch, val_auroc
                else:
                    stale += 1
                    if stale >= self.cfg.patience:
                        log.info("early stop: no validation AUROC gain for %d epochs", stale)
                        break
        finally:
            if handle is not None:
                handle.close()
        if best_state is not None:
            self.model.load_state_dict(best_state)
        return result
