"""``medtl predict``: calibrated predictions for many scans, resumable and sharded.

Re-running the same command skips scans already in the output (matched by name and content
fingerprint) and appends the rest.  Under ``torchrun`` each rank predicts its share of the scans
into its own part file and rank 0 merges the parts, in input order, into the output.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from medtl.bundle import Predictor
from medtl.infer.batch import ScanResult, fingerprint, gather_inputs, iter_batches
from medtl.infer.table import ResultTable, read_rows, write_table

log = logging.getLogger(__name__)

ERROR_COLUMNS = ("image", "error")


@dataclass
class PredictSummary:
    """What a prediction run did, over all ranks."""

    predicted: int = 0
    skipped: int = 0
    failed: int = 0
    out: Path | None = None
    errors: Path | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)


def uncertain(predictor: Predictor, probs: np.ndarray, band: float) -> np.ndarray:
    """Flag predictions near the decision boundary: within ``band`` of the operating threshold
    (binary), or a top-two probability margin below ``band`` (multi-class)."""
    if predictor.operating_point is not None and predictor.positive_index is not None:
        return np.abs(probs[:, predictor.positive_index] - predictor.operating_point.threshold) < band
    top2 = np.sort(probs, axis=1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]) < band


def _rank_world() -> tuple[int, int]:
    """This process's rank and the world size, joining the process group torchrun set up."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _display_name(path: str, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return path


def _part(path: Path, rank: int, world: int) -> Path:
    return path if world == 1 else path.with_name(f"{path.name}.part-{rank}")


def predict_scans(
    predictor: Predictor,
    source: str | Path,
    out: str | Path,
    *,
    fmt: str = "csv",
    batch_size: int = 16,
    num_workers: int = 2,
    uncertain_band: float = 0.1,
    progress: bool = True,
) -> PredictSummary:
    """Predict every scan under ``source`` into ``out`` (CSV or JSON Lines), resuming a
    previous run of the same command; unreadable scans go to ``<out stem>.errors.csv``."""
    out = Path(out)
    rank, world = _rank_world()
    paths, root = gather_inputs(source)
    names = [_display_name(p, root) for p in paths]
    columns = ["image", *[f"prob_{c}" for c in predictor.classes], "pred", "uncertain", "fingerprint"]

    done_rows = read_rows(out, fmt) if world > 1 else []
    for other in range(world):
        done_rows += read_rows(_part(out, other, world), fmt)
    done = {(row["image"], row["fingerprint"]) for row in done_rows}
    if world > 1:
        dist.barrier()  # every rank has read what is done before any rank appends

    todo, skipped = [], 0
    for index in range(rank, len(paths), world):
        key = (names[index], fingerprint(paths[index]) if Path(paths[index]).exists() else "")
        if key in done:
            skipped += 1
        else:
            todo.append((paths[index], key[1]))
    table = ResultTable(_part(out, rank, world), columns, fmt)
    fingerprints = dict(todo)
    failures: list[tuple[str, str]] = []

    with tqdm(total=len(todo), desc=f"predicting (rank {rank})" if world > 1 else "predicting", unit="scan",
              disable=not progress, position=rank) as bar:
        for results in iter_batches(predictor, [p for p, _ in todo], batch_size=batch_size, num_workers=num_workers):
            good: list[ScanResult] = [r for r in results if r.error is None]
            failures += [(_display_name(r.image, root), r.error) for r in results if r.error is not None]
            if good:
                probs = predictor.calibrate(np.stack([r.logits for r in good]))
                decisions = predictor.decide(probs)
                flags = uncertain(predictor, probs, uncertain_band)
                table.append(
                    {
                        "image": _display_name(r.image, root),
                        **{f"prob_{c}": round(float(p), 6) for c, p in zip(predictor.classes, row)},
                        "pred": predictor.classes[int(d)],
                        "uncertain": int(flag),
                        "fingerprint": fingerprints[r.image],
                    }
                    for r, row, d, flag in zip(good, probs, decisions, flags)
                )
            bar.update(len(results))

    errors_path = out.with_name(out.stem + ".errors.csv")
    write_table(_part(errors_path, rank, world), ERROR_COLUMNS, [dict(zip(ERROR_COLUMNS, f)) for f in failures])
    counts = torch.tensor([len(todo) - len(failures), skipped, len(failures)])
    if world > 1:
        dist.all_reduce(counts)
        dist.barrier()  # all parts are complete
        if rank == 0:
            _merge(out, columns, fmt, names, world, keep_existing=True)
            _merge(errors_path, ERROR_COLUMNS, "csv", names, world, keep_existing=False)
        dist.barrier()
    summary = PredictSummary(*(int(c) for c in counts), out=out, failures=failures)
    if summary.failed:
        summary.errors = errors_path
    elif rank == 0:
        errors_path.unlink(missing_ok=True)
    return summary


def _merge(out: Path, columns: list[str], fmt: str, names: list[str], world: int, *, keep_existing: bool) -> None:
    """Rank 0: every rank's part (and the rows already in ``out`` when ``keep_existing``),
    one row per scan, in input order."""
    order = {name: i for i, name in enumerate(names)}
    rows: dict[str, dict] = {}
    sources = [out] if keep_existing else []
    for path in sources + [_part(out, r, world) for r in range(world)]:
        for row in read_rows(path, fmt):
            rows[row["image"]] = row
    merged = sorted(rows.values(), key=lambda row: order.get(row["image"], len(order)))
    write_table(out, columns, merged, fmt)
    for r in range(world):
        _part(out, r, world).unlink(missing_ok=True)
