"""The per-label report (``report_layout = "per_label"``): one binary block per finding.

Each finding is scored on the scans where it is known (unknown cells count nowhere): AUROC with
its DeLong CI before and after recalibration, calibration before and after (ECE, adaptive ECE,
MCE, Brier with bootstrap CIs; slope and intercept), and the decisions at its own operating point
(sensitivity, specificity, PPV, NPV with Wilson CIs).  The headline is the macro AUROC, the
unweighted mean over the findings, with a bootstrap CI stratified on label combinations.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medtl.metrics import OperatingPoint, expected_calibration_error, roc_auc, roc_auc_multilabel, roc_curve, threshold_metrics
from medtl.report.jsonable import jsonable
from medtl.report.page import CSS, _auroc, _e, _estimate, _figure, _num, _pct, _site_shift_section, _table
from medtl.report.plots import reliability_plot, roc_plot, site_shift_plot, training_plot
from medtl.report.summary import N_BINS, _calibration

NOT_ESTIMABLE = {"auc": None, "ci": None, "not_estimable": "needs known positive and negative cases"}


def _both(y: np.ndarray) -> bool:
    return 0 < y.sum() < len(y)


def _macro(y: np.ndarray, probs: np.ndarray, names: list[str], boot: dict) -> dict:
    """Macro AUROC over the findings with known positives and negatives, with the per-finding AUROCs."""
    estimable = [k for k in range(len(names)) if _both(y[~np.isnan(y[:, k]), k])]
    if not estimable:
        return NOT_ESTIMABLE
    result = roc_auc_multilabel(y[:, estimable], probs[:, estimable], [names[k] for k in estimable], **boot).to_dict()
    skipped = [names[k] for k in range(len(names)) if k not in estimable]
    return {**result, **({"findings_left_out": skipped} if skipped else {})}


def _finding(y: np.ndarray, p_u: np.ndarray, p_c: np.ndarray, point: OperatingPoint | None, *, n_bins: int, boot: dict,
             prevalence: float | None) -> dict:
    """One finding's figures on its known scans."""
    both = _both(y)
    block: dict[str, Any] = {
        "n": len(y),
        "positives": int(y.sum()),
        "auroc": {key: roc_auc(y, p, conf_level=boot["conf_level"]).to_dict() if both else NOT_ESTIMABLE
                  for key, p in (("uncalibrated", p_u), ("calibrated", p_c))},
        "calibration": {key: _calibration(y, p, n_bins=n_bins, boot=boot) for key, p in (("uncalibrated", p_u), ("calibrated", p_c))},
    }
    if point is not None:
        block["operating_point"] = point.to_dict()
        block["threshold_metrics"] = threshold_metrics(y, p_c, point.threshold, prevalence=prevalence, **boot).to_dict()
    return block


