"""Multi-task models: one backbone, several named heads, each with its own task type.

``task.type: multitask`` with ``task.heads``, e.g. a diagnosis head and a modality head.  A binary
or multiclass head reads the manifest column named like the head (a class name, or blank when
unknown); a multilabel head reads one 0/1 column per finding.  A row is labelled when any head
is known, so scans labelled for one head only (a public set with another task's labels) still
train the backbone.  The model has one linear layer whose outputs are the heads' logits side by
side (the same as a linear layer per head); a head's loss (cross-entropy, or masked BCE) runs
over the rows where it is known, and the training loss is the heads' losses summed with their
``weight``.  Each head is then calibrated, thresholded, reported and predicted on its own, on
its known scans, exactly as a single-task model of its type; the validation metric is the
heads' scores averaged with their weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from torch import nn

from medtl.io import ManifestError, ScanRecord, read_manifest
from medtl.registry import TASKS
from medtl.tasks.base import Task, register_task
from medtl.tasks.single import SingleLabel


@dataclass(frozen=True)
class Head:
    """A named head: its task, its weight in the loss, and where its logits and targets sit
    (``outputs``: columns of the logits; ``targets``: columns of the target rows; a single-label
    head has one target column, the class index, NaN when unknown)."""

    name: str
    task: Task
    weight: float
    outputs: slice
    targets: slice

    @property
    def single(self) -> bool:
        return isinstance(self.task, SingleLabel)

    def view(self, record: ScanRecord) -> ScanRecord:
        """``record`` as this head's own task reads it (a single-label head's column as its label)."""
        if not self.single:
            return record
        return replace(record, label=(record.extra.get(self.name) or "").strip() or None)

    def known(self, targets: np.ndarray) -> np.ndarray:
        """The rows of ``targets`` (all heads' columns) where this head is known."""
        return ~np.isnan(np.asarray(targets, dtype=np.float64)[:, self.targets]).all(axis=1)

    def labels(self, targets: np.ndarray) -> np.ndarray:
        """This head's targets as its own task takes them (class indices, or 0/1/NaN per finding)."""
        y = np.asarray(targets)[:, self.targets]
        return y[:, 0].astype(int) if self.single else y.astype(np.float64)


class HeadSpec(NamedTuple):
    """A head as ``task.heads`` gives it (or a bundle stored it)."""

    name: str
    type: str
    classes: list[str]
    positive_class: str | None
    weight: float


def _heads(specs: Sequence[tuple[str, Task, float]]) -> list[Head]:
    heads, out, tgt = [], 0, 0
    for name, task, weight in specs:
        width = 1 if isinstance(task, SingleLabel) else task.outputs
        heads.append(Head(name, task, float(weight), slice(out, out + task.outputs), slice(tgt, tgt + width)))
        out, tgt = out + task.outputs, tgt + width
    return heads


class MultiTaskLoss(nn.Module):
    """The heads' losses, each over the rows where its head is known, summed with the heads' weights."""

    def __init__(self, heads: Sequence[Head], losses: Sequence[nn.Module]) -> None:
        super().__init__()
        self.heads = list(heads)
        self.losses = nn.ModuleList(losses)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        total = logits.sum() * 0.0  # keeps the graph when a batch has no known label for any head
        for head, loss in zip(self.heads, self.losses):
            y = targets[:, head.targets]
            known = ~torch.isnan(y).all(dim=1)
            if known.any():
                z = logits[known][:, head.outputs]
                total = total + head.weight * loss(z, y[known][:, 0].long() if head.single else y[known])
        return total


class MultiTaskCalibration:
    """Each head's own calibrator, fitted on the rows where that head is known."""

    def __init__(self, heads: Sequence[Head], calibrators: Sequence[Any]) -> None:
        self.heads, self.calibrators = list(heads), list(calibrators)

    @property
    def method(self) -> str:
        return "per-head " + ", ".join(f"{h.name}: {c.method}" for h, c in zip(self.heads, self.calibrators))

    def fit(self, logits: Any, labels: Any) -> MultiTaskCalibration:
        z, y = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.float64)
        for head, calibrator in zip(self.heads, self.calibrators):
            known = head.known(y)
            calibrator.fit(z[known][:, head.outputs], head.labels(y[known]))
        return self

    def transform(self, logits: Any) -> np.ndarray:
        z = np.asarray(logits, dtype=np.float64)
        return np.column_stack([c.transform(z[:, h.outputs]) for h, c in zip(self.heads, self.calibrators)])

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "heads": {h.name: c.to_dict() for h, c in zip(self.heads, self.calibrators)}}


