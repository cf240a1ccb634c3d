"""Task types: what a scan is labelled with, and what follows from it for every stage.

A :class:`Task` carries the label encoding, the loss and activation, the validation metric, the
calibrator family, the decision rule, the prediction columns and the report layout.  Task types
are registered in :data:`TASKS` (``task.type``): ``binary`` and ``multiclass`` (one ``label``
column, softmax), ``multilabel`` (one 0/1 column per finding, sigmoid, one threshold per
finding) and ``multitask`` (several named heads on one backbone, ``task.heads``); ``auto`` (the
config default) is binary for two classes and multi-class otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from medtl.io import ScanRecord
from medtl.registry import TASKS
from medtl.tasks.base import FittedCalibrator, Task, register_task
from medtl.tasks.multilabel import MaskedBCE, MultiLabel, PerLabelCalibration
from medtl.tasks.multitask import Head, MultiTask, MultiTaskCalibration, MultiTaskLoss
from medtl.tasks.single import Binary, Multiclass, SingleLabel, class_weights, resolve_classes, softmax


def task_type(kind: str, heads: Sequence[Any] | None = None) -> type[Task]:
    """The registered task class for ``task.type`` (``auto`` reads like a single-label task;
    ``multitask`` is bound to ``task.heads``)."""
    if kind == MultiTask.name:
        return MultiTask.configured(heads or ())
    return TASKS["binary" if kind == "auto" else kind]


def make_task(kind: str, records: Sequence[ScanRecord], names: Sequence[str] | None = None,
              positive: str | None = None, heads: Sequence[Any] | None = None) -> Task:
    """The task of ``task.type`` ``kind`` over labelled ``records`` (``auto``: binary for two
    classes, multi-class otherwise) with ``data.classes``, ``data.positive_class`` and ``task.heads``."""
    if kind == "auto":
        kind = "binary" if len(resolve_classes(records, names)) == 2 else "multiclass"
    return task_type(kind, heads).from_records(records, names, positive)


def task_from_meta(meta: Mapping[str, Any]) -> Task:
    """The task of a bundle from its ``bundle.json``; bundles made before tasks existed are
    binary when they have a positive class and multi-class otherwise."""
    kind = (meta.get("task") or {}).get("type") or ("binary" if meta.get("positive_index") is not None else "multiclass")
    return TASKS[kind].from_meta(meta)


__all__ = [
    "TASKS",
    "Binary",
    "FittedCalibrator",
    "Head",
    "MaskedBCE",
    "MultiLabel",
    "MultiTask",
    "MultiTaskCalibration",
    "MultiTaskLoss",
    "Multiclass",
    "PerLabelCalibration",
    "SingleLabel",
    "Task",
    "class_weights",
    "make_task",
    "register_task",
    "resolve_classes",
    "softmax",
    "task_from_meta",
    "task_type",
]
