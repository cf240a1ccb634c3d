"""The contract of a task type: what every stage asks about the prediction target.

A :class:`Task` knows how a manifest row becomes a training target, which loss and activation
the head is trained with, how the validation metric reads the logits, which calibrator is fitted,
how decisions are taken from the calibrated probabilities (and saved in a bundle), and which
columns a prediction row has.  The trainer, calibration, the report, the bundle and batch
prediction consult it instead of testing for the kind of task themselves.  A task type is one
subclass decorated with :func:`register_task`; ``task.type`` in the config names it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np
from torch import nn

from medtl.io import ScanRecord
from medtl.registry import TASKS

_T = TypeVar("_T", bound="type[Task]")


class FittedCalibrator(Protocol):
    """What a task's calibrator offers (a :class:`~medtl.calibrate.Calibrator` for single-label tasks)."""

    @property
    def method(self) -> str: ...

    def fit(self, logits: Any, labels: Any) -> Any: ...

    def transform(self, logits: Any) -> np.ndarray: ...

    def to_dict(self) -> dict[str, Any]: ...


class Task(ABC):
    """A prediction target over ``names`` (classes, or findings for multi-label tasks).

    ``report_layout`` names the report that shows it (``single``: one label per scan;
    ``per_label``: one binary block per output); ``ensembles`` says whether members' outputs can
    be pooled into one bundle (``train.folds``, ``train.seeds``)."""

    name: ClassVar[str]
    report_layout: ClassVar[str]
    ensembles: ClassVar[bool] = True

    def __init__(self, names: Sequence[str], positive_index: int | None = None) -> None:
        self.names = [str(n) for n in names]
        self.positive_index = positive_index

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.names})"

    # --- data --------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def read(cls, path: str | Path, names: Sequence[str] | None, *, check_files: bool = True) -> list[ScanRecord]:
        """The manifest's rows; a labelled row has ``label`` set (what splits and folds stratify on)."""

    @classmethod
    @abstractmethod
    def from_records(cls, records: Sequence[ScanRecord], names: Sequence[str] | None, positive: str | None) -> Task:
        """The task for labelled ``records`` with the configured ``names`` (``data.classes``) and
        ``positive`` (``data.positive_class``)."""

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> Task:
        """The task of a bundle from its ``bundle.json`` (classes, positive class, ``task``)."""
        return cls(meta["classes"], meta.get("positive_index"))

    @abstractmethod
    def target(self, record: ScanRecord) -> Any:
        """The training target of one labelled row, as the loader's ``label`` holds it."""

    def targets(self, records: Sequence[ScanRecord]) -> np.ndarray:
        """The targets of ``records`` stacked: what :meth:`loss`, :meth:`score` and the calibrator take."""
        return np.array([self.target(r) for r in records])

    def items(self, records: Sequence[ScanRecord]) -> list[dict]:
        """MONAI-style item dicts ``{"image": path, "label": target}`` for the labelled ``records``."""
        return [{"image": str(r.image), "label": self.target(r)} for r in records if r.label]

    @abstractmethod
    def counts(self, records: Sequence[ScanRecord]) -> dict[str, int]:
        """Scans per class (single-label) or positives per finding (multi-label)."""

    # --- model -------------------------------------------------------------------------------
    @property
    def outputs(self) -> int:
        """Logits the head produces."""
        return len(self.names)

    @abstractmethod
    def loss(self, items: Sequence[dict] | None = None) -> nn.Module:
        """The training loss on ``(logits, label batch)``; with ``items`` (the training items)
        weighted by their frequencies (``train.class_weighted``)."""

    @abstractmethod
    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Uncalibrated probabilities ``(N, outputs)`` from logits, in float64."""

    @abstractmethod
    def score(self, labels: np.ndarray, logits: np.ndarray) -> float:
        """The validation metric early stopping and model selection read (NaN when not estimable)."""

    # --- calibration and decisions -----------------------------------------------------------
    @abstractmethod
    def calibrator(self, method: str) -> FittedCalibrator:
        """An unfitted calibrator for ``calibration.method`` (``auto`` included)."""

    @abstractmethod
    def load_calibrator(self, d: Mapping[str, Any]) -> FittedCalibrator:
        """A fitted calibrator from its ``to_dict()`` (a bundle's ``calibration``)."""

    @abstractmethod
    def choose_decision(self, labels: np.ndarray, probs: np.ndarray, method: str, target: float | None) -> Any:
        """The decision rule fitted on calibrated ``probs`` (``operating_point.method`` / ``target``);
        None where the task decides without one."""

    @abstractmethod
    def decision_to_dict(self, decision: Any) -> Any:
        """The decision rule as JSON (a bundle's ``operating_point``)."""

    @abstractmethod
    def load_decision(self, d: Any) -> Any:
        """The decision rule from :meth:`decision_to_dict` output (None: the task's default rule)."""

    @abstractmethod
    def decide(self, probs: np.ndarray, decision: Any) -> np.ndarray:
        """Decisions from calibrated probabilities: class indices ``(N,)``, or 0/1 ``(N, outputs)``."""

    @abstractmethod
    def uncertain(self, probs: np.ndarray, decision: Any, band: float | np.ndarray) -> np.ndarray:
        """Scans whose decision is within ``band`` of flipping (one value, or one per scan)."""

    @abstractmethod
    def named(self, decided: np.ndarray) -> list[Any]:
        """Decisions in words: a class name per scan, or the list of findings present."""

    # --- outputs ------------------------------------------------------------------------------
    @abstractmethod
    def columns(self) -> list[str]:
        """The prediction table's probability and decision columns, in order."""

    @abstractmethod
    def row(self, probs: np.ndarray, decided: Any) -> dict[str, Any]:
        """One scan's probability and decision cells, as :meth:`columns` names them.  Probabilities
        are written in full: rounded to fixed decimals, the tiny probabilities of a confident model
        tie (1e-7 and 1e-9 both 0.0) and the table would rank scans unlike the report."""

    def to_dict(self) -> dict[str, Any]:
        """The task in a bundle's ``bundle.json`` (``task``)."""
        return {"type": self.name}


def register_task(cls: _T) -> _T:
    """Class decorator: make a :class:`Task` subclass a ``task.type`` under its ``name``."""
    return TASKS.register(cls.name)(cls)