@register_task
class MultiTask(Task):
    """Several named heads on one backbone (``task.heads``); each head is a task of its own."""

    name = "multitask"
    report_layout = "per_head"
    ensembles = False  # members pool log-softmax outputs: single-label only
    specs: ClassVar[tuple[Any, ...]] = ()  # the config's task.heads, on a class from :meth:`configured`

    def __init__(self, heads: Sequence[Head]) -> None:
        super().__init__([f"{h.name}:{n}" for h in heads for n in h.task.names])
        self.heads = list(heads)

    @classmethod
    def configured(cls, specs: Sequence[Any]) -> type[MultiTask]:
        """The task class for the config's ``task.heads`` (what reads the manifest and builds the task)."""
        if not specs:
            raise ValueError("task.type=multitask needs task.heads")
        return type(cls.__name__, (cls,), {"specs": tuple(specs)})

    @classmethod
    def _head_tasks(cls, records: Sequence[ScanRecord] | None = None) -> list[Head]:
        """The configured heads; with ``records`` each head's classes are checked against them."""
        specs = []
        for spec in cls.specs:
            kind = TASKS[spec.type]
            if records is None:
                positive = None if spec.type != "binary" else spec.classes.index(spec.positive_class or spec.classes[-1])
                specs.append((spec.name, kind(spec.classes, positive), spec.weight))
                continue
            view = [replace(r, label=(r.extra.get(spec.name) or "").strip() or None) for r in records] \
                if spec.type != "multilabel" else list(records)
            task = kind.from_records([r for r in view if r.label], spec.classes, spec.positive_class)
            specs.append((spec.name, task, spec.weight))
        return _heads(specs)

    # --- data --------------------------------------------------------------------------------
    @classmethod
    def read(cls, path: str | Path, names: Sequence[str] | None, *, check_files: bool = True) -> list[ScanRecord]:
        """The manifest's rows; a row is labelled when any head is known (its label, the split
        stratum, joins the heads' values)."""
        records = read_manifest(path, check_files=check_files, require_label=False)
        heads = cls._head_tasks()
        columns = {c for h in heads for c in ([h.name] if h.single else h.task.names)}
        missing = sorted(columns - set(records[0].extra)) if records else []
        if missing:
            raise ManifestError(f"{path}: missing column(s) {missing} of task.heads")
        labelled = []
        for r in records:
            parts = []
            for head in heads:
                view = head.view(r)
                if head.single:
                    if view.label is not None and view.label not in head.task.names:
                        raise ManifestError(f"{path}, row {r.row}, column '{head.name}': '{view.label}' is not one of {head.task.names}")
                    parts.append(view.label or "?")
                else:
                    y = head.task.target(view)
                    parts.append("+".join(n for n, v in zip(head.task.names, y) if v == 1) or ("none" if (y == 0).any() else "?"))
            labelled.append(replace(r, label="|".join(parts) if any(p != "?" for p in parts) else None))
        return labelled

    @classmethod
    def from_records(cls, records: Sequence[ScanRecord], names: Sequence[str] | None, positive: str | None) -> MultiTask:
        return cls(cls._head_tasks(records))

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> MultiTask:
        """The bundle's task, bound to its heads (so it also reads a labelled manifest, for ``medtl evaluate``)."""
        specs = [HeadSpec(h["name"], h["type"], h["classes"], h["classes"][h["positive_index"]] if h.get("positive_index") is not None
                          else None, h["weight"]) for h in meta["task"]["heads"]]
        bound = cls.configured(specs)
        return bound(bound._head_tasks())

    def target(self, record: ScanRecord) -> np.ndarray:
        cells = []
        for head in self.heads:
            view = head.view(record)
            if head.single:
                cells.append([np.nan if view.label is None else float(head.task.target(view))])
            else:
                cells.append(head.task.target(view))
        return np.concatenate(cells).astype(np.float32)

    def targets(self, records: Sequence[ScanRecord]) -> np.ndarray:
        width = self.heads[-1].targets.stop
        return np.stack([self.target(r) for r in records]) if records else np.empty((0, width), dtype=np.float32)

    def counts(self, records: Sequence[ScanRecord]) -> dict[str, int]:
        views = {h.name: [h.view(r) for r in records] for h in self.heads}
        return {f"{h.name}:{k}": v for h in self.heads for k, v in h.task.counts(views[h.name]).items()}

    # --- model -------------------------------------------------------------------------------
    def loss(self, items: Sequence[dict] | None = None) -> nn.Module:
        losses = []
        for head in self.heads:
            if items is None:
                losses.append(head.task.loss())
                continue
            y = np.stack([item["label"] for item in items])[:, head.targets]
            known = ~np.isnan(y).all(axis=1)
            sub = [{"label": int(v[0]) if head.single else v} for v in y[known]]
            losses.append(head.task.loss(sub))
        return MultiTaskLoss(self.heads, losses)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        z = np.asarray(logits)
        return np.column_stack([h.task.probabilities(z[:, h.outputs]) for h in self.heads])

    def score(self, labels: np.ndarray, logits: np.ndarray) -> float:
        """The heads' validation scores (each on its known rows) averaged with the heads' weights."""
        z = np.asarray(logits)
        scores, weights = [], []
        for head in self.heads:
            known = head.known(labels)
            value = head.task.score(head.labels(labels[known]), z[known][:, head.outputs]) if known.sum() > 1 else float("nan")
            if np.isfinite(value):
                scores.append(value)
                weights.append(head.weight)
        return float(np.average(scores, weights=weights)) if scores else float("nan")

    # --- calibration and decisions -----------------------------------------------------------
    def calibrator(self, method: str) -> MultiTaskCalibration:
        return MultiTaskCalibration(self.heads, [h.task.calibrator(method) for h in self.heads])

    def load_calibrator(self, d: Mapping[str, Any]) -> MultiTaskCalibration:
        return MultiTaskCalibration(self.heads, [h.task.load_calibrator(d["heads"][h.name]) for h in self.heads])

    def choose_decision(self, labels: np.ndarray, probs: np.ndarray, method: str, target: float | None) -> dict[str, Any]:
        """Each head's decision rule, chosen on its known rows."""
        decisions = {}
        for head in self.heads:
            known = head.known(labels)
            decisions[head.name] = head.task.choose_decision(head.labels(labels[known]), probs[known][:, head.outputs], method, target)
        return decisions

    def decision_to_dict(self, decision: Mapping[str, Any]) -> dict[str, Any]:
        return {h.name: h.task.decision_to_dict(decision[h.name]) for h in self.heads}

    def load_decision(self, d: Any) -> dict[str, Any] | None:
        return {h.name: h.task.load_decision(d.get(h.name)) for h in self.heads} if d else None

    def _decision(self, decision: Mapping[str, Any] | None, head: Head) -> Any:
        return decision.get(head.name) if decision else None

    def decide(self, probs: np.ndarray, decision: Mapping[str, Any] | None) -> np.ndarray:
        """Each head's decisions side by side, in the targets' columns (a class index per
        single-label head, 0/1 per finding of a multilabel one)."""
        p = np.asarray(probs)
        return np.column_stack([h.task.decide(p[:, h.outputs], self._decision(decision, h)) for h in self.heads])

    def uncertain(self, probs: np.ndarray, decision: Mapping[str, Any] | None, band: float | np.ndarray) -> np.ndarray:
        """Any head's decision within ``band`` of flipping."""
        p = np.asarray(probs)
        flags = [h.task.uncertain(p[:, h.outputs], self._decision(decision, h), band) for h in self.heads]
        return np.any(flags, axis=0)

    def _part(self, decided: np.ndarray, head: Head) -> Any:
        part = np.asarray(decided)[..., head.targets]
        return part[..., 0] if head.single else part

    def named(self, decided: np.ndarray) -> list[dict[str, Any]]:
        per_head = {h.name: h.task.named(self._part(decided, h)) for h in self.heads}
        return [{name: values[i] for name, values in per_head.items()} for i in range(len(decided))]

    # --- outputs ------------------------------------------------------------------------------
    def columns(self) -> list[str]:
        return [f"{h.name}_{c}" for h in self.heads for c in h.task.columns()]

    def row(self, probs: np.ndarray, decided: Any) -> dict[str, Any]:
        cells: dict[str, Any] = {}
        for head in self.heads:
            sub = head.task.row(np.asarray(probs)[head.outputs], self._part(decided, head))
            cells.update({f"{head.name}_{k}": v for k, v in sub.items()})
        return cells

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.name, "heads": [{"name": h.name, "type": h.task.name, "classes": h.task.names,
                                              "positive_index": h.task.positive_index, "weight": h.weight} for h in self.heads]}


