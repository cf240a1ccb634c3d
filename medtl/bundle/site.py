"""Trust at a new site: derive a bundle for a deployment site from a bundle trained elsewhere.

- :func:`recalibrate`: a small labelled local sample refits the calibrator (and re-chooses the
  operating point), after re-estimating the BatchNorm statistics on those scans (AdaBN) when they
  look shifted or that lowers the cross-validated log-loss.  Its report scores the update by cross-validation within
  the local sample, so the "after" figures are never fitted and scored on the same scans.
- :func:`adapt`: unlabelled local scans re-normalise the model (AdaBN or TENT, no retraining), and
  the site's prevalence is estimated from them (EM of Saerens et al. 2002).

Each writes a complete new bundle (the parent's files, a new ``bundle.json`` with a ``provenance``
entry naming the parent's hash and the local set's size and hash, and a report) into a temporary
folder renamed into place at the end: a failure leaves no half-made bundle.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from sklearn.metrics import log_loss
from sklearn.model_selection import LeaveOneOut, StratifiedKFold

from medtl import __version__
from medtl.adapt import NORMALIZATION, adapt_normalization, has_batch_norm
from medtl.bundle.bundle import META_FILE, WEIGHTS_FILE, Predictor, load
from medtl.bundle.reference import scan_features
from medtl.calibrate import CALIBRATORS, LOCAL_UPDATES, Calibrator, make_calibrator, multiclass_methods, recalibration_methods
from medtl.metrics import (
    Estimate, OperatingPoint, bootstrap_ci, brier_score, choose_operating_point, decision_metrics, expected_calibration_error,
    proportion_ci,
)
from medtl.tasks import SingleLabel

log = logging.getLogger(__name__)

MIN_SCANS = 10  # fewer labelled local scans: refuse (no cross-validated check is possible)
MIN_PER_CLASS = 2  # of every class, so that each cross-validation fold can be fitted
FEW_EVENTS = 10  # fewer scans of the rarer class: warn that the sample is too small to help
LOO_BELOW = 30  # leave-one-out below this many scans, stratified 5-fold otherwise
AUTO_RULE = ("auto: events (scans of the rarer class) < 10: intercept (calibration-in-the-large); 10-99: logistic "
             "(slope and intercept); >= 100: the bundle's own calibration method refitted")
NORMALIZATION_CHOICES = ("auto", "keep", "adabn")
REPORTS = ("recalibration.json", "recalibration.md", "adaptation.json", "adaptation.md")


@dataclass
class SiteUpdate:
    """What :func:`recalibrate` or :func:`adapt` wrote: the new bundle, its report and warnings."""

    bundle: Path
    report: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


# ---- shared: reading a local set, hashes, writing a derived bundle --------------------------------


def bundle_hash(path: str | Path) -> str:
    """sha256 of a bundle's ``bundle.json`` and weights: what identifies the parent of a derived bundle."""
    digest = hashlib.sha256()
    for name in (META_FILE, WEIGHTS_FILE):
        with open(Path(path) / name, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _set_hash(images: Sequence[str], labels: Sequence[str] | None = None) -> str:
    """Order-free hash of a local set: each scan's quick fingerprint (name, size, first and last
    64 KiB) and its label."""
    from medtl.infer import quick_fingerprint

    lines = sorted(f"{quick_fingerprint(p)}\t{labels[i] if labels else ''}" for i, p in enumerate(images))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _logits(predictor: Predictor, paths: Sequence[str], *, batch_size: int, num_workers: int,
            features: bool = False) -> tuple[list[str], np.ndarray, np.ndarray | None, list[tuple[str, str]]]:
    """Readable paths, their logits (and features), and the unreadable ones with reasons."""
    from medtl.infer import load_batches

    kept, logits, feats, failed = [], [], [], []
    for batch in load_batches(predictor, paths, batch_size=batch_size, num_workers=num_workers):
        failed += batch.failed
        if batch.images is not None:
            kept += batch.paths
            logits.append(predictor.logits(batch.images))
            if features:
                feats.append(scan_features(predictor, batch.images))
    for path, reason in failed:
        log.warning("skipped %s: %s", path, reason)
    stack = (lambda rows: np.concatenate(rows) if rows else np.empty((0, 0)))
    return kept, stack(logits), stack(feats) if features else None, failed


def _provenance(parent: Path, predictor: Predictor, step: Mapping[str, Any]) -> list[dict]:
    """The parent's provenance with one more step (parent path and hash, date, medtl version)."""
    entry = {**step, "parent": {"path": str(parent.resolve()), "sha256": bundle_hash(parent)},
             "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "medtl": __version__}
    return [*predictor.meta.get("provenance", []), entry]


def _write_bundle(parent: Path, out: Path, meta: Mapping[str, Any], reports: Mapping[str, str],
                  state: Mapping[str, torch.Tensor] | None = None) -> Path:
    """A new bundle at ``out``: the parent's files (its weights unless ``state`` replaces them), a
    new ``bundle.json`` and the reports, written into a temporary folder renamed at the end."""
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose another output folder (nothing was written)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for file in parent.iterdir():
            if file.is_file() and file.name not in (META_FILE, *REPORTS) and not (state is not None and file.name == WEIGHTS_FILE):
                shutil.copy2(file, tmp / file.name)
        if state is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / WEIGHTS_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        for name, text in reports.items():
            (tmp / name).write_text(text)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _estimate(e: Estimate | Any) -> dict:
    value = e.value if isinstance(e, Estimate) else e.estimate
    return {"value": value, "ci": list(e.ci) if e.ci is not None else None}


def _fmt(d: dict | None) -> str:
    if not d or d.get("value") is None:
        return "n/a"
    ci = d.get("ci")
    return f"{d['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


# ---- recalibrate ------------------------------------------------------------------------------------


def _single_label(path: Path) -> Predictor:
    """The bundle at ``path``; a site update refits softmax calibrators and one threshold, so the bundle must be single-label."""
    predictor = load(path)
    if not isinstance(predictor.task, SingleLabel):
        raise ValueError(f"{path}: medtl recalibrate and medtl adapt take single-label bundles; this one is "
                         f"{predictor.task.name} (retrain it with the new site's scans instead)")
    return predictor


def _check_local(path: Path, predictor: Predictor) -> tuple[list[str], list[str]]:
    """Images and labels of a labelled local manifest, every label a class of the bundle."""
    from medtl.io import read_manifest

    records = read_manifest(path)
    missing = [r.row for r in records if not r.label]
    if missing:
        raise ValueError(f"{path}: row {missing[0]} has no label; every local scan needs one ({len(missing)} rows without)")
    unknown = sorted({r.label for r in records} - set(predictor.classes))
    if unknown:
        raise ValueError(f"{path}: labels {unknown} are not classes of the bundle {predictor.classes}")
    return [str(r.image) for r in records], [r.label for r in records]


def _check_counts(path: Path, labels: np.ndarray, classes: Sequence[str], unreadable: int) -> dict[str, int]:
    counts = {c: int(np.sum(labels == i)) for i, c in enumerate(classes)}
    note = f" ({unreadable} unreadable, left out)" if unreadable else ""
    if len(labels) < MIN_SCANS:
        raise ValueError(f"{path}: {len(labels)} readable labelled scans{note}; recalibration needs at least {MIN_SCANS} "
                         "(50-100 recommended)")
    present = [c for c, n in counts.items() if n]
    if len(present) < 2:
        raise ValueError(f"{path}: every scan is '{present[0]}'; recalibration needs scans of every class")
    few = {c: n for c, n in counts.items() if n < MIN_PER_CLASS}
    if few:
        raise ValueError(f"{path}: too few scans of class(es) {few}{note}; recalibration needs at least {MIN_PER_CLASS} of every class")
    return counts


def _choose_method(method: str, events: int, predictor: Predictor) -> str:
    binary = len(predictor.classes) == 2
    if method == "auto":
        if not binary or events >= 100:
            return predictor.meta["calibration"]["method"]
        return "intercept" if events < FEW_EVENTS else "logistic"
    if not binary and (LOCAL_UPDATES.get(method) or CALIBRATORS[method]).binary_only:
        raise ValueError(f"'{method}' recalibration is for binary bundles; use {' or '.join(multiclass_methods())}")
    return method


def _fit(method: str, base: Calibrator, logits: np.ndarray, labels: np.ndarray) -> Calibrator:
    update = LOCAL_UPDATES.get(method)
    return (update(base) if update else make_calibrator(method)).fit(logits, labels)


def _choose_threshold(rule: tuple[str, float | None] | None, threshold: float | None, labels: np.ndarray,
                      probs: np.ndarray, positive: int | None) -> OperatingPoint | float | None:
    """The operating point by ``rule`` on these probabilities, or the kept ``threshold``."""
    if positive is None:
        return None
    if rule is None:
        return threshold
    return choose_operating_point((labels == positive).astype(int), probs[:, positive], rule[0], rule[1])


def _decide(probs: np.ndarray, threshold: float | None, positive: int | None) -> np.ndarray:
    if positive is None or threshold is None:
        return probs.argmax(axis=1)
    return np.where(probs[:, positive] >= threshold, positive, 1 - positive)


def local_figures(labels: np.ndarray, probs: np.ndarray, decisions: np.ndarray, positive: int | None, *, seed: int = 0) -> dict:
    """ECE (15 bins) and Brier with percentile bootstrap CIs; accuracy, and for binary models
    sensitivity and specificity at the decisions, with Wilson CIs; and the best accuracy any
    threshold reaches on the same scans (what a perfect operating point would give)."""
    scores = probs[:, positive] if positive is not None else probs
    # not stratified: with the class counts fixed, a sample whose probabilities share one bin has a zero-width ECE CI
    boot = dict(n_resamples=1000, seed=seed, stratified=False)
    pos = 1 if positive is None else positive
    figures = {
        "scans": int(len(labels)),
        "ece": _estimate(bootstrap_ci(lambda y, p: expected_calibration_error(y, p, positive=pos), labels, scores, **boot)),
        "brier": _estimate(bootstrap_ci(lambda y, p: brier_score(y, p, positive=pos), labels, scores, **boot)),
    }
    if positive is None:
        return figures | {"accuracy": _estimate(proportion_ci(int(np.sum(decisions == labels)), len(labels)))}
    actual, predicted = labels == positive, decisions == positive
    m = decision_metrics(actual, predicted, n_resamples=10)
    order = np.sort(scores)
    best = max(float(np.mean((scores >= t) == actual)) for t in np.r_[order, np.inf])
    return figures | {"accuracy": _estimate(m.accuracy), "sensitivity": _estimate(m.sensitivity),
                      "specificity": _estimate(m.specificity), "best_threshold_accuracy": best}


def _cross_validated(method: str, base: Calibrator, logits: np.ndarray, labels: np.ndarray, positive: int | None,
                     rule: tuple[str, float | None] | None, threshold: float | None, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Out-of-fold probabilities and decisions: each scan scored by a recalibration (and an
    operating point) fitted without it."""
    if len(labels) < LOO_BELOW:
        splitter, how = LeaveOneOut(), f"leave-one-out over {len(labels)} scans"
    else:
        splitter, how = StratifiedKFold(5, shuffle=True, random_state=seed), "stratified 5-fold"
    probs = np.zeros((len(labels), logits.shape[1]))
    decisions = np.zeros(len(labels), dtype=int)
    for fit_idx, test_idx in splitter.split(logits, labels):
        calibrator = _fit(method, base, logits[fit_idx], labels[fit_idx])
        fold_probs = calibrator.transform(logits[fit_idx])
        point = _choose_threshold(rule, threshold, labels[fit_idx], fold_probs, positive)
        probs[test_idx] = calibrator.transform(logits[test_idx])
        decisions[test_idx] = _decide(probs[test_idx], getattr(point, "threshold", point), positive)
    return probs, decisions, how


def parse_operating_point(text: str | None) -> tuple[str, float | None] | None:
    """``youden``, ``most_probable``, ``sensitivity=0.95`` or ``specificity=0.9`` as ``(method, target)``;
    None stays None."""
    if text is None:
        return None
    method, _, target = text.partition("=")
    if method in ("youden", "most_probable") and not target:
        return (method, None)
    try:
        value = float(target)
    except ValueError:
        value = None
    if method not in ("sensitivity", "specificity") or value is None or not 0 < value <= 1:
        raise ValueError(f"operating point '{text}': expected youden, most_probable, sensitivity=T or specificity=T with T in (0, 1]")
    return (method, value)


def recalibrate(
    bundle: str | Path,
    local: str | Path,
    out: str | Path,
    *,
    method: str = "auto",
    operating_point: str | None = None,
    keep_threshold: bool = False,
    normalization: str = "auto",
    seed: int = 0,
    batch_size: int = 16,
    num_workers: int = 0,
) -> SiteUpdate:
    """Refit a bundle's calibrator on a labelled local sample (``image,label`` CSV) and write the
    result as a new bundle at ``out``.

    ``method``: ``auto`` (:data:`AUTO_RULE`), a local update of the bundle's calibrator
    (:data:`~medtl.calibrate.LOCAL_UPDATES`: ``intercept``, ``logistic``) or any training calibrator
    (:data:`~medtl.calibrate.CALIBRATORS`, refitted on the raw logits).  The operating point is re-chosen on the recalibrated
    local probabilities by the bundle's rule, or by ``operating_point`` (``youden``, ``most_probable``,
    ``sensitivity=0.95``, ``specificity=0.9``); ``keep_threshold`` keeps the bundle's threshold.
    ``normalization``: ``adabn`` re-estimates the BatchNorm statistics on the local scans (labels
    unused) before recalibrating, ``keep`` keeps the parent's, ``auto`` (default) re-estimates them
    when the bundle's shift test flags the local scans (their features are unlike the training
    data's, so the stored statistics are not this site's) or when that gives the lower
    cross-validated log-loss on the local scans.
    """
    bundle, local, out = Path(bundle), Path(local), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose another output folder (nothing was written)")
    if keep_threshold and operating_point is not None:
        raise ValueError("choose either keep_threshold or an operating point, not both")
    if method not in recalibration_methods():
        raise ValueError(CALIBRATORS.unknown(method, recalibration_methods(), kind="recalibration method"))
    if normalization not in NORMALIZATION_CHOICES:
        raise ValueError(f"unknown normalization '{normalization}'; choose one of {', '.join(NORMALIZATION_CHOICES)}")
    predictor = _single_label(bundle)
    images, names = _check_local(local, predictor)
    reference = predictor.reference
    kept, logits, features, failed = _logits(predictor, images, batch_size=batch_size, num_workers=num_workers,
                                             features=normalization == "auto" and reference is not None)
    label_of = dict(zip(images, names))
    labels = np.array([predictor.classes.index(label_of[p]) for p in kept], dtype=int)
    counts = _check_counts(local, labels, predictor.classes, len(failed))
    parent_logits = logits
    events = min(counts.values())
    chosen = _choose_method(method, events, predictor)
    positive = predictor.positive_index if len(predictor.classes) == 2 else None
    stored = predictor.operating_point
    if positive is None or stored is None:
        rule, how_op = None, "argmax (multi-class)"
    elif keep_threshold:
        rule, how_op = None, f"kept the parent's threshold {stored.threshold:.4g}"
    else:
        rule = parse_operating_point(operating_point) or (stored.method, stored.target)
        how_op = f"re-chosen on the local scans: {rule[0]}" + (f" {rule[1]:g}" if rule[1] is not None else "")
    threshold = stored.threshold if stored is not None else None

    cross_validated = {"keep": _cross_validated(chosen, predictor.calibrator, logits, labels, positive, rule, threshold, seed)}
    adapted = None
    if normalization != "keep" and has_batch_norm(predictor.model):
        parent_state = {k: v.clone() for k, v in predictor.model.state_dict().items()}
        adapt_normalization(predictor.model, "adabn", _Scans(predictor, kept, batch_size, num_workers), device=predictor.device)
        _, adapted_logits, _, _ = _logits(predictor, kept, batch_size=batch_size, num_workers=num_workers)
        cross_validated["adabn"] = _cross_validated(chosen, predictor.calibrator, adapted_logits, labels, positive, rule,
                                                    threshold, seed)
        adapted = adapted_logits
    cv_loss = {name: float(log_loss(labels, np.clip(cv[0], 1e-12, 1), labels=range(len(predictor.classes))))
               for name, cv in cross_validated.items()}
    shift = reference.shift_test(features, seed=seed) if features is not None else None
    shifted = bool(shift and shift["shifted"])
    renormalized = normalization == "adabn" or (adapted is not None and (shifted or cv_loss["adabn"] < cv_loss["keep"]))
    if renormalized and adapted is None:
        raise ValueError(f"{bundle}: the model has no BatchNorm layers, so normalization 'adabn' cannot apply")
    if adapted is not None and not renormalized:
        predictor.model.load_state_dict(parent_state)
    logits = adapted if renormalized else logits
    cv_probs, cv_decisions, cv_how = cross_validated["adabn" if renormalized else "keep"]
    calibrator = _fit(chosen, predictor.calibrator, logits, labels)
    probs = calibrator.transform(logits)
    point = _choose_threshold(rule, threshold, labels, probs, positive)
    before_probs = predictor.calibrate(parent_logits)
    before = local_figures(labels, before_probs, predictor.decide(before_probs), positive, seed=seed)
    after = local_figures(labels, cv_probs, cv_decisions, positive, seed=seed)

    warnings = []
    if failed:
        warnings.append(f"{len(failed)} local scans could not be read and were left out")
    if events < FEW_EVENTS:
        warnings.append(f"only {events} scans of the rarer class: too few for recalibration to help reliably; label more "
                        "(50-100 scans with at least 10 of each class)")
    if after["ece"]["value"] >= before["ece"]["value"]:
        warnings.append("cross-validated on the local scans, recalibration did not lower the ECE "
                        f"({before['ece']['value']:.3f} -> {after['ece']['value']:.3f}): keep the parent bundle or label more scans")

    local_set = {"manifest": str(local.resolve()), "scans": len(kept), "events": events, "per_class": counts,
                 "unreadable": len(failed), "sha256": _set_hash(kept, [label_of[p] for p in kept])}
    how_norm = (f"AdaBN on the {len(kept)} local scans (BatchNorm statistics re-estimated; labels unused)" if renormalized
                else "the parent's BatchNorm statistics")
    norm_report = {"chosen": "adabn" if renormalized else "keep", "requested": normalization, "how": how_norm,
                   "cross_validated_log_loss": {k: round(v, 4) for k, v in cv_loss.items()},
                   "shift_test": shift["message"] if shift else None}
    step = {"step": "recalibrate", "method": chosen, "requested": method, "rule": AUTO_RULE if method == "auto" else None,
            "operating_point": how_op, "normalization": norm_report["chosen"], "local_set": local_set}
    meta = {**predictor.meta, "calibration": calibrator.to_dict(),
            "operating_point": point.to_dict() if isinstance(point, OperatingPoint) else predictor.meta.get("operating_point"),
            "provenance": _provenance(bundle, predictor, step)}
    report = {"parent": str(bundle.resolve()), "local_set": local_set, "method": chosen, "requested": method,
              "rule": AUTO_RULE, "operating_point": how_op, "normalization": norm_report,
              "threshold": getattr(point, "threshold", point), "parent_threshold": threshold,
              "before": {**before, "how": "the parent bundle's calibration and threshold on every local scan"},
              "after": {**after, "how": f"{cv_how}: each scan scored by a recalibration and threshold fitted without it"},
              "warnings": warnings, "unreadable": [{"image": p, "error": e} for p, e in failed]}
    written = _write_bundle(bundle, out, meta, {"recalibration.json": json.dumps(report, indent=2),
                                                "recalibration.md": _recalibration_text(report)},
                            state=predictor.model.state_dict() if renormalized else None)
    return SiteUpdate(written, report, warnings)


def _recalibration_text(report: dict) -> str:
    keys = [k for k in ("ece", "brier", "accuracy", "sensitivity", "specificity") if k in report["before"]]
    lines = [
        "# Local recalibration", "",
        f"Parent bundle: `{report['parent']}`  ",
        f"Local set: `{report['local_set']['manifest']}`, {report['local_set']['scans']} scans, "
        f"{report['local_set']['events']} of the rarer class {report['local_set']['per_class']}  ",
        f"Method: **{report['method']}** (asked: {report['requested']}; {report['rule']})  ",
        f"Operating point: {report['operating_point']}  ",
        _normalization_line(report["normalization"]), "",
        "| on the local scans | before (parent) | after (cross-validated) |", "|---|---|---|",
        *(f"| {k} (95 % CI) | {_fmt(report['before'][k])} | {_fmt(report['after'][k])} |" for k in keys),
    ]
    if "best_threshold_accuracy" in report["before"]:
        lines.append(f"| best accuracy of any threshold | {report['before']['best_threshold_accuracy']:.3f} | "
                     f"{report['after']['best_threshold_accuracy']:.3f} |")
    lines += ["", f"Before: {report['before']['how']}.  ", f"After: {report['after']['how']}.", ""]
    lines += [f"**Warning:** {w}" for w in report["warnings"]]
    return "\n".join(lines) + "\n"


def _normalization_line(norm: dict) -> str:
    losses = ", ".join(f"{k} {v:.4f}" for k, v in norm["cross_validated_log_loss"].items())
    shift = f"; shift test of the local scans: {norm['shift_test']}" if norm["shift_test"] else ""
    return f"Normalisation: **{norm['how']}** (asked: {norm['requested']}; cross-validated log-loss: {losses}{shift})"


# ---- adapt ---------------------------------------------------------------------------------------------


def em_prevalence(probs: np.ndarray, source_priors: np.ndarray, *, tol: float = 1e-8, max_iter: int = 1000) -> np.ndarray:
    """Class priors of an unlabelled sample by EM (Saerens, Latinne & Decaestecker 2002):
    reweight calibrated posteriors ``probs`` ``(N, C)``, made under ``source_priors``, by the ratio
    of new to source priors until the priors equal the mean reweighted posterior."""
    probs = np.asarray(probs, dtype=np.float64)
    source = np.asarray(source_priors, dtype=np.float64)
    priors = source.copy()
    for _ in range(max_iter):
        weighted = probs * (priors / source)
        weighted /= weighted.sum(axis=1, keepdims=True)
        new = weighted.mean(axis=0)
        if np.max(np.abs(new - priors)) < tol:
            return new
        priors = new
    return priors


def _label_shift(probs: np.ndarray, predictor: Predictor, seed: int, n_resamples: int = 500) -> dict | None:
    """The site's prevalence by EM with a percentile bootstrap CI over scans, and PPV/NPV at it
    from the bundle's stored sensitivity and specificity (binary bundles)."""
    val = predictor.meta.get("training", {}).get("partitions", {}).get("val", {}).get("per_class")
    if not val or predictor.positive_index is None:
        return None
    counts = np.array([val[c] for c in predictor.classes], dtype=np.float64)
    source = counts / counts.sum()
    pos = predictor.positive_index
    estimate = em_prevalence(probs, source)[pos]
    rng = np.random.default_rng(seed)
    boot = [em_prevalence(probs[rng.integers(0, len(probs), len(probs))], source)[pos] for _ in range(n_resamples)]
    low, high = np.quantile(boot, [0.025, 0.975])
    result = {"prevalence": {"value": float(estimate), "ci": [float(low), float(high)]}, "source_prevalence": float(source[pos]),
              "method": f"EM (Saerens et al. 2002) on the calibrated probabilities; percentile bootstrap over scans ({n_resamples})"}
    op = predictor.operating_point
    if op is not None:
        se, sp = op.sensitivity, op.specificity

        def ppv(pi: float) -> float:
            return pi * se / (pi * se + (1 - pi) * (1 - sp)) if pi * se + (1 - pi) * (1 - sp) > 0 else float("nan")

        def npv(pi: float) -> float:
            return (1 - pi) * sp / ((1 - pi) * sp + pi * (1 - se)) if (1 - pi) * sp + pi * (1 - se) > 0 else float("nan")

        result["ppv"] = {"value": ppv(estimate), "ci": sorted([ppv(low), ppv(high)])}
        result["npv"] = {"value": npv(estimate), "ci": sorted([npv(low), npv(high)])}
        result["ppv_npv_how"] = (f"Bayes from the bundle's sensitivity {se:.3f} and specificity {sp:.3f} (its validation split) "
                                 "at the estimated prevalence; the interval spans the prevalence CI only")
    return result


class _Scans:
    """Re-iterable preprocessed batches of scans (TENT passes over them more than once)."""

    def __init__(self, predictor: Predictor, paths: Sequence[str], batch_size: int, num_workers: int) -> None:
        self.args = (predictor, list(paths))
        self.kwargs = dict(batch_size=batch_size, num_workers=num_workers)

    def __iter__(self) -> Iterator[torch.Tensor]:
        from medtl.infer import load_batches

        for batch in load_batches(*self.args, **self.kwargs):
            if batch.images is not None:
                yield batch.images


def adapt(
    bundle: str | Path,
    unlabelled: str | Path,
    out: str | Path,
    *,
    method: str = "adabn",
    tent_lr: float = 1e-4,
    tent_steps: int = 1,
    seed: int = 0,
    batch_size: int = 32,
    num_workers: int = 0,
) -> SiteUpdate:
    """Adapt a bundle to a site's unlabelled scans (a folder or an ``image`` CSV) without retraining:
    ``adabn`` re-estimates the BatchNorm statistics, ``tent`` then also tunes the normalisation
    layers' affine parameters by entropy minimisation.  The calibrator and operating point are
    the parent's.  The report estimates the site's prevalence (EM, with a CI) and PPV/NPV at it,
    and, when the bundle has a feature reference, tests the scans for covariate shift before and
    after, warning when the prevalence estimate cannot be trusted."""
    from medtl.infer import gather_inputs

    bundle, unlabelled, out = Path(bundle), Path(unlabelled), Path(out)
    if method not in NORMALIZATION:
        raise ValueError(NORMALIZATION.unknown(method))
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose another output folder (nothing was written)")
    predictor = _single_label(bundle)
    paths, _ = gather_inputs(unlabelled)
    reference = predictor.reference
    kept, before_logits, before_features, failed = _logits(predictor, paths, batch_size=batch_size, num_workers=num_workers,
                                                         features=reference is not None)
    if len(kept) < 2:
        raise ValueError(f"{unlabelled}: {len(kept)} readable scans; adaptation needs at least 2 (hundreds recommended)")
    torch.manual_seed(seed)
    adapt_normalization(predictor.model, method, _Scans(predictor, kept, batch_size, num_workers), tent_lr=tent_lr,
                        tent_steps=tent_steps, device=predictor.device)
    _, after_logits, after_features, _ = _logits(predictor, kept, batch_size=batch_size, num_workers=num_workers,
                                                 features=reference is not None)
    before_probs, after_probs = predictor.calibrate(before_logits), predictor.calibrate(after_logits)

    warnings = [f"{len(failed)} scans could not be read and were left out"] if failed else []
    shift = None
    if reference is not None:
        shift = {"before": reference.shift_test(before_features, seed=seed), "after": reference.shift_test(after_features, seed=seed)}
        if shift["after"]["shifted"]:
            warnings.append("after adaptation the scans still look unlike the training data (" + shift["after"]["message"] +
                            "): the prevalence estimate assumes only the prevalence changed, so treat it with caution and "
                            "check the bundle on a few labelled local scans (medtl recalibrate / evaluate)")
    else:
        warnings.append("the bundle has no feature reference, so covariate shift (which makes the prevalence estimate "
                        "unreliable) cannot be checked")
    label_shift = _label_shift(after_probs, predictor, seed)
    if label_shift is None and predictor.positive_index is not None:
        warnings.append("the bundle does not record its validation class counts: no prevalence estimate")
    if len(kept) < 100:
        warnings.append(f"only {len(kept)} scans: normalisation statistics from so few scans are noisy")

    positive = predictor.positive_index
    decided = {name: float(np.mean(predictor.decide(p) == positive)) if positive is not None else None
               for name, p in (("before", before_probs), ("after", after_probs))}
    unlabelled_set = {"source": str(unlabelled.resolve()), "scans": len(kept), "unreadable": len(failed), "sha256": _set_hash(kept)}
    step = {"step": "adapt", "method": method, "unlabelled_set": unlabelled_set,
            **({"tent_lr": tent_lr, "tent_steps": tent_steps} if method == "tent" else {})}
    meta = {**predictor.meta, "provenance": _provenance(bundle, predictor, step)}
    report = {"parent": str(bundle.resolve()), "method": method, "unlabelled_set": unlabelled_set,
              "share_predicted_positive": decided, "label_shift": label_shift, "shift_test": shift, "warnings": warnings,
              "unreadable": [{"image": p, "error": e} for p, e in failed]}
    written = _write_bundle(bundle, out, meta, {"adaptation.json": json.dumps(report, indent=2), "adaptation.md": _adaptation_text(report)},
                            state=predictor.model.state_dict())
    return SiteUpdate(written, report, warnings)


def _adaptation_text(report: dict) -> str:
    lines = ["# Adaptation to unlabelled local scans", "", f"Parent bundle: `{report['parent']}`  ",
             f"Method: **{report['method']}** on {report['unlabelled_set']['scans']} scans from `{report['unlabelled_set']['source']}`", ""]
    share = report["share_predicted_positive"]
    if share["before"] is not None:
        lines.append(f"Share of scans predicted positive: {share['before']:.3f} before, {share['after']:.3f} after.")
    ls = report["label_shift"]
    if ls:
        lines += ["", f"Estimated prevalence at the site: {_fmt(ls['prevalence'])} (training validation split: "
                      f"{ls['source_prevalence']:.3f}); {ls['method']}."]
        if "ppv" in ls:
            lines.append(f"PPV {_fmt(ls['ppv'])}, NPV {_fmt(ls['npv'])}: {ls['ppv_npv_how']}.")
    if report["shift_test"]:
        lines += ["", f"Shift test before adaptation: {report['shift_test']['before']['message']}.",
                  f"Shift test after adaptation: {report['shift_test']['after']['message']}."]
    lines += [""] + [f"**Warning:** {w}" for w in report["warnings"]]
    return "\n".join(lines) + "\n"
