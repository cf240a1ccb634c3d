"""The numbers of a report, as one JSON-ready dict (written as ``metrics.json``).

Every statistic comes from :mod:`medtl.metrics` (and the ROC band from
:mod:`medtl.report.rocband`); this module picks what to compute for a binary or a multi-class
task, on the probabilities before and after recalibration, overall and per subgroup.

Binary tasks (``positive_index`` given): scores are the positive-class probabilities; the
operating point is a threshold on the *calibrated* positive-class probability, so decision
metrics are reported for the calibrated probabilities only.  Multi-class tasks: macro one-vs-rest
AUROC, top-label calibration, and decisions by argmax.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medtl.checks import class_indices
from medtl.metrics import (
    DECISION_RULE,
    Estimate,
    OperatingPoint,
    adaptive_calibration_error,
    bootstrap_ci,
    brier_score,
    calibration_metrics,
    decision_curve,
    expected_calibration_error,
    maximum_calibration_error,
    proportion_ci,
    reliability_curve,
    roc_auc,
    roc_auc_ovr,
    threshold_metrics,
)
from medtl.report.jsonable import jsonable
from medtl.report.rocband import METHOD as ROC_BAND_METHOD
from medtl.report.rocband import roc_band

N_BINS = 15


def _check_inputs(y_true, probs_uncalibrated, probs_calibrated, class_names, positive_index, operating_point, groups):
    p_u = np.asarray(probs_uncalibrated, dtype=np.float64)
    p_c = np.asarray(probs_calibrated, dtype=np.float64)
    if p_c.ndim != 2 or p_u.shape != p_c.shape:
        raise ValueError(f"probabilities must both have shape (N, C); got {p_u.shape} and {p_c.shape}")
    n, c = p_c.shape
    if len(class_names) != c:
        raise ValueError(f"{len(class_names)} class names for {c} probability columns")
    y = class_indices(y_true, n, c, "y_true").astype(np.int64)
    # float32 softmax can land a rounding error outside [0, 1]
    p_u, p_c = (np.clip(p, 0.0, 1.0) if p.size and p.min() >= -1e-6 and p.max() <= 1 + 1e-6 else p for p in (p_u, p_c))
    if positive_index is not None and not 0 <= positive_index < c:
        raise ValueError(f"positive_index {positive_index} is not a column of {c}")
    if operating_point is not None and positive_index is None:
        raise ValueError("an operating point needs positive_index (it thresholds the positive-class probability)")
    for column, labels in (groups or {}).items():
        if len(labels) != n:
            raise ValueError(f"group column '{column}' has {len(labels)} labels for {n} cases")
    return y, p_u, p_c


def _calibration(y, prob, *, n_bins: int, boot: dict) -> dict:
    """:func:`calibration_metrics`; for binary probabilities where the slope is not estimable
    (one class, or outcomes perfectly separated) the other figures with the same bootstrap."""
    try:
        return calibration_metrics(y, prob, n_bins=n_bins, **boot).to_dict()
    except ValueError as err:
        if np.ndim(prob) != 1:
            raise
        reason = f"logistic recalibration fit failed: {err}"
    method = f"stratified percentile bootstrap ({boot['n_resamples']} resamples, seed {boot['seed']})"

    def estimate(fn) -> dict:
        result = bootstrap_ci(fn, y, prob, boot["n_resamples"], boot["seed"], conf_level=boot["conf_level"])
        return Estimate(result.estimate, result.ci, method).to_dict()

    return {
        "form": "positive-class probability",
        "ece": estimate(lambda a, b: expected_calibration_error(a, b, n_bins)),
        "adaptive_ece": estimate(lambda a, b: adaptive_calibration_error(a, b, n_bins)),
        "mce": estimate(lambda a, b: maximum_calibration_error(a, b, n_bins)),
        "brier": estimate(brier_score),
        "slope": None,
        "slope_not_estimable": reason,
        "reliability": reliability_curve(y, prob, n_bins).to_dict(),
        "reliability_adaptive": reliability_curve(y, prob, n_bins, strategy="quantile").to_dict(),
    }


def _confusion(actual: np.ndarray, predicted: np.ndarray, labels: Sequence[str], columns: str) -> dict:
    k = len(labels)
    matrix = np.bincount(actual * k + predicted, minlength=k * k).reshape(k, k)
    return {"labels": list(labels), "matrix": matrix.tolist(), "rows": "actual class", "columns": columns}


def _binary_block(y_bin, score, *, operating_point, names, n_bins, boot, band: bool, prevalence: float | None) -> dict:
    both = 0 < y_bin.sum() < len(y_bin)
    block: dict[str, Any] = {
        "auroc": roc_auc(y_bin, score, conf_level=boot["conf_level"]).to_dict() if both
        else {"auc": None, "ci": None, "not_estimable": "needs positive and negative cases"},
        "calibration": _calibration(y_bin, score, n_bins=n_bins, boot=boot),
    }
    if band and both:
        block["roc_band"] = roc_band(y_bin, score, **boot)
    if operating_point is not None:
        tm = threshold_metrics(y_bin, score, operating_point.threshold, prevalence=prevalence, **boot)
        block["threshold_metrics"] = tm.to_dict()
        predicted = (score >= operating_point.threshold).astype(int)
        block["confusion_matrix"] = _confusion(y_bin, predicted, names, f"predicted ({DECISION_RULE})")
    return block


def _multiclass_block(y, probs, *, class_names, n_bins, boot) -> dict:
    missing = [name for k, name in enumerate(class_names) if not 0 < np.sum(y == k) < len(y)]
    predicted = probs.argmax(axis=1)
    level = boot["conf_level"]
    per_class = {}
    for k, name in enumerate(class_names):
        hits, cases, calls = int(np.sum((y == k) & (predicted == k))), int(np.sum(y == k)), int(np.sum(predicted == k))
        per_class[name] = {
            "n": cases,
            "sensitivity": proportion_ci(hits, cases, level).to_dict(),
            "ppv": proportion_ci(hits, calls, level).to_dict(),
        }
    return {
        "auroc": roc_auc_ovr(y, probs, list(class_names), **boot).to_dict() if not missing
        else {"auc": None, "ci": None, "not_estimable": f"classes {missing} lack cases or non-cases"},
        "calibration": _calibration(y, probs, n_bins=n_bins, boot=boot),
        "accuracy": proportion_ci(int(np.sum(predicted == y)), len(y), level).to_dict(),
        "per_class_decisions": per_class,
        "confusion_matrix": _confusion(y, predicted, class_names, "predicted class (argmax)"),
    }


def _subgroup(y, probs, *, positive_index, class_names, operating_point, n_bins, boot) -> dict:
    """n, events, AUROC (None with one class), decisions at the operating point (binary) or
    accuracy (multi-class), ECE and Brier of the calibrated probabilities of one subgroup."""
    if positive_index is not None:
        y_bin = (y == positive_index).astype(int)
        score = probs[:, positive_index]
        events = int(y_bin.sum())
        row: dict[str, Any] = {
            "n": len(y),
            "events": events,
            "auroc": roc_auc(y_bin, score, conf_level=boot["conf_level"]).to_dict() if 0 < events < len(y) else None,
            "ece": expected_calibration_error(y_bin, score, n_bins),
            "brier": brier_score(y_bin, score),
        }
        if operating_point is not None:
            tm = threshold_metrics(y_bin, score, operating_point.threshold, **boot)
            row.update(sensitivity=tm.sensitivity.to_dict(), specificity=tm.specificity.to_dict(), tp=tm.tp, fp=tm.fp, tn=tm.tn, fn=tm.fn)
        return row
    present = all(0 < np.sum(y == k) < len(y) for k in range(len(class_names)))
    correct = int(np.sum(probs.argmax(axis=1) == y))
    return {
        "n": len(y),
        "events": {name: int(np.sum(y == k)) for k, name in enumerate(class_names)},
        "auroc": roc_auc_ovr(y, probs, list(class_names), **boot).to_dict() if present else None,
        "accuracy": proportion_ci(correct, len(y), boot["conf_level"]).to_dict(),
        "ece": expected_calibration_error(y, probs, n_bins),
        "brier": brier_score(y, probs),
    }


def _conventions(class_names, positive_index, operating_point, n_bins: int, boot: dict) -> dict:
    binary = positive_index is not None
    positive = class_names[positive_index] if binary else None
    rule = (
        f"Predicted '{positive}' when the calibrated probability of '{positive}' >= threshold"
        if binary else "Predicted class = argmax of the calibrated probabilities"
    )
    return {
        "task": "binary" if binary else "multi-class",
        "positive_class": positive,
        "decision_rule": rule,
        "threshold": operating_point.threshold if operating_point is not None else None,
        "threshold_scale": "calibrated positive-class probability" if binary else None,
        "probabilities": "uncalibrated = softmax of the model's logits; calibrated = after the stored recalibration",
        "calibration_form": "positive-class probability" if binary else "top-label (max probability vs argmax correct)",
        "ece_bin_edges": np.linspace(0.0, 1.0, n_bins + 1).tolist(),
        "ece_bins": f"{n_bins} equal-width bins [k/{n_bins}, (k+1)/{n_bins}), the last closed at 1",
        "adaptive_ece_bins": f"{n_bins} equal-count bins of the sorted probabilities",
        "brier": "mean squared error of the positive-class probability (range 0-1)" if binary
        else "mean over cases of the sum over classes of (p_c - 1[y = c])^2 (range 0-2)",
        "conf_level": boot["conf_level"],
        "ci_methods": {
            "auroc": "DeLong (normal, clipped to [0, 1])" if binary
            else "macro one-vs-rest: class-stratified percentile bootstrap; per class: DeLong",
            "proportions": "Wilson score (sensitivity, specificity, PPV, NPV, accuracy)",
            "likelihood_ratios": "log method (Simel 1991)",
            "f1": "class-stratified percentile bootstrap",
            "calibration": "class-stratified percentile bootstrap (ECE, adaptive ECE, MCE, Brier)",
            "calibration_slope": "Wald, from the logistic recalibration fit",
            "roc_band": ROC_BAND_METHOD,
        },
        "bootstrap": {"n_resamples": boot["n_resamples"], "seed": boot["seed"], "stratified_by": "class"},
        "decision_metrics": "for the calibrated probabilities only (the threshold is on their scale)" if binary
        else "argmax decisions, for calibrated and uncalibrated probabilities",
        "subgroups": "Calibrated probabilities; AUROC is null (not estimable) where a subgroup has a single class.",
    }


def summarize(
    *,
    y_true,
    probs_uncalibrated,
    probs_calibrated,
    class_names: Sequence[str],
    positive_index: int | None,
    operating_point: OperatingPoint | None,
    groups: Mapping[str, Sequence[str]] | None,
    info: Mapping[str, Any],
    title: str = "medtl report",
    n_resamples: int = 2000,
    seed: int = 0,
    conf_level: float = 0.95,
    n_bins: int = N_BINS,
    prevalence: float | None = None,
) -> dict:
    """All report figures as one JSON-ready dict.

    ``y_true``: class indices (N,); ``probs_*``: (N, C) probabilities before and after
    recalibration; ``positive_index``: the positive class of a binary task, ``None`` for
    multi-class; ``operating_point``: threshold on the calibrated positive-class probability;
    ``groups``: {column: label per case} for subgroup figures; ``info``: JSON-able run facts,
    copied to ``info``.  Bootstrap CIs use ``n_resamples`` class-stratified resamples from ``seed``.
    ``prevalence``: the deployment prevalence; binary threshold metrics add PPV and NPV at it.

    Keys: ``title``, ``n``, ``class_names``, ``class_counts``, ``positive_class``,
    ``operating_point``, ``uncalibrated`` and ``calibrated`` (each with ``auroc`` {auc, ci, ...}
    and ``calibration``; binary adds ``roc_band`` (calibrated), ``threshold_metrics`` and
    ``confusion_matrix`` at the operating point; multi-class adds ``accuracy``,
    ``per_class_decisions`` and the argmax ``confusion_matrix``), ``decision_curve`` (binary),
    ``subgroups`` {column: {group: figures}}, ``conventions`` and ``info``.
    """
    y, p_u, p_c = _check_inputs(y_true, probs_uncalibrated, probs_calibrated, class_names, positive_index, operating_point, groups)
    names = [str(name) for name in class_names]
    boot = {"n_resamples": n_resamples, "seed": seed, "conf_level": conf_level}
    summary: dict[str, Any] = {
        "title": title,
        "n": len(y),
        "class_names": names,
        "class_counts": {name: int(np.sum(y == k)) for k, name in enumerate(names)},
        "positive_class": names[positive_index] if positive_index is not None else None,
        "operating_point": operating_point.to_dict() if operating_point is not None else None,
    }
    if positive_index is not None:
        y_bin = (y == positive_index).astype(int)
        negative = names[1 - positive_index] if len(names) == 2 else f"not {names[positive_index]}"
        binary_names = [negative, names[positive_index]]
        for key, probs in (("uncalibrated", p_u), ("calibrated", p_c)):
            calibrated = key == "calibrated"
            summary[key] = _binary_block(
                y_bin, probs[:, positive_index], operating_point=operating_point if calibrated else None,
                names=binary_names, n_bins=n_bins, boot=boot, band=calibrated, prevalence=prevalence,
            )
        summary["decision_curve"] = decision_curve(y_bin, p_c[:, positive_index]).to_dict()
    else:
        for key, probs in (("uncalibrated", p_u), ("calibrated", p_c)):
            summary[key] = _multiclass_block(y, probs, class_names=names, n_bins=n_bins, boot=boot)
        summary["decision_curve"] = None
    summary["subgroups"] = {}
    for column, raw in (groups or {}).items():
        labels = np.array([str(v) for v in raw])
        summary["subgroups"][str(column)] = {
            value: _subgroup(
                y[labels == value], p_c[labels == value], positive_index=positive_index, class_names=names,
                operating_point=operating_point, n_bins=n_bins, boot=boot,
            )
            for value in sorted(set(labels))
        }
    summary["conventions"] = _conventions(names, positive_index, operating_point, n_bins, boot)
    summary["info"] = dict(info)
    return jsonable(summary)
