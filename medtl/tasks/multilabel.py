"""Multi-label tasks: several findings per scan, one sigmoid output each.

The manifest has one column per finding named in ``data.classes``: ``1`` present, ``0`` absent,
blank unknown (masked out of the loss, the calibration, the thresholds and the metrics of that
finding, as torchxrayvision does with NaN).  A row with every finding blank is unlabelled.  The
loss is binary cross-entropy over the known cells (with ``train.class_weighted``, each finding's
positives weighted by its negatives-to-positives ratio); the validation metric is the macro AUROC
over the findings that have known positives and negatives; each finding gets its own binary
calibrator (``calibration.method``, ``auto`` = Platt) and its own threshold chosen by the
``operating_point`` rule.  A labelled row's :attr:`~medtl.io.ScanRecord.label` is the set of
findings present (``a|b``, or ``none``): what patient-level splits stratify on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.special import expit
from torch import nn
from torch.nn import functional as F

from medtl.calibrate import Calibrator, calibrator_from_dict, make_calibrator
from medtl.io import ManifestError, ScanRecord, read_manifest
from medtl.metrics import OperatingPoint, choose_operating_point
from medtl.metrics.discrimination import delong_placements
from medtl.tasks.base import Task, register_task

NO_FINDING = "none"  # the label (stratum) of a scan with every known finding absent


def _cell(value: str | None, where: str) -> float:
    """A finding cell: 1 present, 0 absent, blank unknown (NaN); ``where`` names it in an error."""
    text = (value or "").strip()
    if not text:
        return np.nan
    try:
        number = float(text)
    except ValueError:
        number = -1.0
    if number not in (0.0, 1.0):
        raise ManifestError(f"{where}: '{text}' is not 1 (present), 0 (absent) or blank (unknown)")
    return number


class MaskedBCE(nn.Module):
    """Binary cross-entropy with logits averaged over the known cells (NaN targets are unknown)."""

    def __init__(self, pos_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        known = ~torch.isnan(targets)
        loss = F.binary_cross_entropy_with_logits(logits.float(), targets.nan_to_num(0.0).float(), pos_weight=self.pos_weight,
                                                  reduction="none")
        return (loss * known).sum() / known.sum().clamp(min=1)


class PerLabelCalibration:
    """One binary calibrator per finding (a registered method on the logit pair ``[0, z]``, so
    Platt scaling is ``sigmoid(a z + b)`` and temperature scaling ``sigmoid(z / T)``), each fitted
    on the scans where its finding is known.  A finding whose known scans hold a single class keeps
    its uncalibrated sigmoid (method ``none``)."""

    def __init__(self, method: str = "auto") -> None:
        self.base = "platt" if method == "auto" else method
        self.method = f"per-label {self.base}"
        self.calibrators: list[Calibrator] = []

    @staticmethod
    def _pair(z: np.ndarray) -> np.ndarray:
        return np.column_stack([np.zeros_like(z), z])

    def fit(self, logits: Any, labels: Any) -> PerLabelCalibration:
        """Fit on logits ``(N, L)`` and targets ``(N, L)`` (0/1, NaN unknown); returns ``self``."""
        z, y = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.float64)
        if z.ndim != 2 or y.shape != z.shape:
            raise ValueError(f"logits and labels must both have shape (N, L); got {z.shape} and {y.shape}")
        self.calibrators = []
        for k in range(z.shape[1]):
            known = ~np.isnan(y[:, k])
            both = np.unique(y[known, k]).size == 2
            calibrator = make_calibrator(self.base if both else "none", 2)
            self.calibrators.append(calibrator.fit(self._pair(z[known, k]), y[known, k].astype(int)))
        return self

    def transform(self, logits: Any) -> np.ndarray:
        """Calibrated probabilities ``(N, L)``: each finding's own, in float64."""
        z = np.asarray(logits, dtype=np.float64)
        if not self.calibrators or z.ndim != 2 or z.shape[1] != len(self.calibrators):
            raise ValueError(f"expected logits (N, {len(self.calibrators)}) for a fitted per-label calibrator, got {z.shape}")
        return np.column_stack([c.transform(self._pair(z[:, k]))[:, 1] for k, c in enumerate(self.calibrators)])

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "base": self.base, "labels": [c.to_dict() for c in self.calibrators]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PerLabelCalibration:
        calibrator = cls(d["base"])
        calibrator.calibrators = [calibrator_from_dict(c) for c in d["labels"]]
        return calibrator


