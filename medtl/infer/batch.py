"""Decoding overlapped with batched forward passes; a bad scan becomes a result, not a crash."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medtl.bundle import Predictor
from medtl.io import find_scans, read_manifest
from medtl.threads import usable_cpus, worker_threads

log = logging.getLogger(__name__)

_FINGERPRINT_BYTES = 1 << 16


@dataclass
class ScanResult:
    """One scan's outcome: logits, or the reason it could not be read."""

    image: str
    logits: np.ndarray | None = None
    error: str | None = None


def quick_fingerprint(path: str | Path) -> str:
    """A quick fingerprint of a scan file or series folder, not a hash of the whole content:
    each file's name, size and first and last 64 KiB, hashed (BLAKE2b, 80 bits).  It changes
    when a scan is replaced or rewritten, but not for an edit inside a large file that keeps its
    size, head and tail; it costs two reads per file whatever the size, which keeps checking
    what a resumed run has done cheap on large DICOM series."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.blake2b(digest_size=10)
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as handle:
            digest.update(handle.read(_FINGERPRINT_BYTES))
            if size > 2 * _FINGERPRINT_BYTES:
                handle.seek(-_FINGERPRINT_BYTES, 2)
                digest.update(handle.read())
    return digest.hexdigest()


class _GuardedScans(Dataset):
    """Applies the bundle's transforms to one scan; a failure becomes a result, not an exception."""

    def __init__(self, paths: Sequence[str], transform) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        try:
            return {"path": path, "image": self.transform({"image": path})["image"]}
        except Exception as err:  # recorded per scan, reported in the errors file
            return {"path": path, "error": str(err)}


@dataclass
class Batch:
    """Preprocessed scans ready for the model, and the scans of the same chunk that failed."""

    paths: list[str]
    images: torch.Tensor | None
    failed: list[tuple[str, str]]


def _collate(items: list[dict]) -> Batch:
    good = [item for item in items if "image" in item]
    return Batch(
        paths=[item["path"] for item in good],
        images=torch.stack([item["image"] for item in good]) if good else None,
        failed=[(item["path"], item["error"]) for item in items if "error" in item],
    )


NON_FINITE_OUTPUT = "the model's output is NaN or infinite for this scan"


def split_finite(paths: Sequence[str], logits: np.ndarray) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Which rows of a batch's logits (``(B, C)`` or ``(B, views, C)``) are finite, and
    ``(path, reason)`` for the others, so one bad output costs one row, not the run."""
    keep = np.isfinite(logits.reshape(len(logits), -1)).all(axis=1)
    return keep, [(path, NON_FINITE_OUTPUT) for path, ok in zip(paths, keep) if not ok]


def default_workers(device: torch.device) -> int:
    """Decode processes for ``device``: on a GPU, enough cores to keep it fed (up to 8); on the
    CPU, a quarter of the cores (at least one), since every decode worker takes a core from the
    forward pass and decoding costs a fraction of a forward."""
    cores, _ = usable_cpus()
    return max(1, min(8, cores - 1)) if device.type == "cuda" else max(1, cores // 4)


def load_batches(
    predictor: Predictor,
    paths: Sequence[str | Path],
    *,
    batch_size: int = 16,
    num_workers: int | None = None,
) -> Iterator[Batch]:
    """Decode and preprocess ``paths`` in DataLoader workers (one thread each, a few batches
    ahead, pinned memory on a GPU), in input order; ``num_workers=None`` picks
    :func:`default_workers`."""
    workers = default_workers(predictor.device) if num_workers is None else num_workers
    dataset = _GuardedScans([str(p) for p in paths], predictor.transforms())
    yield from DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        worker_init_fn=worker_threads,
        pin_memory=predictor.device.type == "cuda",
        prefetch_factor=4 if workers > 0 else None,
    )


def iter_batches(
    predictor: Predictor,
    paths: Sequence[str | Path],
    *,
    batch_size: int = 16,
    num_workers: int | None = None,
    forward: Callable[[torch.Tensor], np.ndarray] | None = None,
) -> Iterator[list[ScanResult]]:
    """Yield the results of each batch of scans: failures first (unreadable scans, then
    non-finite outputs), then logits in input order.

    Workers decode and preprocess the next batches while the model runs on this one.
    ``forward`` maps a batch to its logits (default :meth:`Predictor.logits`)."""
    forward = forward or predictor.logits
    for batch in load_batches(predictor, paths, batch_size=batch_size, num_workers=num_workers):
        failed, good = list(batch.failed), []
        if batch.images is not None:
            logits = forward(batch.images)
            keep, bad = split_finite(batch.paths, logits)
            failed += bad
            good = [ScanResult(p, logits=row) for p, row, ok in zip(batch.paths, logits, keep) if ok]
        for path, reason in failed:
            log.warning("skipped %s: %s", path, reason)
        yield [ScanResult(path, error=reason) for path, reason in failed] + good


def iter_logits(predictor: Predictor, paths: Sequence[str | Path], **kwargs) -> Iterator[ScanResult]:
    """Yield a :class:`ScanResult` per scan (see :func:`iter_batches` for the options)."""
    for results in iter_batches(predictor, paths, **kwargs):
        yield from results


def gather_inputs(source: str | Path) -> tuple[list[str], Path]:
    """The scans to predict and the folder their names are written relative to.

    ``source`` is a folder (searched recursively for DICOM, NIfTI, PNG and JPEG; a multi-file
    DICOM series is one scan) or a CSV with an ``image`` column (a manifest, labels optional, or
    the inventory ``medtl scan`` writes).  Finding no scan at all is an error, not an empty run.
    """
    source = Path(source)
    if source.is_dir():
        paths, root = [str(scan.path) for scan in find_scans(source)], source
        if not paths:
            raise ValueError(f"{source}: no scans found (DICOM, NIfTI .nii/.nii.gz, PNG/JPEG/BMP/TIFF)")
        return paths, root
    if source.is_file() and source.suffix.lower() == ".csv":
        return [str(r.image) for r in read_manifest(source, check_files=False, require_label=False)], source.parent
    raise FileNotFoundError(f"{source}: expected a folder of scans or a manifest .csv")
