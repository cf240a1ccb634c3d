"""The training loop: AdamW, warm-up + cosine schedule, early stopping on validation AUROC.

The loop is deliberately plain; what is specific to transfer lives in the strategy and the
domain loss (:mod:`medtl.adapt`), and what is specific to data in the loaders.  With a domain
loss each source batch is paired with a batch of unlabelled target scans; with target scans the
per-epoch log also holds label-free target scores, and ``selection`` may pick the best epoch by
one of them instead of the source validation AUROC.

Under ``torchrun`` the forward/backward runs through ``DistributedDataParallel``, validation is
sharded and its logits gathered before any metric, so every rank takes the same early-stopping
decision; only rank 0 writes the log and checkpoints.  Mixed precision, gradient accumulation,
channels-last and activation checkpointing follow ``TrainConfig``; an epoch's randomness depends
on (seed, epoch) and the checkpointed generator states, so a resumed run is bit-identical.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from medtl.adapt import SCORES, DomainTerm, FullFineTuning, target_scores
from medtl.config import TrainConfig
from medtl.tasks import Multiclass, Task
from medtl.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from medtl.train.data import sharded, start_epoch
from medtl.train.distributed import all_reduce_sum, barrier, is_distributed, is_main
from medtl.train.inference import predict_logits
from medtl.train.logs import EpochLog
from medtl.train.memory import checkpoint_blocks, is_2d
from medtl.train.precision import make_scaler, resolve_amp

log = logging.getLogger(__name__)

HISTORY_FIELDS = ("epoch", "train_loss", "val_loss", "val_auroc", "lr", "seconds", "images_per_s")
DOMAIN_FIELDS = ("domain_loss",)
POSTFIX_EVERY = 20  # steps between progress-bar updates (each one waits for the device)
SINGLE_LABEL = Multiclass(())  # the default task: cross-entropy and AUROC, the same for every single-label task


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` means this process's CUDA device when there is one (``LOCAL_RANK`` under
    torchrun, else the first), and the CPU otherwise."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def configure_determinism(deterministic: bool, device: torch.device) -> None:
    """``deterministic``: only deterministic kernels (torch and cuDNN); otherwise let cuDNN
    pick the fastest convolution algorithms on CUDA."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cudnn.benchmark = not deterministic


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` leaves behind (the model itself holds the best weights)."""

    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_auroc: float = float("nan")
    selection: str = "source_val"
    best_score: float = float("nan")


@dataclass
class _Progress:
    """What :meth:`Trainer.fit` carries from epoch to epoch, and through a checkpoint: the result
    so far, the best epoch's key ``(score, -val_loss)`` and weights, the epochs without a gain."""

    result: FitResult
    best_key: tuple[float, float] = (-math.inf, -math.inf)
    best_state: dict | None = None
    stale: int = 0
    stopped: bool = False
    epoch: int = 0  # the last finished epoch


def _warmup_cosine(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _cycle(loader: DataLoader, epoch: int, seed: int):
    """Endless batches of ``loader``; pass ``k`` of ``epoch`` is seeded by (epoch, k)."""
    for k in range(1 << 30):
        start_epoch(loader, epoch * 1000 + k, seed)
        yield from loader


class _Objective(nn.Module):
    """The forward pass DDP wraps: images to the loss terms, through the classifier and the
    domain loss, so the gradients of every trained parameter are averaged across ranks."""

    def __init__(self, model: nn.Module, domain: DomainTerm | None, loss_fn: nn.Module) -> None:
        super().__init__()
        self.model, self.domain, self.loss_fn = model, domain, loss_fn

    def forward(self, images: torch.Tensor, labels: torch.Tensor, target_images: torch.Tensor | None = None):
        if self.domain is None:
            return self.loss_fn(self.model(images), labels), None
        features = self.model.backbone(torch.cat([images, target_images]))
        logits = self.model.head(features)
        n = len(labels)
        return self.loss_fn(logits[:n], labels), self.domain(features[:n], features[n:], logits[:n], logits[n:])


class Trainer:
    """Fit a classifier with a fine-tuning strategy (and optionally a domain loss); keep the
    best epoch by source validation AUROC or, with ``selection``, a label-free target score
    (``im``, ``entropy``, ``snd``: see :mod:`medtl.adapt.selection`).  ``task`` gives the loss
    (``loss`` replaces it, e.g. a class-weighted one) and the validation AUROC; default: single-label."""

    def __init__(
        self,
        model: nn.Module,
        strategy: FullFineTuning,
        cfg: TrainConfig,
        *,
        device: torch.device | None = None,
        task: Task | None = None,
        loss: nn.Module | None = None,
        domain: DomainTerm | None = None,
        selection: str = "source_val",
    ) -> None:
        self.cfg = cfg
        self.device = device or resolve_device(cfg.device)
        configure_determinism(cfg.deterministic, self.device)
        if cfg.sync_bn and is_distributed():
            if self.device.type != "cuda":
                raise ValueError("train.sync_bn needs CUDA devices (PyTorch's SyncBatchNorm trains on GPU only)")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if cfg.checkpointing:
            log.info("activation checkpointing on %d backbone blocks", checkpoint_blocks(model.backbone))
        channels_last = cfg.channels_last if cfg.channels_last is not None else self.device.type == "cuda"
        self.memory_format = torch.channels_last if channels_last and is_2d(model) else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format)
        self.strategy = strategy
        self.domain = domain.to(self.device) if domain is not None else None
        self.selection = selection
        groups = strategy.param_groups(model, cfg)
        if self.domain is not None:
            groups.append({"params": list(self.domain.parameters()), "lr": groups[-1]["lr"], "name": "domain"})
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=cfg.weight_decay)
        self._base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.task = task if task is not None else SINGLE_LABEL
        self.loss_fn = (loss if loss is not None else self.task.loss()).to(self.device)
        self.amp_dtype = resolve_amp(cfg.amp, self.device)
        self.scaler = make_scaler(self.amp_dtype, self.device)
        self._objective = _Objective(self.model, self.domain, self.loss_fn)
        self._forward: nn.Module | None = None  # (DDP-wrapped) objective of the current stage

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _images(self, batch: dict) -> torch.Tensor:
        return batch["image"].to(self.device, non_blocking=True, memory_format=self.memory_format)

    def _wrapped(self) -> nn.Module:
        """The objective, in DDP under torchrun.  Rebuilt when a strategy stage changes which
        parameters learn (DDP registers the trainable parameters when it is built)."""
        if self._forward is None:
            self._forward = self._objective
            if is_distributed():
                ids = [self.device.index] if self.device.type == "cuda" else None
                self._forward = DistributedDataParallel(self._objective, device_ids=ids)
        return self._forward

    def _set_rates(self, factor: float) -> None:
        for group, base in zip(self.optimizer.param_groups, self._base_lrs):
            group["lr"] = base * factor

    def _train_epoch(self, loader: DataLoader, schedule, epoch: int, target) -> tuple[float, float, float]:
        """Mean source cross-entropy, mean domain loss (NaN without one), images per second."""
        self.strategy.train_mode(self.model)
        if self.domain is not None:
            self.domain.train()
        scale = self.strategy.lr_scale(epoch, self.cfg.epochs)
        forward, accumulate, batches = self._wrapped(), self.cfg.accumulate, len(loader)
        total = torch.zeros(3, device=self.device)  # sums of ce * n, domain loss * n, and n
        started = time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch}/{self.cfg.epochs}", leave=False, unit="batch", disable=not is_main())
        for i, batch in enumerate(bar):
            first = i - i % accumulate
            group = min(accumulate, batches - first)
            last_of_group = i == first + group - 1
            if i == first:
                self._set_rates(schedule(self._step) * scale)
                if self.domain is not None:
                    self.domain.set_progress(self._step / self._total_steps)
            images = self._images(batch)
            labels = batch["label"].to(self.device, non_blocking=True)
            target_images = self._images(next(target)) if self.domain is not None else None
            sync = forward.no_sync() if isinstance(forward, DistributedDataParallel) and not last_of_group else contextlib.nullcontext()
            with sync:
                with self._autocast():
                    ce, domain_loss = forward(images, labels, target_images)
                    objective = ce if domain_loss is None else ce + domain_loss
                    penalty = self.strategy.penalty()
                    if penalty is not None:
                        objective = objective + penalty
                self.scaler.scale(objective / group).backward()
            if last_of_group:
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self._step += 1
            n = len(labels)
            total[0] += ce.detach().float() * n
            if domain_loss is not None:
                total[1] += domain_loss.detach().float() * n
            total[2] += n
            if (i + 1) % POSTFIX_EVERY == 0 or i + 1 == batches:
                ce_sum, _, count = total.tolist()
                bar.set_postfix(loss=f"{ce_sum / count:.4f}", img_s=f"{count / (time.perf_counter() - started):.1f}")
        ce_sum, domain_sum, count = all_reduce_sum(total).tolist()  # over all ranks
        count = max(count, 1)
        return ce_sum / count, domain_sum / count if self.domain is not None else math.nan, count / (time.perf_counter() - started)

    def _logits(self, loader: DataLoader) -> tuple[np.ndarray, np.ndarray]:
        return predict_logits(self.model, loader, self.device, amp_dtype=self.amp_dtype, memory_format=self.memory_format)

    def _state(self, progress: _Progress) -> dict:
        """What training continues from.  Once training has finished, only the chosen weights, the
        result and the random state: the optimizer's moments and a second copy of the weights would
        make the file that stays in the run folder three to four times the model's size."""
        finished = progress.stopped or progress.epoch >= self.cfg.epochs
        state = {
            "epoch": progress.epoch,
            "finished": finished,
            "model": progress.best_state if finished and progress.best_state is not None else self.model.state_dict(),
            "rng": rng_state(),
            "best_key": list(progress.best_key),
            "stale": progress.stale,
            "stopped": progress.stopped,
            "result": asdict(progress.result),
        }
        if not finished:
            state.update(step=self._step, domain=self.domain.state_dict() if self.domain is not None else {},
                         optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(), best_state=progress.best_state)
        return state

    def _resume(self, checkpoint: Path | None) -> _Progress:
        """Model, optimizer, schedule position, random state and early-stopping state from ``checkpoint``;
        from the checkpoint of a finished run, the chosen weights and the result (nothing left to train)."""
        if checkpoint is None:
            raise ValueError("resume=True needs the checkpoint file to resume from")
        state = load_checkpoint(checkpoint)
        self.model.load_state_dict(state["model"])
        result, best_key = FitResult(**state["result"]), tuple(state["best_key"])
        if state.get("finished"):
            if not state["stopped"] and state["epoch"] < self.cfg.epochs:
                raise ValueError(f"{checkpoint}: training finished after epoch {state['epoch']} and its checkpoint keeps only "
                                 f"the chosen weights, so it cannot go on to epoch {self.cfg.epochs}; start a new run "
                                 "(model.weights: bundle:RUN_DIR/bundle continues from these weights)")
            self.strategy.start_epoch(state["epoch"], self.cfg.epochs)
            progress = _Progress(result, best_key, None, state["stale"], True, state["epoch"])
        else:
            if self.domain is not None:
                self.domain.load_state_dict(state["domain"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            self.strategy.start_epoch(state["epoch"], self.cfg.epochs)
            self._step = state["step"]
            progress = _Progress(result, best_key, state["best_state"], state["stale"], state["stopped"], state["epoch"])
        set_rng_state(state["rng"])
        log.info("resuming from %s after epoch %d", checkpoint, state["epoch"])
        return progress

    def _check_loaders(self, train_loader: DataLoader, val_loader: DataLoader, target_loader: DataLoader | None,
                       target_eval_loader: DataLoader | None) -> tuple[DataLoader, DataLoader | None]:
        """The validation and target-evaluation loaders to use (sharded under torchrun), after
        checking that the domain loss and the selection score have the scans they need."""
        if self.domain is not None and target_loader is None:
            raise ValueError(f"domain loss '{self.domain.method}' needs target scans (target_loader)")
        if self.selection != "source_val" and target_eval_loader is None:
            raise ValueError(f"adapt.selection={self.selection} needs unlabelled target scans")
        if is_distributed():
            if not isinstance(train_loader.sampler, DistributedSampler):
                raise ValueError("under torchrun the training loader needs a DistributedSampler (make_loader builds one)")
            val_loader = sharded(val_loader)
            target_eval_loader = sharded(target_eval_loader) if target_eval_loader is not None else None
        return val_loader, target_eval_loader

    def _schedule(self, batches_per_epoch: int):
        """Warm-up + cosine over every optimizer step of the run; resets the step counter."""
        per_epoch = math.ceil(batches_per_epoch / self.cfg.accumulate)
        steps = self.cfg.epochs * per_epoch
        self._step, self._total_steps = 0, max(steps, 1)
        return _warmup_cosine(steps, warmup_steps=min(per_epoch, steps // 10 + 1))

    def _epoch(self, epoch: int, progress: _Progress, schedule, train_loader: DataLoader, val_loader: DataLoader,
               target_loader: DataLoader | None, target_eval_loader: DataLoader | None) -> dict:
        """Train one epoch and validate: the epoch's row of the log."""
        start = time.perf_counter()
        if self.strategy.start_epoch(epoch, self.cfg.epochs) and epoch > 1:
            progress.stale, self._forward = 0, None
            log.info("epoch %d: new stage, trainable blocks %s", epoch, sorted(self.strategy.trainable))
        start_epoch(train_loader, epoch, self.cfg.seed)
        target = _cycle(target_loader, epoch, self.cfg.seed) if self.domain is not None else None
        train_loss, domain_loss, rate = self._train_epoch(train_loader, schedule, epoch, target)
        logits, labels = self._logits(val_loader)
        val_loss = float(self.loss_fn(torch.as_tensor(logits).to(self.device), torch.as_tensor(labels).to(self.device)))
        val_auroc = self.task.score(labels, logits)
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
            row.update({k: round(v, 6) for k, v in target_scores(self._logits(target_eval_loader)[0]).items()})
        row["seconds"] = round(time.perf_counter() - start, 2)
        row["images_per_s"] = round(rate, 1)
        log.info("epoch %d: train loss %.4f, val loss %.4f, val AUROC %.4f (%.1fs, %.0f img/s, about %.0fs to go)",
                 epoch, train_loss, val_loss, val_auroc, row["seconds"], rate, row["seconds"] * (self.cfg.epochs - epoch))
        self._select(epoch, progress, val_auroc, val_loss, row)
        return row

    def _select(self, epoch: int, progress: _Progress, val_auroc: float, val_loss: float, row: dict) -> None:
        """Keep the epoch if its selection score beats the best (ties: lower validation loss), else
        count it towards early stopping, which waits for the strategy's last stage."""
        score = val_auroc if self.selection == "source_val" else row[f"target_{self.selection}"]
        key = (score if not math.isnan(score) else -math.inf, -val_loss)
        if key > progress.best_key:
            progress.best_key, progress.stale = key, 0
            progress.best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            progress.result.best_epoch, progress.result.best_auroc, progress.result.best_score = epoch, val_auroc, score
        else:
            progress.stale += 1
            if progress.stale >= self.cfg.patience and epoch >= self.strategy.last_stage_start(self.cfg.epochs):
                log.info("early stop: no gain in %s for %d epochs", self.selection, progress.stale)
                progress.stopped = True

    def fit(
        self,
        train_loader: DataLoader,
        val_loader: DataLoader,
        *,
        target_loader: DataLoader | None = None,
        target_eval_loader: DataLoader | None = None,
        log_path: Path | None = None,
        checkpoint: Path | None = None,
        resume: bool = False,
    ) -> FitResult:
        """Train for ``cfg.epochs`` (or until ``cfg.patience`` epochs bring no gain in the
        selection score), then restore the best epoch's weights.  Ties go to the lower
        validation loss; patience restarts when the strategy starts a new stage, and no stop comes
        before its last stage has begun.

        ``target_loader``: unlabelled target batches paired with the source batches (needed by a
        domain loss); ``target_eval_loader`` (default: ``target_loader``): the target scans the
        label-free scores are computed on each epoch.  ``checkpoint``: file written every
        ``cfg.checkpoint_every`` epochs and at the end; with ``resume`` training continues from it."""
        val_loader, target_eval_loader = self._check_loaders(train_loader, val_loader, target_loader,
                                                             target_eval_loader or target_loader)
        schedule = self._schedule(len(train_loader))
        progress = self._resume(checkpoint) if resume else _Progress(FitResult(selection=self.selection))
        fields = (HISTORY_FIELDS + (DOMAIN_FIELDS if self.domain is not None else ())
                  + (tuple(f"target_{name}" for name in SCORES) if target_eval_loader else ()))
        epoch_log = EpochLog(log_path, fields, progress.result.history) if log_path is not None and is_main() else None
        try:
            for epoch in range(progress.epoch + 1, self.cfg.epochs + 1):
                if progress.stopped:
                    break
                row = self._epoch(epoch, progress, schedule, train_loader, val_loader, target_loader, target_eval_loader)
                progress.result.history.append(row)
                progress.epoch = epoch
                if epoch_log is not None:
                    epoch_log.write(row)
                due = epoch % self.cfg.checkpoint_every == 0 or progress.stopped or epoch == self.cfg.epochs
                if checkpoint is not None and due and is_main():
                    save_checkpoint(self._state(progress), checkpoint)
        finally:
            if epoch_log is not None:
                epoch_log.close()
        barrier()
        if progress.best_state is not None:
            self.model.load_state_dict(progress.best_state)
        return progress.result