def summarize_multilabel(
    *,
    y_true,
    probs_uncalibrated,
    probs_calibrated,
    label_names: Sequence[str],
    operating_points: Mapping[str, OperatingPoint] | None,
    groups: Mapping[str, Sequence[str]] | None,
    info: Mapping[str, Any],
    title: str = "medtl report",
    n_resamples: int = 2000,
    seed: int = 0,
    conf_level: float = 0.95,
    n_bins: int = N_BINS,
    prevalence: float | None = None,
) -> dict:
    """All figures of a multi-label report as one JSON-ready dict.

    ``y_true``: ``(N, L)`` 0/1 with NaN for unknown; ``probs_*``: ``(N, L)`` sigmoid probabilities
    before and after the per-finding recalibration; ``operating_points``: each finding's threshold
    on its calibrated probability.  Keys: ``title``, ``n``, ``task``, ``class_names``,
    ``label_counts``, ``uncalibrated`` and ``calibrated`` (each ``auroc``: the macro AUROC with the
    per-finding ones, as the single-label summary's), ``per_label`` {finding: figures},
    ``subgroups`` {column: {group: {n, macro_auroc, per-finding AUROC and ECE}}}, ``conventions``, ``info``."""
    y = np.asarray(y_true, dtype=np.float64)
    p_u, p_c = (np.asarray(p, dtype=np.float64) for p in (probs_uncalibrated, probs_calibrated))
    names = [str(n) for n in label_names]
    if y.ndim != 2 or p_u.shape != y.shape or p_c.shape != y.shape or y.shape[1] != len(names):
        raise ValueError(f"y_true and probabilities must be (N, {len(names)}); got {y.shape}, {p_u.shape}, {p_c.shape}")
    boot = {"n_resamples": n_resamples, "seed": seed, "conf_level": conf_level}
    per_label = {}
    for k, name in enumerate(names):
        known = ~np.isnan(y[:, k])
        per_label[name] = _finding(y[known, k].astype(int), p_u[known, k], p_c[known, k],
                                   operating_points[name] if operating_points else None, n_bins=n_bins, boot=boot,
                                   prevalence=prevalence)
    subgroups: dict[str, dict] = {}
    for column, raw in (groups or {}).items():
        labels = np.array([str(v) for v in raw])
        subgroups[str(column)] = {}
        for value in sorted(set(labels)):
            rows = labels == value
            cells = {}
            for k, name in enumerate(names):
                known = rows & ~np.isnan(y[:, k])
                yk = y[known, k].astype(int)
                cells[name] = {"n": int(known.sum()), "positives": int(yk.sum()),
                               "auroc": roc_auc(yk, p_c[known, k], conf_level=conf_level).to_dict() if _both(yk) else None,
                               "ece": expected_calibration_error(yk, p_c[known, k], n_bins) if known.any() else None}
            subgroups[str(column)][value] = {"n": int(rows.sum()), "macro_auroc": _macro(y[rows], p_c[rows], names, boot),
                                             "per_label": cells}
    summary = {
        "title": title,
        "n": len(y),
        "task": "multilabel",
        "class_names": names,
        "label_counts": {n: {"positive": int(np.sum(y[:, k] == 1)), "negative": int(np.sum(y[:, k] == 0)),
                             "unknown": int(np.sum(np.isnan(y[:, k])))} for k, n in enumerate(names)},
        "uncalibrated": {"auroc": _macro(y, p_u, names, boot)},
        "calibrated": {"auroc": _macro(y, p_c, names, boot)},
        "per_label": per_label,
        "subgroups": subgroups,
        "conventions": {
            "task": "multi-label",
            "unknown_labels": "a blank cell is unknown: that scan counts for no figure of that finding (AUROC, calibration, "
            "threshold, macro AUROC), and for every figure of the findings it has",
            "probabilities": "uncalibrated = sigmoid of each finding's logit; calibrated = after that finding's stored recalibration",
            "decision_rule": "finding present when its calibrated probability >= its own threshold",
            "macro_auroc": "unweighted mean of the per-finding AUROCs over the findings with known positives and negatives; "
            "percentile bootstrap CI stratified on label combinations (unknown as its own value)",
            "auroc_ci": "DeLong (normal, clipped to [0, 1]) per finding",
            "calibration": "per finding, positive-class probability; class-stratified percentile bootstrap CIs",
            "ece_bins": f"{n_bins} equal-width bins [k/{n_bins}, (k+1)/{n_bins}), the last closed at 1",
            "proportions": "Wilson score (sensitivity, specificity, PPV, NPV)",
            "conf_level": conf_level,
            "bootstrap": {"n_resamples": n_resamples, "seed": seed},
        },
        "info": dict(info),
    }
    return jsonable(summary)


