"""Data for the transfer study: the shared MedMNIST/MedNIST arrays written as scan files and manifests.

medtl trains from files listed in a manifest, as a user's own data would be, so the study writes
the real images out once: MedNIST's JPEGs extracted from its tar (a per-class subsample),
PneumoniaMNIST as PNG files and AdrenalMNIST3D as NIfTI volumes.  The targets' official
validation split is halved, stratified, into validation and test; training labels are
subsampled into nested stratified fractions (the same subsets for every method).
"""

from __future__ import annotations

import csv
import tarfile
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from sklearn.model_selection import train_test_split

PNEUMONIA_CLASSES = ("normal", "pneumonia")
ADRENAL_CLASSES = ("normal", "hyperplasia")


def _write_manifest(path: Path, rows: Sequence[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def extract_mednist(tar_path: Path, out: Path, per_class: int, seed: int = 0) -> Path:
    """Extract ``per_class`` randomly chosen images of each MedNIST class folder; manifest image,label.

    The manifest has no split column, so training makes its own validation split."""
    manifest = out / "manifest.csv"
    if manifest.is_file():
        return manifest
    rng = np.random.default_rng(seed)
    with tarfile.open(tar_path) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.lower().endswith((".jpeg", ".jpg"))]
        by_class: dict[str, list[tarfile.TarInfo]] = {}
        for member in members:
            by_class.setdefault(Path(member.name).parent.name, []).append(member)
        if not by_class:
            raise ValueError(f"{tar_path}: no JPEG images in class folders")
        chosen = []
        for label in sorted(by_class):
            group = sorted(by_class[label], key=lambda m: m.name)
            take = rng.permutation(len(group))[: min(per_class, len(group))]
            chosen += [group[i] for i in sorted(take)]
        tar.extractall(out, members=chosen, filter="data")
    rows = [{"image": m.name, "label": Path(m.name).parent.name} for m in chosen]
    return _write_manifest(manifest, rows)


def split_val_test(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a stratified half of the official validation split (validation) and the rest (test)."""
    idx = np.arange(len(labels))
    val, test = train_test_split(idx, test_size=0.5, stratify=labels, random_state=seed)
    return np.sort(val), np.sort(test)


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Training indices holding ``fraction`` of every class (at least one each).

    One permutation per class and seed, cut at the fraction: the subsets of one seed are nested
    (1 % inside 5 % inside 10 % ...), and every method sees the same ones."""
    keep = []
    for c in np.unique(labels):
        order = np.random.default_rng([seed, int(c)]).permutation(np.flatnonzero(labels == c))
        keep.append(order[: max(1, round(fraction * len(order)))])
    return np.sort(np.concatenate(keep))


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (see ../shared/data/README.md)")
    arrays = np.load(path)
    missing = {"train_images", "train_labels", "val_images", "val_labels"} - set(arrays.files)
    if missing:
        raise ValueError(f"{path}: missing arrays {sorted(missing)}")
    return {k: arrays[k] for k in arrays.files}


def _write_png(path: Path, image: np.ndarray) -> None:
    Image.fromarray(image).save(path)


def _write_nifti(path: Path, volume: np.ndarray) -> None:
    # AdrenalMNIST3D volumes are binary shape masks (0/255): stored as 0/1, 1 mm isotropic.
    nib.save(nib.Nifti1Image((volume > 127).astype(np.uint8), np.eye(4)), path)


def write_target(npz: Path, out: Path, classes: Sequence[str], *, volumes: bool = False, limit: int | None = None) -> Path:
    """Write a MedMNIST target as files plus ``pool.csv`` (image, label, split).

    ``split``: the official train split is ``train``; the official validation split is halved,
    stratified, into ``val`` and ``test``.  ``limit`` keeps the first rows of each split (smoke runs)."""
    pool = out / "pool.csv"
    if pool.is_file():
        return pool
    arrays = _load_npz(npz)
    write, suffix = (_write_nifti, ".nii.gz") if volumes else (_write_png, ".png")
    val_idx, test_idx = split_val_test(arrays["val_labels"][:, 0])
    parts = {
        "train": (arrays["train_images"], arrays["train_labels"][:, 0], np.arange(len(arrays["train_labels"]))),
        "val": (arrays["val_images"], arrays["val_labels"][:, 0], val_idx),
        "test": (arrays["val_images"], arrays["val_labels"][:, 0], test_idx),
    }
    rows = []
    for split, (images, labels, indices) in parts.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        for i in indices[:limit]:
            name = f"{split}/{i:05d}{suffix}"
            write(out / name, images[i])
            rows.append({"image": name, "label": classes[int(labels[i])], "split": split})
    return _write_manifest(pool, rows)


def subset_manifest(pool: Path, fraction: float, seed: int) -> tuple[Path, int]:
    """A manifest with the ``fraction`` subset of the training rows (for ``seed``) and every
    validation and test row; returns it and the number of training scans."""
    rows = read_rows(pool)
    train = [r for r in rows if r["split"] == "train"]
    names = sorted({r["label"] for r in train})
    keep = stratified_subset(np.array([names.index(r["label"]) for r in train]), fraction, seed)
    chosen = [train[i] for i in keep] + [r for r in rows if r["split"] != "train"]
    out = pool.parent / "manifests" / f"seed{seed}_frac{fraction:g}.csv"
    _write_manifest(out, [{**r, "image": f"../{r['image']}"} for r in chosen])
    return out, len(keep)
