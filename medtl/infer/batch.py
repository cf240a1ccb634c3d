"""Batch inference over many scans: decoding overlapped with batched forward passes, and a bad
scan recorded with its reason instead of stopping the run."""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from medtl.bundle import Predictor
from medtl.io import find_scans, read_manifest

log = logging.getLogger(__name__)


@dataclass
class ScanResult:
    """One scan's outcome: logits, or the reason it could not be read."""

    image: str
    logits: np.ndarray | None = None
    error: str | None = None


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


def _collate(items: list[dict]) -> dict:
    good = [item for item in items if "image" in item]
    return {
        "paths": [item["path"] for item in good],
        "images": torch.stack([item["image"] for item in good]) if good else None,
        "failed": [(item["path"], item["error"]) for item in items if "error" in item],
    }


def iter_logits(
    predictor: Predictor,
    paths: Sequence[str | Path],
    *,
    batch_size: int = 16,
    num_workers: int = 2,
    progress: bool = True,
) -> Iterator[ScanResult]:
    """Yield a :class:`ScanResult` per scan, in input order within each batch."""
    dataset = _GuardedScans([str(p) for p in paths], predictor.transforms())
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=predictor.device.type == "cuda",
    )
    with tqdm(total=len(dataset), desc="predicting", unit="scan", disable=not progress) as bar:
        for batch in loader:
            for path, reason in batch["failed"]:
                log.warning("skipped %s: %s", path, reason)
                yield ScanResult(path, error=reason)
            if batch["images"] is not None:
                for path, row in zip(batch["paths"], predictor.logits(batch["images"])):
                    yield ScanResult(path, logits=row)
            bar.update(len(batch["paths"]) + len(batch["failed"]))


def gather_inputs(source: str | Path) -> tuple[list[str], Path]:
    """The scans to predict and the folder their names are written relative to.

    ``source`` is a folder (searched recursively for DICOM, NIfTI, PNG and JPEG) or a manifest CSV.
    """
    source = Path(source)
    if source.is_dir():
        return [str(scan.path) for scan in find_scans(source)], source
    if source.suffix.lower() == ".csv":
        return [str(r.image) for r in read_manifest(source, check_files=False)], source.parent
    raise FileNotFoundError(f"{source}: expected a folder of scans or a manifest .csv")


@dataclass
class PredictSummary:
    predicted: int = 0
    failed: int = 0
    out: Path | None = None
    errors: Path | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)


def _display_name(path: str, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return path


def predict_to_csv(
    predictor: Predictor,
    source: str | Path,
    out: str | Path,
    *,
    batch_size: int = 16,
    num_workers: int = 2,
    progress: bool = True,
) -> PredictSummary:
    """Write calibrated probabilities and the decision for every scan under ``source``.

    Rows (``image``, ``prob_<class>``..., ``pred``) are written as batches finish; scans that
    fail go to ``<out>.errors.csv`` with their reason, and the run goes on.
    """
    paths, root = gather_inputs(source)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    errors_path = out.with_name(out.stem + ".errors.csv")
    summary = PredictSummary(out=out)
    header = ["image", *[f"prob_{name}" for name in predictor.classes], "pred"]
    with open(out, "w", newline="") as handle, open(errors_path, "w", newline="") as err_handle:
        writer, err_writer = csv.writer(handle), csv.writer(err_handle)
        writer.writerow(header)
        err_writer.writerow(["image", "error"])
        for result in iter_logits(predictor, paths, batch_size=batch_size, num_workers=num_workers, progress=progress):
            name = _display_name(result.image, root)
            if result.error is not None:
                err_writer.writerow([name, result.error])
                summary.failed += 1
                summary.failures.append((name, result.error))
                continue
            probs = predictor.calibrate(result.logits[None])
            pred = predictor.classes[int(predictor.decide(probs)[0])]
            writer.writerow([name, *[f"{p:.6f}" for p in probs[0]], pred])
            summary.predicted += 1
    if summary.failed:
        summary.errors = errors_path
    else:
        errors_path.unlink()
    return summary
