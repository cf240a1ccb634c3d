"""``medtl predict``: calibrated predictions for many scans, resumable and sharded.

Re-running the same command skips scans already in the output (matched by name and
:func:`~medtl.infer.batch.quick_fingerprint`) and appends the rest.  Under ``torchrun`` each
rank predicts its share of the scans into its own part file and rank 0 merges the parts, in
input order, into the output.  With ``tta`` each scan is also predicted shifted a few pixels,
and the spread across those views decides the uncertainty flag; without it, an ensemble bundle's
members vote, and a scan on which their decisions differ is uncertain; with ``cam_dir`` a Grad-CAM
overlay is written per scan before its row, so a resumed run never lacks one.  A scan that
cannot be read, or whose model output is not finite, goes to the errors file; the run goes on.

When the bundle holds a feature reference (``reference.safetensors``), each row also gets an
out-of-distribution score (``ood_distance``, Mahalanobis to the nearest class mean of the
training features, and ``ood_p``, its p-value against the validation scans), and the run ends
with a folder-level verdict (MMD permutation test of the scans predicted in this run against
the reference), written with the counts to ``<out stem>.summary.json``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from scipy.special import log_softmax
from tqdm.auto import tqdm

from medtl.backbones import pool_members
from medtl.bundle import Predictor
from medtl.bundle.reference import LEVEL, Reservoir, scan_features
from medtl.infer.autobatch import auto_batch_size
from medtl.infer.batch import gather_inputs, load_batches, quick_fingerprint, split_finite
from medtl.infer.cam import CamWriter
from medtl.infer.table import ResultTable, read_rows, write_table
from medtl.infer.tta import tta_logits, tta_probabilities
from medtl.train.distributed import join_process_group

log = logging.getLogger(__name__)

ERROR_COLUMNS = ("image", "error")
TTA_MARGIN = 2.0  # with --tta, uncertain when the threshold is within this many spreads


@dataclass
class PredictSummary:
    """What a prediction run did, over all ranks."""

    predicted: int = 0
    skipped: int = 0
    failed: int = 0
    out: Path | None = None
    errors: Path | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)
    shift: dict | None = None
    summary_file: Path | None = None


def uncertain(predictor: Predictor, probs: np.ndarray, band: float | np.ndarray) -> np.ndarray:
    """Flag predictions near the decision boundary: within ``band`` of the operating threshold
    (binary; multi-label: of any finding's threshold), or a top-two probability margin below
    ``band`` (multi-class).  ``band`` may be one value per scan (e.g. from the test-time-augmentation spread)."""
    return predictor.task.uncertain(probs, predictor.operating_point, band)


def member_votes(predictor: Predictor, members: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For member logits ``(K, B, C)`` and the pooled calibrated probabilities ``(B, C)``: per
    scan, whether the members' own calibrated decisions differ, and the standard deviation across
    members of the probability that decides (the positive class, or the pooled most probable
    class).  Each member is calibrated with the bundle's calibrator, which was fitted on single
    members' out-of-fold outputs."""
    k, b, c = members.shape
    member_probs = predictor.calibrate(log_softmax(members.reshape(-1, c), axis=1)).reshape(k, b, c)
    decisions = np.stack([predictor.decide(p) for p in member_probs])
    column = np.full(b, predictor.positive_index) if predictor.positive_index is not None else probs.argmax(axis=1)
    return (decisions != decisions[0]).any(axis=0), member_probs[:, np.arange(b), column].std(axis=0)


def _forward(predictor: Predictor, images: torch.Tensor, tta: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """The batch's logits (``(B, views, C)`` with ``tta``) and, for an ensemble without ``tta``,
    its members' logits ``(K, B, C)`` (one pass: the pooled logits are computed from them)."""
    if tta:
        return tta_logits(predictor, images), None
    if predictor.n_members == 1:
        return predictor.logits(images), None
    members = predictor.member_logits(images)
    return pool_members(torch.from_numpy(members), predictor.model.combine).numpy(), members


def _rank_world() -> tuple[int, int]:
    """This process's rank and the world size, joining the process group torchrun set up."""
    join_process_group()
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _display_name(path: str, root: Path) -> str:
    try:
        return str(Path(os.path.realpath(path)).relative_to(os.path.realpath(root)))  # realpath: a symlink loop is a name too
    except ValueError:
        return path


def _fingerprint(path: str) -> str:
    """The scan's quick fingerprint, or "" when it cannot be read (the reader then says why)."""
    try:
        return quick_fingerprint(path)
    except OSError:
        return ""


def _part(path: Path, rank: int, world: int) -> Path:
    return path if world == 1 else path.with_name(f"{path.name}.part-{rank}")


def _rows(predictor: Predictor, names: list[str], logits: np.ndarray, band: float, fingerprints: list[str],
          features: np.ndarray | None = None, members: np.ndarray | None = None) -> list[dict]:
    """Output rows for a batch of logits ``(B, C)``, or ``(B, views, C)`` with test-time
    augmentation (then probabilities are the views' mean and ``tta_std`` their spread); with
    ``features`` also the out-of-distribution score and its p-value; with an ensemble's
    ``members`` logits ``(K, B, C)`` a ``member_std`` column, and members that disagree make
    the scan uncertain."""
    spread = member_spread = None
    if logits.ndim == 3:
        probs, spread = tta_probabilities(predictor, logits)
        flags = uncertain(predictor, probs, TTA_MARGIN * spread)
    else:
        probs = predictor.calibrate(logits)
        flags = uncertain(predictor, probs, band)
        if members is not None:
            disagree, member_spread = member_votes(predictor, members, probs)
            flags = flags | disagree
    decisions = predictor.decide(probs)
    if features is not None:
        distances = predictor.reference.distances(features)
        pvalues = predictor.reference.pvalues(distances)
    rows = []
    for i, name in enumerate(names):
        row = {"image": name, **predictor.task.row(probs[i], decisions[i]), "uncertain": int(flags[i])}
        if spread is not None:
            row["tta_std"] = round(float(spread[i]), 6)
        if member_spread is not None:
            row["member_std"] = round(float(member_spread[i]), 6)
        if features is not None:
            row.update(ood_distance=round(float(distances[i]), 4), ood_p=round(float(pvalues[i]), 6))
        rows.append({**row, "fingerprint": fingerprints[i]})
    return rows


def predict_scans(
    predictor: Predictor,
    source: str | Path,
    out: str | Path,
    *,
    fmt: str = "csv",
    batch_size: int | str = "auto",
    num_workers: int | None = None,
    uncertain_band: float = 0.1,
    tta: bool = False,
    cam_dir: str | Path | None = None,
    shift_check: bool = True,
    shift_level: float = LEVEL,
    progress: bool = True,
) -> PredictSummary:
    """Predict every scan under ``source`` into ``out`` (CSV or JSON Lines), resuming a
    previous run of the same command; unreadable scans go to ``<out stem>.errors.csv``.

    ``batch_size="auto"`` times a few sizes (:func:`auto_batch_size`); ``num_workers=None``
    picks the decode processes for the device; ``tta`` adds shifted views and a ``tta_std``
    column; ``cam_dir`` receives a Grad-CAM overlay PNG per scan; ``shift_check`` (with a bundle
    that has a feature reference) adds the ``ood_distance`` / ``ood_p`` columns and the
    folder-level shift verdict at ``shift_level``."""
    out = Path(out)
    rank, world = _rank_world()
    paths, root = gather_inputs(source)
    names = [_display_name(p, root) for p in paths]
    check = shift_check and predictor.reference is not None
    votes = predictor.n_members > 1 and not tta
    columns = ["image", *predictor.task.columns(), "uncertain", *(["tta_std"] if tta else []),
               *(["member_std"] if votes else []), *(["ood_distance", "ood_p"] if check else []), "fingerprint"]

    done_rows = read_rows(out, fmt) if world > 1 else []
    for other in range(world):
        done_rows += read_rows(_part(out, other, world), fmt)
    done = {(row["image"], row["fingerprint"]) for row in done_rows}
    if world > 1:
        dist.barrier()  # every rank has read what is done before any rank appends

    todo, skipped = [], 0
    for index in range(rank, len(paths), world):
        key = (names[index], _fingerprint(paths[index]))
        if key in done:
            skipped += 1
        else:
            todo.append((paths[index], key[1]))
    table = ResultTable(_part(out, rank, world), columns, fmt)
    fingerprints = dict(todo)
    cams = CamWriter(predictor, cam_dir) if cam_dir is not None else None
    if batch_size == "auto":
        batch_size = auto_batch_size(predictor, len(todo))
    failures: list[tuple[str, str]] = []
    sample = Reservoir(seed=rank)

    with tqdm(total=len(todo), desc=f"predicting (rank {rank})" if world > 1 else "predicting", unit="scan",
              disable=not progress, position=rank) as bar:
        for batch in load_batches(predictor, [p for p, _ in todo], batch_size=int(batch_size), num_workers=num_workers):
            failed, bar_step = list(batch.failed), len(batch.paths) + len(batch.failed)
            if batch.images is not None:
                logits, members = _forward(predictor, batch.images, tta)
                keep, bad = split_finite(batch.paths, logits)
                failed += bad
                paths_ok = [p for p, ok in zip(batch.paths, keep) if ok]
                good = [_display_name(p, root) for p in paths_ok]
                if good and cams is not None:
                    cams.write(good, batch.images[torch.as_tensor(keep)])
                features = scan_features(predictor, batch.images[torch.as_tensor(keep)]) if check and good else None
                if features is not None:
                    sample.add(features)
                if good:
                    table.append(_rows(predictor, good, logits[keep], uncertain_band, [fingerprints[p] for p in paths_ok],
                                       features, None if members is None else members[:, keep]))
            for path, reason in failed:
                log.warning("skipped %s: %s", _display_name(path, root), reason)
                failures.append((_display_name(path, root), reason))
            bar.update(bar_step)

    errors_path = out.with_name(out.stem + ".errors.csv")
    write_table(_part(errors_path, rank, world), ERROR_COLUMNS, [dict(zip(ERROR_COLUMNS, f)) for f in failures])
    counts = torch.tensor([len(todo) - len(failures), skipped, len(failures)])
    samples = [sample.array()]
    if world > 1:
        dist.all_reduce(counts)
        if check:
            samples = [None] * world
            dist.all_gather_object(samples, sample.array())
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
    if rank == 0:
        summary.shift = _shift_verdict(predictor, samples, check, shift_check, shift_level)
        summary.summary_file = out.with_name(out.stem + ".summary.json")
        record = {"predicted": summary.predicted, "skipped": summary.skipped, "failed": summary.failed, "shift": summary.shift}
        summary.summary_file.write_text(json.dumps(record, indent=2))
    return summary


def _shift_verdict(predictor: Predictor, samples: list[np.ndarray], check: bool, requested: bool, level: float) -> dict:
    """The folder-level shift test on the features of the scans predicted in this run (all ranks)."""
    if not check:
        why = "the bundle has no feature reference (made before shift alarms existed)" if requested else "--no-shift-check"
        return {"test": None, "shifted": None, "message": f"no shift alarm: {why}"}
    features = np.concatenate([s for s in samples if s.size]) if any(s.size for s in samples) else np.empty((0, 0))
    if not features.size:
        return {"test": None, "shifted": None, "n_scans": 0, "message": "no shift alarm: no scan was predicted in this run"}
    return predictor.reference.shift_test(features, level=level)


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
