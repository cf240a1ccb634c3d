"""Which scans each ensemble member trains and is validated on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from medtl.io import ScanRecord


@dataclass(frozen=True)
class Member:
    """One model to train: its name (its folder under ``RUN_DIR/members``), data and seed."""

    name: str
    train: list[ScanRecord]
    val: list[ScanRecord]
    seed: int


def cross_validation_members(records: Sequence[ScanRecord], folds: int, seed: int) -> list[Member]:
    """``folds`` members whose validation parts partition ``records``: patient-level (a patient's
    scans share a fold) and stratified by label (scikit-learn's ``StratifiedGroupKFold``)."""
    records = list(records)
    labels = [r.label for r in records]
    smallest = min(labels.count(label) for label in set(labels))
    if smallest < folds:
        raise ValueError(f"train.folds={folds}: the rarest class has only {smallest} labelled scans (need at least one per fold)")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    groups = [r.patient for r in records]
    members = []
    for k, (train_idx, val_idx) in enumerate(splitter.split(np.zeros(len(records)), labels, groups)):
        members.append(Member(f"fold{k}", [records[i] for i in train_idx], [records[i] for i in val_idx], seed + k))
    return members


def seed_members(train: Sequence[ScanRecord], val: Sequence[ScanRecord], seeds: int, seed: int) -> list[Member]:
    """``seeds`` members on the same split, with seeds ``seed``, ``seed + 1``, ..."""
    return [Member(f"seed{seed + k}", list(train), list(val), seed + k) for k in range(seeds)]
