"""Helpers shared by the training tests (imported by name: pytest puts tests/ on sys.path)."""

import csv
from pathlib import Path

from medtl.io import write_synthetic


def write_small_split(root: Path, *, patients_per_site: int, n_train: int, n_val: int) -> Path:
    """A synthetic data set under ``root/data`` and ``root/small.csv`` with its first
    ``n_train`` labelled rows as train and the next ``n_val`` as val."""
    write_synthetic(root / "data", patients_per_site=patients_per_site, test_per_site=1)
    rows = [r for r in csv.DictReader(open(root / "data" / "manifest.csv")) if r["label"]][: n_train + n_val]
    for i, row in enumerate(rows):
        row.update(image=f"data/{row['image']}", split="train" if i < n_train else "val")
    with open(root / "small.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root / "small.csv"
