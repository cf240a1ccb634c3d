"""The multi-task report: one full report per head (``report/<head>/``, each on the scans where that
head is known, in its task's layout) and an index page with a row per head."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medtl.report.jsonable import jsonable
from medtl.report.page import CSS, _e, _num, _table


def _auroc_cell(block: Mapping[str, Any] | None) -> str:
    """AUROC (binary), macro AUROC (multiclass, multilabel) with its CI, as text."""
    if not block:
        return "n/a"
    value = block.get("auc", block.get("macro"))
    ci = block.get("ci")
    if value is None:
        return "n/a"
    return f"{_num(value)} [{_num(ci[0])}, {_num(ci[1])}]" if ci else _num(value)


def head_row(name: str, metrics: Mapping[str, Any]) -> list[str]:
    """A head's line of the index: scans, AUROC before and after calibration, and where its report is."""
    auroc = {when: _auroc_cell((metrics.get(when) or {}).get("auroc")) for when in ("uncalibrated", "calibrated")}
    return [name, str(metrics.get("n", "")), auroc["uncalibrated"], auroc["calibrated"], f'<a href="{_e(name)}/report.html">{_e(name)}/</a>']


def write_head_index(out_dir: str | Path, heads: Mapping[str, Mapping[str, Any]], *, title: str,
                     weights: Mapping[str, float], info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``metrics.json`` ({"task": "multitask", "info": the run, "heads": {head: its report's metrics}}) and an
    index ``report.html`` beside the heads' own reports; returns the metrics."""
    out = Path(out_dir)
    metrics = {"title": title, "task": "multitask", "weights": dict(weights), "info": dict(info or {}), "heads": dict(heads)}
    (out / "metrics.json").write_text(json.dumps(jsonable(metrics), indent=2))
    rows = [[_e(c) if i < 4 else c for i, c in enumerate(head_row(name, m))] for name, m in heads.items()]
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{_e(title)}</h1><p class='sub'>One backbone, {len(heads)} heads. Each head is scored on the scans where it is "
            "known, with its own calibration and decision rule; its full report is in its folder.</p>"
            + _table(["head", "scans", "AUROC (uncalibrated)", "AUROC (calibrated)", "report"], rows)
            + "</body></html>")
    (out / "report.html").write_text(page, encoding="utf-8")
    return metrics
