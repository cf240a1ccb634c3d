"""Manifest CSVs: one row per scan, and the patient-level train/validation split.

Columns: ``image`` (a file, or a folder holding one DICOM series; relative to the CSV's folder)
and ``label`` are required (``label`` may be empty for unlabelled scans); ``site``,
``patient_id`` and ``split`` (``train``/``val``/``test``) are optional; any other column is kept
in :attr:`ScanRecord.extra` so reports can group by it.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

REQUIRED = ("image", "label")
KNOWN = ("image", "label", "site", "patient_id", "split")
SPLITS = ("train", "val", "test")


class ManifestError(ValueError):
    """A malformed manifest: the message names the file, the row and the column."""


@dataclass(frozen=True)
class ScanRecord:
    """One manifest row.  ``image`` is absolute; empty optional cells are ``None``."""

    image: Path
    label: str | None = None
    site: str | None = None
    patient_id: str | None = None
    split: str | None = None
    row: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def patient(self) -> str:
        """The patient this scan belongs to: ``patient_id``, else the scan itself."""
        return self.patient_id or str(self.image)


def _cell(row: dict, key: str) -> str | None:
    value = (row.get(key) or "").strip()
    return value or None


def read_manifest(path: str | Path, *, check_files: bool = True, require_label: bool = True) -> list[ScanRecord]:
    """Read a manifest CSV; with ``check_files`` every ``image`` must exist.  Without
    ``require_label`` only the ``image`` column is needed (unlabelled target scans).

    Row numbers in errors count the header as row 1, as a spreadsheet shows them."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    base = path.resolve().parent
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in (REQUIRED if require_label else ("image",)) if c not in columns]
        if missing:
            need = "image,label" if require_label else "image"
            raise ManifestError(f"{path}: missing column(s) {missing}; found {columns} (need {need}[,site,patient_id,split])")
        reader.fieldnames = columns
        records = []
        for number, row in enumerate(reader, start=2):
            if None in row:
                raise ManifestError(f"{path}, row {number}: more cells than the {len(columns)} columns of the header")
            image = _cell(row, "image")
            if image is None:
                raise ManifestError(f"{path}, row {number}, column 'image': empty")
            split = _cell(row, "split")
            if split is not None and split not in SPLITS:
                raise ManifestError(f"{path}, row {number}, column 'split': '{split}' is not one of {SPLITS}")
            resolved = (base / image).resolve()
            if check_files and not resolved.exists():
                raise ManifestError(f"{path}, row {number}, column 'image': {resolved} does not exist")
            records.append(
                ScanRecord(
                    image=resolved,
                    label=_cell(row, "label"),
                    site=_cell(row, "site"),
                    patient_id=_cell(row, "patient_id"),
                    split=split,
                    row=number,
                    extra={k: (row[k] or "").strip() for k in columns if k not in KNOWN},
                )
            )
    if not records:
        raise ManifestError(f"{path}: no rows")
    return records


def assign_splits(records: Sequence[ScanRecord], *, val_fraction: float = 0.2, seed: int = 0) -> list[ScanRecord]:
    """Give every labelled row without a ``split`` one, keeping each patient in one split.

    Patients (``patient_id``, else the scan itself) are grouped by their majority label (and
    site, when given) and each group sends ``round(val_fraction * n)`` patients to ``val``, so
    classes and sites keep their shares.  Rows that already have a split keep it; a patient
    already in ``val``/``test`` somewhere stays out of ``train``.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    todo = [r for r in records if r.split is None and r.label]
    if not todo:
        return list(records)
    fixed = {r.patient_id: r.split for r in records if r.split is not None and r.patient_id}
    patients: dict[str, list[ScanRecord]] = defaultdict(list)
    for r in todo:
        patients[r.patient].append(r)
    strata: dict[tuple, list[str]] = defaultdict(list)
    chosen: dict[str, str] = {}
    for pid, rows in patients.items():
        if fixed.get(pid) in ("val", "test"):
            chosen[pid] = fixed[pid]
            continue
        labels = [r.label for r in rows]
        majority = max(sorted(set(labels)), key=labels.count)
        strata[(majority, rows[0].site or "")].append(pid)
    rng = np.random.default_rng(seed)
    for key in sorted(strata):
        pids = sorted(strata[key])
        order = rng.permutation(len(pids))
        n_val = int(round(val_fraction * len(pids)))
        if len(pids) >= 2:
            n_val = min(max(n_val, 1), len(pids) - 1)
        for rank, index in enumerate(order):
            chosen[pids[index]] = "val" if rank < n_val else "train"
    return [replace(r, split=chosen[r.patient]) if r.split is None and r.label else r for r in records]