@register_task
class MultiLabel(Task):
    """Findings that may co-occur: one sigmoid output and one threshold per finding."""

    name = "multilabel"
    report_layout = "per_label"
    ensembles = False  # members pool log-softmax outputs (medtl.backbones.Ensemble): single-label only

    @classmethod
    def read(cls, path: str | Path, names: Sequence[str] | None, *, check_files: bool = True) -> list[ScanRecord]:
        if not names:
            raise ValueError("task.type=multilabel needs data.classes: the findings, each a 0/1 column of the manifest")
        records = read_manifest(path, check_files=check_files, require_label=False)
        missing = [n for n in names if n not in records[0].extra]
        if missing:
            raise ManifestError(f"{path}: missing finding column(s) {missing} of data.classes {list(names)}")
        labelled = []
        for r in records:
            y = np.array([_cell(r.extra[n], f"{path}, row {r.row}, column '{n}'") for n in names])
            known = ~np.isnan(y)
            present = [n for n, v in zip(names, y) if v == 1]
            label = ("|".join(present) or NO_FINDING) if known.any() else None
            labelled.append(replace(r, label=label))
        return labelled

    @classmethod
    def from_records(cls, records: Sequence[ScanRecord], names: Sequence[str] | None, positive: str | None) -> MultiLabel:
        if not names:
            raise ValueError("task.type=multilabel needs data.classes: the findings, each a 0/1 column of the manifest")
        task = cls(names)
        counts = task.counts(records)
        absent = [n for n, c in counts.items() if c == 0]
        if absent:
            raise ValueError(f"findings {absent} have no positive labelled scans")
        return task

    def target(self, record: ScanRecord) -> np.ndarray:
        return np.array([_cell(record.extra.get(n), f"row {record.row}, column '{n}'") for n in self.names], dtype=np.float32)

    def targets(self, records: Sequence[ScanRecord]) -> np.ndarray:
        return np.stack([self.target(r) for r in records]) if records else np.empty((0, self.outputs), dtype=np.float32)

    def counts(self, records: Sequence[ScanRecord]) -> dict[str, int]:
        y = self.targets(records)
        return {n: int(np.sum(y[:, k] == 1)) for k, n in enumerate(self.names)}

    def loss(self, items: Sequence[dict] | None = None) -> nn.Module:
        if items is None:
            return MaskedBCE()
        y = np.stack([item["label"] for item in items])
        positives, negatives = np.sum(y == 1, axis=0), np.sum(y == 0, axis=0)
        return MaskedBCE(torch.tensor(negatives / np.maximum(positives, 1), dtype=torch.float32))

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return expit(np.asarray(logits, dtype=np.float64))

    def score(self, labels: np.ndarray, logits: np.ndarray) -> float:
        """Macro AUROC over the findings with known positives and negatives, each over its known scans."""
        y, z = np.asarray(labels, dtype=np.float64), np.asarray(logits, dtype=np.float64)
        aucs = []
        for k in range(z.shape[1]):
            known = ~np.isnan(y[:, k])
            if np.unique(y[known, k]).size == 2:
                aucs.append(delong_placements(y[known, k] == 1, z[known, k])[0])
        return float(np.mean(aucs)) if aucs else float("nan")

    def calibrator(self, method: str) -> PerLabelCalibration:
        return PerLabelCalibration(method)

    def load_calibrator(self, d: Mapping[str, Any]) -> PerLabelCalibration:
        return PerLabelCalibration.from_dict(d)

    def choose_decision(self, labels: np.ndarray, probs: np.ndarray, method: str, target: float | None) -> dict[str, OperatingPoint]:
        """One operating point per finding, chosen by the same rule on its known scans."""
        y = np.asarray(labels, dtype=np.float64)
        points = {}
        for k, name in enumerate(self.names):
            known = ~np.isnan(y[:, k])
            if np.unique(y[known, k]).size < 2:
                raise ValueError(f"finding '{name}' needs positive and negative calibration scans to choose its threshold")
            points[name] = choose_operating_point(y[known, k].astype(int), probs[known, k], method, target)
        return points

    def decision_to_dict(self, decision: Mapping[str, OperatingPoint]) -> dict[str, dict]:
        return {name: point.to_dict() for name, point in decision.items()}

    def load_decision(self, d: Any) -> dict[str, OperatingPoint] | None:
        return {name: OperatingPoint.from_dict(point) for name, point in d.items()} if d else None

    def thresholds(self, decision: Mapping[str, OperatingPoint] | None) -> np.ndarray:
        """Each finding's threshold on its calibrated probability (0.5 without a decision rule)."""
        return np.array([decision[n].threshold if decision else 0.5 for n in self.names])

    def decide(self, probs: np.ndarray, decision: Mapping[str, OperatingPoint] | None) -> np.ndarray:
        return (np.asarray(probs) >= self.thresholds(decision)).astype(int)

    def uncertain(self, probs: np.ndarray, decision: Mapping[str, OperatingPoint] | None, band: float | np.ndarray) -> np.ndarray:
        """Any finding within ``band`` of its threshold."""
        band = np.asarray(band, dtype=np.float64).reshape(-1, 1) if np.ndim(band) else band
        return (np.abs(np.asarray(probs) - self.thresholds(decision)) < band).any(axis=1)

    def named(self, decided: np.ndarray) -> list[list[str]]:
        return [[n for n, v in zip(self.names, row) if v] for row in decided]

    def columns(self) -> list[str]:
        return [*(f"prob_{n}" for n in self.names), *(f"pred_{n}" for n in self.names)]

    def row(self, probs: np.ndarray, decided: Any) -> dict[str, Any]:
        return {**{f"prob_{n}": float(p) for n, p in zip(self.names, probs)},
                **{f"pred_{n}": int(v) for n, v in zip(self.names, decided)}}

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.name, "labels": list(self.names)}
