"""Single-label tasks: one ``label`` per scan, softmax over the classes.

``binary`` thresholds the calibrated probability of the positive class at the operating point;
``multiclass`` decides by argmax.  Both train with cross-entropy (inverse-frequency class weights
with ``train.class_weighted``), select epochs by AUROC (of the positive class, or the macro
one-vs-rest mean) and calibrate with any registered calibrator.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medtl.calibrate import Calibrator, calibrator_from_dict, make_calibrator
from medtl.io import ManifestError, ScanRecord, read_manifest
from medtl.metrics import OperatingPoint, auroc_point, choose_operating_point
from medtl.tasks.base import Task, register_task


def resolve_classes(records: Sequence[ScanRecord], configured: Sequence[str] | None = None) -> list[str]:
    """The class order: the configured list, else the sorted label names found."""
    found = sorted({r.label for r in records if r.label})
    if configured:
        unknown = sorted(set(found) - set(configured))
        if unknown:
            raise ValueError(f"labels {unknown} are not in data.classes {list(configured)}")
        return list(configured)
    if len(found) < 2:
        raise ValueError(f"need at least two classes to train, found {found}")
    return found


def class_weights(items: Sequence[dict], num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, normalised to mean 1 over the classes present."""
    counts = Counter(item["label"] for item in items)
    return torch.tensor([len(items) / (num_classes * counts[c]) if counts[c] else 0.0 for c in range(num_classes)])


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities from ``(N, C)`` logits, in float64 (the uncalibrated probabilities)."""
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1).numpy()


class SingleLabel(Task):
    """One class per scan, from the manifest's ``label`` column."""

    report_layout = "single"

    def __init__(self, names: Sequence[str], positive_index: int | None = None) -> None:
        super().__init__(names, positive_index)
        self._index = {name: i for i, name in enumerate(self.names)}

    @classmethod
    def read(cls, path: str | Path, names: Sequence[str] | None, *, check_files: bool = True) -> list[ScanRecord]:
        """The manifest's rows; with ``names`` every label must be one of them."""
        records = read_manifest(path, check_files=check_files)
        unknown = sorted({r.label for r in records if r.label} - set(names or ())) if names else []
        if unknown:
            raise ManifestError(f"{path}: labels {unknown} are not classes {list(names or ())}")
        return records

    def target(self, record: ScanRecord) -> int:
        if record.label not in self._index:
            raise ValueError(f"label '{record.label}' is not one of the classes {self.names}")
        return self._index[record.label]

    def counts(self, records: Sequence[ScanRecord]) -> dict[str, int]:
        return {c: sum(r.label == c for r in records) for c in self.names}

    def loss(self, items: Sequence[dict] | None = None) -> nn.Module:
        return nn.CrossEntropyLoss(weight=class_weights(items, self.outputs) if items is not None else None)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return softmax(logits)

    def score(self, labels: np.ndarray, logits: np.ndarray) -> float:
        return auroc_point(labels, softmax(logits))

    def calibrator(self, method: str) -> Calibrator:
        return make_calibrator(method, self.outputs)

    def load_calibrator(self, d: Mapping[str, Any]) -> Calibrator:
        return calibrator_from_dict(d)

    def choose_decision(self, labels: np.ndarray, probs: np.ndarray, method: str, target: float | None) -> OperatingPoint | None:
        if self.positive_index is None:
            return None
        return choose_operating_point((labels == self.positive_index).astype(int), probs[:, self.positive_index], method, target)

    def decision_to_dict(self, decision: OperatingPoint | None) -> dict | None:
        return decision.to_dict() if decision is not None else None

    def load_decision(self, d: Any) -> OperatingPoint | None:
        return OperatingPoint.from_dict(d) if d else None

    def decide(self, probs: np.ndarray, decision: OperatingPoint | None) -> np.ndarray:
        """The operating point on the positive-class probability (binary), else argmax."""
        probs = np.asarray(probs)
        if decision is not None and self.positive_index is not None and probs.shape[1] == 2:
            positive = probs[:, self.positive_index] >= decision.threshold
            return np.where(positive, self.positive_index, 1 - self.positive_index)
        return probs.argmax(axis=1)

    def uncertain(self, probs: np.ndarray, decision: OperatingPoint | None, band: float | np.ndarray) -> np.ndarray:
        """Within ``band`` of the threshold (binary), or a top-two probability margin below ``band``."""
        if decision is not None and self.positive_index is not None:
            return np.abs(probs[:, self.positive_index] - decision.threshold) < band
        top2 = np.sort(probs, axis=1)[:, -2:]
        return (top2[:, 1] - top2[:, 0]) < band

    def named(self, decided: np.ndarray) -> list[str]:
        return [self.names[int(i)] for i in decided]

    def columns(self) -> list[str]:
        return [*(f"prob_{c}" for c in self.names), "pred"]

    def row(self, probs: np.ndarray, decided: Any) -> dict[str, Any]:
        return {**{f"prob_{c}": float(p) for c, p in zip(self.names, probs)}, "pred": self.names[int(decided)]}


@register_task
class Binary(SingleLabel):
    """Two classes; decisions at the operating point on the positive class (``data.positive_class``, default the last)."""

    name = "binary"

    @classmethod
    def from_records(cls, records: Sequence[ScanRecord], names: Sequence[str] | None, positive: str | None) -> Binary:
        classes = resolve_classes(records, names)
        if len(classes) != 2:
            raise ValueError(f"task.type=binary needs two classes, found {classes}")
        if positive is not None and positive not in classes:
            raise ValueError(f"data.positive_class '{positive}' is not one of the classes {classes}")
        return cls(classes, 1 if positive is None else classes.index(positive))


@register_task
class Multiclass(SingleLabel):
    """Any number of classes; argmax decisions."""

    name = "multiclass"

    @classmethod
    def from_records(cls, records: Sequence[ScanRecord], names: Sequence[str] | None, positive: str | None) -> Multiclass:
        return cls(resolve_classes(records, names))