def _summary_table(s: Mapping) -> str:
    rows = []
    for name, d in s["per_label"].items():
        tm, op = d.get("threshold_metrics"), d.get("operating_point")
        cal = d["calibration"]
        rows.append([_e(name), _e(d["n"]), _e(d["positives"]), _auroc(d["auroc"]["calibrated"]),
                     _e(_num(cal["uncalibrated"]["ece"]["value"])), _e(_num(cal["calibrated"]["ece"]["value"])),
                     _e(f"{op['threshold']:.3f} ({op['method']})") if op else "n/a",
                     _estimate(tm["sensitivity"], _pct) if tm else "n/a", _estimate(tm["specificity"], _pct) if tm else "n/a"])
    return _table(["Finding", "Known scans", "Positives", "AUROC (95% CI)", "ECE before", "ECE after", "Threshold (rule)",
                   "Sensitivity (95% CI)", "Specificity (95% CI)"], rows, numeric=range(1, 9))


def _calibration_table(s: Mapping) -> str:
    rows = []
    for name, d in s["per_label"].items():
        before, after = d["calibration"]["uncalibrated"], d["calibration"]["calibrated"]
        for key, label in (("ece", "ECE"), ("adaptive_ece", "Adaptive ECE"), ("brier", "Brier score")):
            rows.append([_e(name), _e(label), _estimate(before[key]), _estimate(after[key])])
        slopes = [c["slope"]["slope"] if c.get("slope") else None for c in (before, after)]
        rows.append([_e(name), "Calibration slope", *(_estimate(v) if v else "not estimable" for v in slopes)])
    return _table(["Finding", "Metric", "Before (95% CI)", "After (95% CI)"], rows, numeric=(2, 3))


def _decision_table(s: Mapping) -> str:
    rows = []
    for name, d in s["per_label"].items():
        tm, op = d.get("threshold_metrics"), d.get("operating_point")
        if not tm:
            continue
        rows.append([_e(name), _e(f"{op['threshold']:.4f}"), _e(op["description"]), _e(f"{tm['tp']} / {tm['fp']} / {tm['tn']} / {tm['fn']}"),
                     _estimate(tm["ppv"], _pct), _estimate(tm["npv"], _pct)])
    return _table(["Finding", "Threshold", "How it was chosen (on the calibration scans)", "TP / FP / TN / FN", "PPV (95% CI)",
                   "NPV (95% CI)"], rows, numeric=(1, 3))


def _subgroup_tables(s: Mapping) -> str:
    parts = []
    names = s["class_names"]
    for column, groups in s["subgroups"].items():
        rows = [[_e(g), _e(d["n"]), _auroc(d["macro_auroc"]),
                 *(_e(_num(d["per_label"][n]["auroc"]["auc"])) if d["per_label"][n]["auroc"] else "n/a" for n in names)]
                for g, d in groups.items()]
        parts.append(f"<h3>By {_e(column)}</h3>"
                     + _table(["Group", "Scans", "Macro AUROC (95% CI)", *(f"AUROC {n}" for n in names)], rows,
                              numeric=range(1, 3 + len(names))))
    return "".join(parts) or "<p>No subgroup column (e.g. site) was given.</p>"


