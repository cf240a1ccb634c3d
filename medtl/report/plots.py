"""The report's PNG figures, drawn with matplotlib's object API on the Agg canvas (no pyplot,
no display, no global backend change).

Each ``*_plot`` function writes one PNG and returns its path; :func:`draw_all` draws every
figure a summary supports.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from medtl.metrics import roc_curve

DPI = 110
BEFORE, AFTER = "#d55e00", "#0072b2"  # colour-blind-safe (Okabe-Ito)
MODEL = AFTER


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, format="png", bbox_inches="tight", pad_inches=0.08)  # nothing drawn is cut off
    return path


def _ci_text(auroc: dict) -> str:
    if auroc.get("auc") is None:
        return "AUROC not estimable"
    ci = auroc.get("ci")
    return f"AUROC {auroc['auc']:.3f}" + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else "")


def roc_plot(
    path: Path,
    curves: Sequence[tuple[str, np.ndarray, np.ndarray]],
    *,
    band: dict | None = None,
    point: tuple[float, float, str] | None = None,
    title: str = "ROC curve",
) -> Path:
    """ROC curves ``(label, fpr, sensitivity)``, an optional CI band (:func:`roc_band` output)
    and an optional operating point ``(fpr, sensitivity, label)``."""
    fig = Figure(figsize=(5.6, 5.2))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1, label="chance")
    if band is not None:
        ax.fill_between(band["fpr"], band["sensitivity_low"], band["sensitivity_high"], color=MODEL, alpha=0.18,
                        lw=0, label=f"{band['conf_level']:.0%} bootstrap band")
    for label, fpr, tpr in curves:
        ax.plot(fpr, tpr, lw=1.8, label=label)
    if point is not None:
        ax.plot([point[0]], [point[1]], "o", color="black", ms=7, label=point[2])
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity (false-positive rate)",
           ylabel="Sensitivity (true-positive rate)", title=title, aspect="equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def reliability_plot(path: Path, before: dict, after: dict, *, form: str) -> Path:
    """Reliability diagram (mean predicted vs observed, per equal-width bin) of the probabilities
    before and after recalibration, with the bin counts below."""
    fig = Figure(figsize=(5.6, 6.6))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.2]})
    top.plot([0, 1], [0, 1], ls=":", color="grey", lw=1, label="perfect calibration")
    edges = np.array([r[0] for r in after["bin_ranges"]] + [after["bin_ranges"][-1][1]])
    width = np.diff(edges)
    for curve, colour, name, shift in ((before, BEFORE, "before recalibration", 0.0), (after, AFTER, "after recalibration", 0.5)):
        pts = [(c, o) for c, o in zip(curve["mean_confidence"], curve["observed"]) if c is not None]
        top.plot([c for c, _ in pts], [o for _, o in pts], "o-", color=colour, ms=4, lw=1.5, label=name)
        bottom.bar(edges[:-1] + shift * width, curve["counts"], width=width / 2, align="edge", color=colour, alpha=0.8, label=name)
    top.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), ylabel="Observed frequency", title=f"Reliability ({form})")
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize=8)
    bottom.set(xlabel=f"Mean predicted probability ({len(width)} equal-width bins)", ylabel="Cases per bin")
    bottom.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def decision_curve_plot(path: Path, curve: dict, *, positive: str, threshold: float | None = None) -> Path:
    """Net benefit of the model against treat-all and treat-none over threshold probabilities."""
    fig = Figure(figsize=(5.6, 4.4))
    ax = fig.subplots()
    pts = np.asarray(curve["thresholds"])
    ax.plot(pts, curve["net_benefit"], color=MODEL, lw=1.8, label="model (calibrated)")
    ax.plot(pts, curve["treat_all"], color="grey", lw=1.2, label=f"treat all as '{positive}'")
    ax.plot(pts, curve["treat_none"], color="black", lw=1.2, ls="--", label="treat none")
    if threshold is not None:
        ax.axvline(threshold, color="black", lw=0.8, ls=":", label=f"operating threshold {threshold:.3f}")
    top = max(curve["prevalence"], np.max(curve["net_benefit"]))
    ax.set(xlim=(0, 1), ylim=(-0.05 * max(top, 0.02), 1.1 * max(top, 0.02)),
           xlabel=f"Threshold probability of '{positive}'", ylabel="Net benefit", title="Decision curve")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def confusion_plot(path: Path, confusion: dict, *, title: str) -> Path:
    """Counts of actual (rows) by predicted (columns) class, with row percentages."""
    matrix = np.asarray(confusion["matrix"])
    labels = confusion["labels"]
    k = len(labels)
    fig = Figure(figsize=(1.6 + 1.1 * k, 1.3 + 1.0 * k))
    ax = fig.subplots()
    row_share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    ax.imshow(row_share, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{matrix[i, j]}\n({row_share[i, j]:.0%})", ha="center", va="center",
                    color="white" if row_share[i, j] > 0.6 else "black", fontsize=9)
    ax.set_xticks(range(k), labels, rotation=30 if k > 2 else 0, ha="right" if k > 2 else "center")
    ax.set_yticks(range(k), labels)
    width = fig.get_figwidth()
    ax.set(xlabel="Predicted", ylabel="Actual")
    ax.set_title(textwrap.fill(title, width=int(8 * width)), fontsize=10)  # about 8 characters per inch: never cut off
    return _save(fig, path)


def training_plot(path: Path, history: Sequence[dict]) -> Path:
    """Training and validation loss, and validation AUROC, per epoch."""
    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(8.4, 3.6))
    left, right = fig.subplots(1, 2)
    for key, name in (("train_loss", "training loss"), ("val_loss", "validation loss")):
        if all(key in row for row in history):
            left.plot(epochs, [row[key] for row in history], "o-", ms=3, label=name)
    left.set(xlabel="Epoch", ylabel="Loss", title="Loss")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    if all("val_auroc" in row for row in history):
        right.plot(epochs, [row["val_auroc"] for row in history], "o-", ms=3, color=MODEL)
    right.set(xlabel="Epoch", ylabel="AUROC", title="Validation AUROC")
    right.grid(alpha=0.3)
    return _save(fig, path)


def site_shift_plot(path: Path, shift: dict) -> Path:
    """Features in 2D (first two principal components), coloured by site: before and after."""
    stages = [stage for stage in ("before", "after") if stage in shift]
    fig = Figure(figsize=(4.2 * len(stages), 3.9))
    axes = np.atleast_1d(fig.subplots(1, len(stages)))
    for ax, stage in zip(axes, stages):
        points, sites = np.asarray(shift[stage]["embedding"]), np.asarray(shift[stage]["sites"])
        for site in sorted(set(sites)):
            ax.scatter(*points[sites == site].T, s=9, alpha=0.7, label=f"site {site}")
        pad = ", ".join(f"{pair}: {value:.2f}" for pair, value in shift[stage]["proxy_a_distance"].items())
        ax.set(title=f"{shift[stage]['label']}\nproxy A-distance {pad or 'n/a'}", xlabel="PC 1", ylabel="PC 2")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def draw_all(out_dir: Path, summary: dict, y_true: np.ndarray, probs_calibrated: np.ndarray,
             positive_index: int | None, history: Sequence[dict] | None, site_shift: dict | None = None) -> dict[str, Path]:
    """Every figure ``summary`` supports, as ``{name: path}`` (names: roc, reliability,
    decision_curve, confusion, training, site_shift)."""
    cal = summary["calibrated"]
    names = summary["class_names"]
    paths: dict[str, Path] = {}
    if positive_index is not None:
        y_bin = (y_true == positive_index).astype(int)
        if 0 < y_bin.sum() < len(y_bin):
            curve = roc_curve(y_bin, probs_calibrated[:, positive_index])
            op = summary["operating_point"]
            tm = cal.get("threshold_metrics")
            point = None
            if tm is not None and tm["sensitivity"]["value"] is not None and tm["specificity"]["value"] is not None:
                point = (1 - tm["specificity"]["value"], tm["sensitivity"]["value"], f"operating point (threshold {op['threshold']:.3f})")
            paths["roc"] = roc_plot(out_dir / "roc.png", [(_ci_text(cal["auroc"]), curve.fpr, curve.sensitivity)],
                                    band=cal.get("roc_band"), point=point, title=f"ROC: '{names[positive_index]}' as the positive class")
    else:
        per_class = cal["auroc"].get("per_class") or {}
        curves = []
        for k, name in enumerate(names):
            is_k = (y_true == k).astype(int)
            if 0 < is_k.sum() < len(is_k):
                auc = per_class.get(name, {}).get("auc")
                curve = roc_curve(is_k, probs_calibrated[:, k])
                curves.append((f"{name} vs rest" + (f" (AUROC {auc:.3f})" if auc is not None else ""), curve.fpr, curve.sensitivity))
        if curves:
            paths["roc"] = roc_plot(out_dir / "roc.png", curves, title="ROC: one vs rest per class")
    paths["reliability"] = reliability_plot(out_dir / "reliability.png", summary["uncalibrated"]["calibration"]["reliability"],
                                            cal["calibration"]["reliability"], form=cal["calibration"]["form"])
    if summary.get("decision_curve"):
        threshold = summary["operating_point"]["threshold"] if summary["operating_point"] else None
        paths["decision_curve"] = decision_curve_plot(out_dir / "decision_curve.png", summary["decision_curve"],
                                                      positive=names[positive_index], threshold=threshold)
    if cal.get("confusion_matrix"):
        where = "at the operating point" if positive_index is not None else "argmax"
        paths["confusion"] = confusion_plot(out_dir / "confusion.png", cal["confusion_matrix"], title=f"Confusion matrix ({where})")
    if history:
        paths["training"] = training_plot(out_dir / "training.png", history)
    if site_shift:
        paths["site_shift"] = site_shift_plot(out_dir / "site_shift.png", site_shift)
    return paths
