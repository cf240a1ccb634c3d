"""The training loop: AdamW, warm-up + cosine schedule, early stopping on validation AUROC.

The loop is deliberately plain; what is specific to transfer lives in the strategy and the
domain loss (:mod:`medtl.adapt`), and what is specific to data in the loaders.  With a domain
loss each source batch is paired with a batch of unlabelled target scans; with target scans the
per-epoch log also holds label-free target scores, and ``selection`` may pick the best epoch by
one of them instead of the source validation AUROC.
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

from medtl.adapt import DomainTerm, FullFineTuning, target_scores
from medtl.config import TrainConfig

log = logging.getLogger(__name__)

HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_auroc", "lr", "seconds")
DOMAIN_FIELDS = ("domain_loss",)
TARGET_FIELDS = ("target_im", "target_entropy", "target_snd")


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
    selection: str = "source_val"
    best_score: float = float("nan")


def _warmup_cosine(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _cycle(loader: DataLoader):
    while True:
        yield from loader


class Trainer:
    """Fit a classifier with a fine-tuning strategy (and optionally a domain loss); keep the
    best epoch by source validation AUROC or, with ``selection``, a label-free target score
    (``im``, ``entropy``, ``snd``: see :mod:`medtl.adapt.selection`)."""

    def __init__(
        self,
        model: nn.Module,
        strategy: FullFineTuning,
        cfg: TrainConfig,
        *,
        device: torch.device | None = None,
        class_weights: torch.Tensor | None = None,
        domain: DomainTerm | None = None,
        selection: str = "source_val",
    ) -> None:
        self.cfg = cfg
        self.device = device or resolve_device(cfg.device)
        self.model = model.to(self.device)
        self.strategy = strategy
        self.domain = domain.to(self.device) if domain is not None else None
        self.selection = selection
        groups = strategy.param_groups(model, cfg)
        if self.domain is not None:
            groups.append({"params": list(self.domain.parameters()), "lr": groups[-1]["lr"], "name": "domain"})
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=cfg.weight_decay)
        self._base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        weight = class_weights.to(self.device) if class_weights is not None else None
        self.loss_fn = nn.CrossEntropyLoss(weight=weight)

    def _set_rates(self, factor: float) -> None:
        for group, base in zip(self.optimizer.param_groups, self._base_lrs):
            group["lr"] = base * factor

    def _step_loss(self, batch: dict, target) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Source cross-entropy, the objective (plus penalty and domain loss), the domain loss."""
        images = batch["image"].to(self.device, non_blocking=True)
        labels = batch["label"].to(self.device, non_blocking=True)
        domain_loss = None
        if self.domain is None:
            ce = self.loss_fn(self.model(images), labels)
        else:
            target_images = next(target)["image"].to(self.device, non_blocking=True)
            features = self.model.backbone(torch.cat([images, target_images]))
            logits = self.model.head(features)
            n = len(labels)
            ce = self.loss_fn(logits[:n], labels)
            domain_loss = self.domain(features[:n], features[n:], logits[:n], logits[n:])
        objective = ce if domain_loss is None else ce + domain_loss
        penalty = self.strategy.penalty()
        if penalty is not None:
            objective = objective + penalty
        return ce, objective, domain_loss

    def _train_epoch(self, loader: DataLoader, schedule, epoch: int, target) -> tuple[float, float]:
        """Mean source cross-entropy and mean domain loss (NaN without one) over the epoch."""
        self.strategy.train_mode(self.model)
        if self.domain is not None:
            self.domain.train()
        scale = self.strategy.lr_scale(epoch, self.cfg.epochs)
        total, total_domain, count = 0.0, 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch}/{self.cfg.epochs}", leave=False, unit="batch")
        for batch in bar:
            self._set_rates(schedule(self._step) * scale)
            if self.domain is not None:
                self.domain.set_progress(self._step / self._total_steps)
            ce, objective, domain_loss = self._step_loss(batch, target)
            self.optimizer.zero_grad(set_to_none=True)
            objective.backward()
            self.optimizer.step()
            self._step += 1
            n = len(batch["label"])
            total += ce.item() * n
            total_domain += domain_loss.item() * n if domain_loss is not None else math.nan
            count += n
            bar.set_postfix(loss=f"{total / count:.4f}")
        return total / max(count, 1), total_domain / max(count, 1)

    @torch.inference_mode()
    def predict_logits(self, loader: DataLoader) -> tuple[np.ndarray, np.ndarray]:
        """Logits and labels of every item in ``loader`` (model in eval mode)."""
        self.model.eval()
        logits, labels = [], []
        for batch in loader:
            logits.append(self.model(batch["image"].to(self.device)).float().cpu())
            labels.append(batch["label"])
        return torch.cat(logits).numpy(), torch.cat(labels).numpy()

    def fit(
        self,
        train_loader: DataLoader,
        val_loader: DataLoader,
        *,
        target_loader: DataLoader | None = None,
        target_eval_loader: DataLoader | None = None,
        log_path: Path | None = None,
    ) -> FitResult:
        """Train for ``cfg.epochs`` (or until ``cfg.patience`` epochs bring no gain in the
        selection score), then restore the best epoch's weights.  Ties go to the lower
        validation loss; patience restarts when the strategy starts a new stage.

        ``target_loader``: unlabelled target batches paired with the source batches (needed by a
        domain loss); ``target_eval_loader`` (default: ``target_loader``): the target scans the
        label-free scores are computed on each epoch."""
        if self.domain is not None and target_loader is None:
            raise ValueError(f"domain loss '{self.domain.method}' needs target scans (target_loader)")
        target_eval_loader = target_eval_loader or target_loader
        if self.selection != "source_val" and target_eval_loader is None:
            raise ValueError(f"adapt.selection={self.selection} needs unlabelled target scans")
        steps = self.cfg.epochs * len(train_loader)
        schedule = _warmup_cosine(steps, warmup_steps=min(len(train_loader), steps // 10 + 1))
        self._step, self._total_steps = 0, max(steps, 1)
        target = _cycle(target_loader) if self.domain is not None else None
        fields = HISTORY_FIELDS + (DOMAIN_FIELDS if self.domain is not None else ()) + (TARGET_FIELDS if target_eval_loader else ())
        result = FitResult(selection=self.selection)
        best_key, best_state, stale = (-math.inf, -math.inf), None, 0
        writer, handle = None, None
        if log_path is not None:
            handle = open(log_path, "w", newline="")
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
        try:
            for epoch in range(1, self.cfg.epochs + 1):
                start = time.perf_counter()
                if self.strategy.start_epoch(epoch, self.cfg.epochs) and epoch > 1:
                    stale = 0
                    log.info("epoch %d: new stage, trainable blocks %s", epoch, sorted(self.strategy.trainable))
                train_loss, domain_loss = self._train_epoch(train_loader, schedule, epoch, target)
                logits, labels = self.predict_logits(val_loader)
                val_loss = float(self.loss_fn(torch.as_tensor(logits).to(self.device), torch.as_tensor(labels).to(self.device)))
                val_auroc = auroc(labels, logits)
                row = {
                    "epoch": epoch,
                    "train_loss": round(train_loss, 6),
                    "val_loss": round(val_loss, 6),
                    "val_auroc": round(val_auroc, 6),
                    "lr": self.optimizer.param_groups[0]["lr"],
                }
                if self.domain is not None:
                    row["domain_loss"] = round(domain_loss, 6)
                if target_eval_loader is not None:
                    row.update({k: round(v, 6) for k, v in target_scores(self.predict_logits(target_eval_loader)[0]).items()})
                row["seconds"] = round(time.perf_counter() - start, 2)
                result.history.append(row)
                if writer is not None:
                    writer.writerow(row)
                    handle.flush()
                log.info("epoch %d: train loss %.4f, val loss %.4f, val AUROC %.4f (%.1fs)", epoch, train_loss, val_loss, val_auroc, row["seconds"])
                score = val_auroc if self.selection == "source_val" else row[f"target_{self.selection}"]
                key = (score if not math.isnan(score) else -math.inf, -val_loss)
                if key > best_key:
                    best_key, stale = key, 0
                    best_state = copy.deepcopy({k: v.detach().cpu() for k, v in self.model.state_dict().items()})
                    result.best_epoch, result.best_auroc, result.best_score = epoch, val_auroc, score
                else:
                    stale += 1
                    if stale >= self.cfg.patience:
                        log.info("early stop: no gain in %s for %d epochs", self.selection, stale)
                        break
        finally:
            if handle is not None:
                handle.close()
        if best_state is not None:
            self.model.load_state_dict(best_state)
        return result