def render_multilabel_page(s: Mapping, images: Mapping[str, Path], *, title: str) -> str:
    """The whole multi-label report page."""
    conv = s["conventions"]
    counts = ", ".join(f"{n}: {c['positive']} positive, {c['negative']} negative, {c['unknown']} unknown"
                       for n, c in s["label_counts"].items())
    reliability = "".join(_figure(images, f"reliability_{k}", f"Reliability of '{n}': before and after recalibration")
                          for k, n in enumerate(s["class_names"]))
    body = [
        f"<h1>{_e(title)}</h1>",
        f'<p class="sub">{_e(s["n"])} scans; multi-label findings: {_e(", ".join(s["class_names"]))}.</p>',
        f"<p><b>Macro AUROC:</b> {_auroc(s['calibrated']['auroc'])} after recalibration; "
        f"{_auroc(s['uncalibrated']['auroc'])} before. {_e(conv['macro_auroc'])}.</p>",
        "<h2>Evaluation data</h2>",
        f"<p><b>Evaluated on:</b> {_e(s['info'].get('evaluated_on', 'not recorded'))}</p><p><b>Labels:</b> {_e(counts)}.</p>",
        f'<p class="note">{_e(conv["unknown_labels"])}. No patient identifiers are included in this report.</p>',
        "<h2>Summary per finding</h2>", _summary_table(s),
        f'<p class="note">AUROC of the calibrated probabilities, CI: {_e(conv["auroc_ci"])}. Decisions: {_e(conv["decision_rule"])}.</p>',
        f'<div class="figs">{_figure(images, "roc", "ROC per finding (calibrated probabilities, known scans only)")}</div>',
        "<h2>Calibration per finding, before and after recalibration</h2>", _calibration_table(s),
        f'<p class="note">{_e(conv["calibration"])}; ECE bins: {_e(conv["ece_bins"])}.</p>',
        f'<div class="figs">{reliability}</div>',
        "<h2>Operating points per finding</h2>", _decision_table(s),
        f'<p class="note">Proportions: {_e(conv["proportions"])}.</p>',
        "<h2>Subgroups</h2>", _subgroup_tables(s),
        _site_shift_section(s, images),
    ]
    if "training" in images:
        body += ["<h2>Training</h2>", f'<div class="figs">{_figure(images, "training", "Loss and validation macro AUROC per epoch")}</div>']
    body += ["<h2>All recorded run information</h2><details><summary>Show as JSON</summary>"
             f"<pre>{_e(json.dumps(s['info'], indent=2, sort_keys=True))}</pre></details>"]
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{_e(title)}</title>'
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")


def write_multilabel_report(
    out_dir: str | Path,
    *,
    y_true,
    probs_uncalibrated,
    probs_calibrated,
    label_names: Sequence[str],
    operating_points: Mapping[str, OperatingPoint] | None,
    groups: Mapping[str, Sequence[str]] | None,
    info: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]] | None = None,
    title: str = "medtl report",
    n_resamples: int = 2000,
    seed: int = 0,
    site_shift: Mapping[str, Mapping[str, Any]] | None = None,
    prevalence: float | None = None,
) -> dict:
    """Write ``metrics.json``, ``roc.png``, ``reliability_<k>.png`` per finding, ``training.png``
    (with ``history``), ``site_shift.png`` (with ``site_shift``, as :func:`~medtl.report.write_report`)
    and ``report.html``; returns the metrics dict (:func:`summarize_multilabel`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize_multilabel(y_true=y_true, probs_uncalibrated=probs_uncalibrated, probs_calibrated=probs_calibrated,
                                   label_names=label_names, operating_points=operating_points, groups=groups, info=info,
                                   title=title, n_resamples=n_resamples, seed=seed, prevalence=prevalence)
    y, p_c = np.asarray(y_true, dtype=np.float64), np.asarray(probs_calibrated, dtype=np.float64)
    images: dict[str, Path] = {}
    curves = []
    for k, name in enumerate(summary["class_names"]):
        known = ~np.isnan(y[:, k])
        d = summary["per_label"][name]
        if d["auroc"]["calibrated"]["auc"] is not None:
            curve = roc_curve(y[known, k].astype(int), p_c[known, k])
            curves.append((f"{name} (AUROC {d['auroc']['calibrated']['auc']:.3f})", curve.fpr, curve.sensitivity))
        images[f"reliability_{k}"] = reliability_plot(out / f"reliability_{k}.png", d["calibration"]["uncalibrated"]["reliability"],
                                                      d["calibration"]["calibrated"]["reliability"], form=f"'{name}' probability")
    if curves:
        images["roc"] = roc_plot(out / "roc.png", curves, title="ROC per finding")
    if history:
        images["training"] = training_plot(out / "training.png", history)
    if site_shift:
        images["site_shift"] = site_shift_plot(out / "site_shift.png", site_shift)
        summary["site_shift"] = {k: {"label": v["label"], "proxy_a_distance": dict(v["proxy_a_distance"])} for k, v in site_shift.items()}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, allow_nan=False), encoding="utf-8")
    (out / "report.html").write_text(render_multilabel_page(summary, images, title=title), encoding="utf-8")
    return summary
