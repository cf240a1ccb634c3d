"""``write_report``: metrics.json, the PNG figures and report.html in one folder."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medtl.metrics import OperatingPoint
from medtl.report.page import render_page
from medtl.report.plots import draw_all
from medtl.report.summary import summarize


def write_report(
    out_dir: str | Path,
    *,
    y_true,
    probs_uncalibrated,
    probs_calibrated,
    class_names: Sequence[str],
    positive_index: int | None,
    operating_point: OperatingPoint | None,
    groups: Mapping[str, Sequence[str]] | None,
    info: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]] | None = None,
    title: str = "medtl report",
    n_resamples: int = 2000,
    seed: int = 0,
    site_shift: Mapping[str, Mapping[str, Any]] | None = None,
    prevalence: float | None = None,
) -> dict:
    """Write ``metrics.json``, ``roc.png``, ``reliability.png``, ``decision_curve.png`` (binary),
    ``confusion.png``, ``training.png`` (with ``history``) and ``report.html`` to ``out_dir``.

    Arguments as :func:`medtl.report.summarize`; ``history`` is the per-epoch training log;
    ``site_shift`` maps ``before``/``after`` to :func:`medtl.adapt.site_shift` results, each with a
    ``label`` (adds ``site_shift.png`` and a section; the PADs go into ``metrics.json``).
    Returns the metrics dict (also in ``metrics.json``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(
        y_true=y_true,
        probs_uncalibrated=probs_uncalibrated,
        probs_calibrated=probs_calibrated,
        class_names=class_names,
        positive_index=positive_index,
        operating_point=operating_point,
        groups=groups,
        info=info,
        title=title,
        n_resamples=n_resamples,
        seed=seed,
        prevalence=prevalence,
    )
    images = draw_all(out, summary, np.asarray(y_true), np.asarray(probs_calibrated, dtype=np.float64), positive_index,
                      history, site_shift)
    if site_shift:
        summary["site_shift"] = {k: {"label": v["label"], "proxy_a_distance": dict(v["proxy_a_distance"])} for k, v in site_shift.items()}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, allow_nan=False), encoding="utf-8")
    (out / "report.html").write_text(render_page(summary, images, title=title), encoding="utf-8")
    return summary

