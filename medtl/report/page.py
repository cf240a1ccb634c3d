"""``report.html``: one self-contained page (inline CSS, PNGs as base64 data URIs, no external
resources) written for clinical readers.  Every piece of text goes through ``html.escape``.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

MISSING = '<span class="missing">not recorded</span>'
UNSET = '<span class="unset">not set</span>'

CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1040px;margin:2em auto;padding:0 1em;color:#1b1b1b;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #0072b2;padding-bottom:.2em;margin-top:2em}
.sub{color:#555}.cards{display:flex;flex-wrap:wrap;gap:.8em;margin:1em 0}
.card{flex:1 1 220px;border:1px solid #cfd8e3;border-radius:8px;padding:.7em 1em;background:#f5f9fc}
.card .label{font-size:.85em;color:#555}.card .value{font-size:1.5em;font-weight:600}.card .ci{font-size:.85em;color:#333}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}th,td{border:1px solid #d0d7de;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#eef3f8}td.num{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto}.figs{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}.figs figure{margin:0;flex:1 1 440px}
figcaption{font-size:.85em;color:#444}.missing{color:#a33;font-style:italic}.unset{color:#777;font-style:italic}.note{font-size:.88em;color:#444}
ul.kv{margin:0;padding-left:1.1em}pre{background:#f6f8fa;padding:1em;overflow-x:auto;font-size:.8em}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _ci(ci: Sequence[float] | None, fmt=_num) -> str:
    return "n/a" if not ci else f"{fmt(ci[0])} to {fmt(ci[1])}"


def _estimate(est: Mapping | None, fmt=_num) -> str:
    """``value (95% CI low to high)`` of an Estimate dict, escaped."""
    if not est or est.get("value") is None:
        return "n/a"
    return _e(f"{fmt(est['value'])} (95% CI {_ci(est.get('ci'), fmt)})")


def _auroc(auroc: Mapping | None) -> str:
    if not auroc or auroc.get("auc") is None:
        return "not estimable (one class only)"
    return _e(f"{auroc['auc']:.3f} (95% CI {_ci(auroc.get('ci'))})")


def _value(value: Any, *, nested: bool = False) -> str:
    """Any JSON value as escaped HTML: nested key/value lists for dicts.  An empty checklist item
    is "not recorded" (red: the tool should have it); an empty setting inside one is an optional
    setting left unset ("not set", grey)."""
    if value is None or value == "" or value == {} or value == []:
        return UNSET if nested else MISSING
    if isinstance(value, Mapping):
        return '<ul class="kv">' + "".join(f"<li><b>{_e(k)}</b>: {_value(v, nested=True)}</li>" for k, v in value.items()) + "</ul>"
    if isinstance(value, list):
        if all(not isinstance(v, (Mapping, list)) for v in value):
            return _e(", ".join("null" if v is None else str(v) for v in value))
        return "<ol>" + "".join(f"<li>{_value(v, nested=True)}</li>" for v in value) + "</ol>"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return _e(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[int] = ()) -> str:
    """A table of already-escaped cells; the columns ``numeric`` are right-aligned."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(images: Mapping[str, Path], name: str, caption: str) -> str:
    if name not in images:
        return ""
    data = base64.b64encode(Path(images[name]).read_bytes()).decode("ascii")
    return (f'<figure><img alt="{_e(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _card(label: str, value: str, ci: str = "") -> str:
    return f'<div class="card"><div class="label">{_e(label)}</div><div class="value">{value}</div><div class="ci">{ci}</div></div>'


def _headline(s: Mapping) -> str:
    cal, unc = s["calibrated"], s["uncalibrated"]
    auroc = cal["auroc"]
    auc_value = "n/a" if auroc.get("auc") is None else _e(f"{auroc['auc']:.3f}")
    auc_label = "AUROC" if s["positive_class"] else "Macro one-vs-rest AUROC"
    cards = [_card(auc_label, auc_value, _e(f"95% CI {_ci(auroc.get('ci'))}") if auroc.get("auc") is not None else "not estimable")]
    tm = cal.get("threshold_metrics")
    if tm:
        for key, label in (("sensitivity", "Sensitivity"), ("specificity", "Specificity")):
            est = tm[key]
            cards.append(_card(f"{label} at the operating point", _e(_pct(est["value"])),
                               _e(f"95% CI {_ci(est['ci'], _pct)} ({est['numerator']}/{est['denominator']})")))
    elif "accuracy" in cal:
        est = cal["accuracy"]
        cards.append(_card("Accuracy (argmax)", _e(_pct(est["value"])), _e(f"95% CI {_ci(est['ci'], _pct)}")))
    ece_before, ece_after = unc["calibration"]["ece"]["value"], cal["calibration"]["ece"]["value"]
    cards.append(_card("ECE before \u2192 after recalibration", _e(f"{_num(ece_before)} \u2192 {_num(ece_after)}"),
                       _e(f"{len(s['conventions']['ece_bin_edges']) - 1} equal-width bins; lower is better")))
    conv = s["conventions"]
    if s["positive_class"]:
        rule = (f"Positive class: '{s['positive_class']}'. " + conv["decision_rule"]
                + (f"; threshold {conv['threshold']:.4f}." if conv["threshold"] is not None else "; no operating point recorded."))
    else:
        rule = f"Multi-class ({len(s['class_names'])} classes): {conv['decision_rule']}."
    return f'<div class="cards">{"".join(cards)}</div><p class="note">{_e(rule)}</p>'


def _data_section(s: Mapping) -> str:
    info = s["info"]
    counts = ", ".join(f"{name}: {n}" for name, n in s["class_counts"].items())
    return (
        "<h2>Evaluation data</h2>"
        f"<p><b>Evaluated on:</b> {_value(info.get('evaluated_on'))}</p>"
        f"<p><b>Cases:</b> {_e(s['n'])} ({_e(counts)})</p>"
        + (f"<p><b>Excluded:</b> {_e(info['excluded'])} scans that could not be read or gave no finite output; "
           "errors.csv beside this report lists them with the reasons.</p>" if info.get("excluded") else "")
        + '<p class="note">No patient identifiers are included in this report.</p>'
    )


THRESHOLD_ROWS = (
    ("sensitivity", "Sensitivity", "TP / (TP + FN)", _pct),
    ("specificity", "Specificity", "TN / (TN + FP)", _pct),
    ("ppv", "Positive predictive value (PPV)", "TP / (TP + FP), at this sample's prevalence", _pct),
    ("npv", "Negative predictive value (NPV)", "TN / (TN + FN), at this sample's prevalence", _pct),
    ("accuracy", "Accuracy", "(TP + TN) / N", _pct),
    ("f1", "F1 score", "2 TP / (2 TP + FP + FN)", _num),
    ("lr_positive", "Positive likelihood ratio (LR+)", "sensitivity / (1 - specificity)", _num),
    ("lr_negative", "Negative likelihood ratio (LR-)", "(1 - sensitivity) / specificity", _num),
)


def _prevalence_rows(prevalence: float) -> tuple:
    """PPV and NPV at the stated deployment prevalence (report.prevalence)."""
    at = f"at the stated prevalence {_pct(prevalence)}"
    return (
        ("ppv_at_prevalence", f"PPV {at}", "p Se / (p Se + (1 - p)(1 - Sp))", _pct),
        ("npv_at_prevalence", f"NPV {at}", "(1 - p) Sp / ((1 - p) Sp + p (1 - Se))", _pct),
    )


def _threshold_section(s: Mapping, images: Mapping[str, Path]) -> str:
    cal = s["calibrated"]
    if s["positive_class"]:
        tm = cal.get("threshold_metrics")
        if not tm:
            return "<h2>Operating point</h2><p>No operating point was recorded: decision metrics are not reported.</p>"
        op = s["operating_point"] or {}
        rows = []
        for key, label, formula, fmt in THRESHOLD_ROWS + (_prevalence_rows(tm["prevalence"]) if tm.get("prevalence") else ()):
            est = tm[key]
            counts = f"{est['numerator']}/{est['denominator']}" if est.get("denominator") else ""
            rows.append([_e(label), _e(fmt(est["value"])), _e(_ci(est["ci"], fmt)), _e(counts), _e(formula), _e(est["method"])])
        table = _table(["Metric", "Estimate", "95% CI", "Count", "Definition", "CI method"], rows, numeric=(1, 2, 3))
        conv = s["conventions"]
        lead = (f"<p>{_e(conv['decision_rule'])}; threshold <b>{_e(_num(tm['threshold'], 4))}</b>. "
                f"Chosen by: {_e(op.get('description') or op.get('method') or 'not recorded')}.</p>"
                f"<p>TP {_e(tm['tp'])}, FP {_e(tm['fp'])}, TN {_e(tm['tn'])}, FN {_e(tm['fn'])}.</p>")
        confusion = _figure(images, "confusion", "Confusion matrix at the operating point (row percentages)")
        return "<h2>Operating point</h2>" + lead + table + f'<div class="figs">{confusion}</div>'
    rows = [
        [_e(name), _e(d["n"]), _auroc(cal["auroc"].get("per_class", {}).get(name)), _estimate(d["sensitivity"], _pct), _estimate(d["ppv"], _pct)]
        for name, d in cal["per_class_decisions"].items()
    ]
    return (
        "<h2>Per-class performance</h2>"
        f"<p>Accuracy of the argmax decision: {_estimate(cal['accuracy'], _pct)} (Wilson CI).</p>"
        + _table(["Class", "Cases", "One-vs-rest AUROC (DeLong CI)", "Sensitivity (recall)", "PPV (precision)"], rows, numeric=(1, 2, 3, 4))
        + f'<div class="figs">{_figure(images, "confusion", "Confusion matrix of the argmax decision (row percentages)")}</div>'
    )


CALIBRATION_ROWS = (
    ("ece", "Expected calibration error (ECE)", "0"),
    ("adaptive_ece", "Adaptive ECE (equal-count bins)", "0"),
    ("mce", "Maximum calibration error (MCE)", "0"),
    ("brier", "Brier score", "0"),
)


def _calibration_section(s: Mapping, images: Mapping[str, Path]) -> str:
    before, after = s["uncalibrated"]["calibration"], s["calibrated"]["calibration"]
    rows = [[_e(label), _e(ideal), _estimate(before[key]), _estimate(after[key])] for key, label, ideal in CALIBRATION_ROWS]
    for key, label, ideal in (("slope", "Calibration slope", "1"), ("intercept", "Calibration-in-the-large (intercept)", "0")):
        if before.get("slope") or after.get("slope"):
            rows.append([_e(label), _e(ideal), *(_estimate(c["slope"][key]) if c.get("slope") else "not estimable" for c in (before, after))])
    conv = s["conventions"]
    edges = ", ".join(f"{e:.3f}" for e in conv["ece_bin_edges"])
    return (
        "<h2>Calibration before and after recalibration</h2>"
        f'<div class="figs">{_figure(images, "reliability", "Reliability diagram: before and after recalibration, cases per bin below")}</div>'
        + _table(["Metric", "Ideal", "Before (95% CI)", "After (95% CI)"], rows, numeric=(1, 2, 3))
        + f'<p class="note">Form: {_e(conv["calibration_form"])}. ECE bins: {_e(conv["ece_bins"])}; edges {_e(edges)}. '
        f'Adaptive ECE: {_e(conv["adaptive_ece_bins"])}. Brier: {_e(conv["brier"])}. '
        f'CIs: {_e(conv["ci_methods"]["calibration"])}'
        + (f'; slope and intercept: {_e(conv["ci_methods"]["calibration_slope"])}' if s["positive_class"] else "")
        + ".</p>"
    )


def _subgroup_section(s: Mapping) -> str:
    if not s["subgroups"]:
        return "<h2>Subgroups</h2><p>No subgroup column (e.g. site) was given.</p>"
    parts = ["<h2>Subgroups</h2>",
             f'<p class="note">{_e(s["conventions"]["subgroups"])} ECE with {_e(s["conventions"]["ece_bins"])}.</p>']
    binary = bool(s["positive_class"])
    for column, groups in s["subgroups"].items():
        if binary:
            header = ["Group", "Cases", f"Events ('{s['positive_class']}')", "AUROC (95% CI)", "Sensitivity (95% CI)",
                      "Specificity (95% CI)", "ECE", "Brier"]
            rows = [[_e(g), _e(d["n"]), _e(d["events"]), _auroc(d["auroc"]), _estimate(d.get("sensitivity"), _pct),
                     _estimate(d.get("specificity"), _pct), _e(_num(d["ece"])), _e(_num(d["brier"]))] for g, d in groups.items()]
        else:
            header = ["Group", "Cases", "Cases per class", "Macro AUROC (95% CI)", "Accuracy (95% CI)", "ECE (top-label)", "Brier"]
            rows = [[_e(g), _e(d["n"]), _e(", ".join(f"{k}: {v}" for k, v in d["events"].items())), _auroc(d["auroc"]),
                     _estimate(d["accuracy"], _pct), _e(_num(d["ece"])), _e(_num(d["brier"]))] for g, d in groups.items()]
        parts.append(f"<h3>By {_e(column)}</h3>" + _table(header, rows, numeric=range(1, len(header))))
    return "".join(parts)


def _site_shift_section(s: Mapping, images: Mapping[str, Path]) -> str:
    shift = s.get("site_shift")
    if not shift:
        return ""
    pairs = sorted({pair for stage in shift.values() for pair in stage["proxy_a_distance"]})
    rows = [[_e(pair)] + [_e(_num(shift[k]["proxy_a_distance"].get(pair))) if k in shift else "" for k in ("before", "after")]
            for pair in pairs]
    labels = [shift[k]["label"] if k in shift else k for k in ("before", "after")]
    return (
        "<h2>Site shift</h2>"
        '<p class="note">Proxy A-distance = 2 (1 - 2 err), err the cross-validated error of a linear classifier telling '
        "two sites apart from the backbone's features: 0 = indistinguishable, 2 = fully separable. Computed on the "
        "evaluated scans.</p>"
        + _table(["Sites", *labels], rows, numeric=(1, 2))
        + f'<div class="figs">{_figure(images, "site_shift", "Backbone features in 2D (PCA), coloured by site")}</div>'
    )


def _partitions(partitions: Any) -> str:
    """Counts per partition as a table; other entries (shared patients, disjointness) as values."""
    if not isinstance(partitions, Mapping):
        return _value(partitions)
    splits = {k: v for k, v in partitions.items() if isinstance(v, Mapping) and "per_class" in v}
    if not splits:
        return _value(partitions)
    classes = list(dict.fromkeys(c for v in splits.values() for c in v["per_class"]))
    rows = [[_e(name), _e(v.get("scans", "")), _e(v.get("patients", "")), *(_e(v["per_class"].get(c, 0)) for c in classes)]
            for name, v in splits.items()]
    return _table(["Partition", "Scans", "Patients", *classes], rows, numeric=range(1, 3 + len(classes)))


def _lookup(info: Mapping, *paths: tuple[str, ...]) -> Any:
    """The first value found at one of the key ``paths`` of ``info``."""
    for path in paths:
        value: Any = info
        for key in path:
            value = value.get(key) if isinstance(value, Mapping) else None
        if value not in (None, "", {}, []):
            return value
    return None


def _checklist(s: Mapping) -> str:
    info = s["info"]
    partitions = _lookup(info, ("partitions",), ("training", "partitions"))
    disjoint = None
    if isinstance(partitions, Mapping) and "patient_level_disjoint" in partitions:
        disjoint = {"patient_level_disjoint": partitions["patient_level_disjoint"],
                    "patients_shared_between_partitions": partitions.get("patients_shared_between_partitions")}
    op = _lookup(info, ("operating_point",)) or s["operating_point"]
    if isinstance(op, Mapping):
        op = {k: op[k] for k in ("method", "target", "threshold", "description", "rule") if op.get(k) is not None}
    training = _lookup(info, ("training",))
    selection = _lookup(info, ("model_selection",))
    if isinstance(training, Mapping):
        training = {k: v for k, v in training.items() if k not in ("partitions", "recipe", "ensemble")}  # own sections
        if selection is None and training.get("best_epoch") is not None:
            selection = (f"epoch {training['best_epoch']} of {training.get('epochs_run', '?')}, "
                         f"highest validation AUROC ({_num(training.get('best_val_auroc'), 4)})")
    conv = s["conventions"]
    subgroups = {col: {g: f"{d['n']} cases" for g, d in groups.items()} for col, groups in s["subgroups"].items()}
    items = [
        ("Software and versions (this report)", _value(_lookup(info, ("software",)))),
        ("Software versions used to train the model", _value(_lookup(info, ("bundle_versions",), ("software",)))),
        ("Random seed", _value(_lookup(info, ("seed",), ("hyperparameters", "seed")))),
        ("Model architecture (backbone)", _value(_lookup(info, ("backbone",)))),
        ("Initial (pretrained) weights", _value(_lookup(info, ("initial_weights",)))),
        ("Transfer learning / fine-tuning method", _value(_lookup(info, ("transfer_method",)))),
        ("Preprocessing", _value(_lookup(info, ("preprocessing",)))),
        ("Hyperparameters", _value(_lookup(info, ("hyperparameters",)))),
        ("Data partitions: disjoint at patient level", _value(disjoint)),
        ("Counts and events per partition", _partitions(partitions) if partitions else MISSING),
        ("Selection of the final model", _value(selection)),
        ("Training run", _value(training)),
        ("Recalibration: method and data", _value(_lookup(info, ("recalibration",)))),
        ("Decision threshold and how it was chosen", _value(op)),
        ("Evaluation data (internal or external)", _value(_lookup(info, ("evaluated_on",)))),
        ("Subgroups analysed", _value(subgroups)),
        ("Uncertainty (confidence intervals)", _value({**conv["ci_methods"], "bootstrap": conv["bootstrap"], "level": conv["conf_level"]})),
    ]
    rows = [[_e(label), value] for label, value in items]
    return (
        "<h2>Reporting checklist (TRIPOD+AI / CLAIM)</h2>"
        '<p class="note">What the tool recorded about this model and evaluation. Items it cannot know (clinical setting, '
        "eligibility, reference standard, missing-data handling beyond unreadable scans) are for the authors to report.</p>"
        + _table(["Item", "Recorded"], rows)
    )


def _recipe_section(s: Mapping) -> str:
    """The dataset fingerprint and every training value with who chose it and why (``recipe: auto``)."""
    recipe = _lookup(s["info"], ("training", "recipe"))
    if not recipe:
        return ""
    fp = recipe["fingerprint"]
    facts = (f"{fp['scans']} labelled scans of {fp['patients']} patients; classes {fp['per_class']}; {fp['spatial_dims']}D, "
             f"median size {fp['median_size']}, {fp['channels']} channel(s){' (colour)' if fp['colour'] else ''}, "
             f"modality {fp['modality']}; {fp['sampled']} scans sampled for geometry and intensity.")
    rows = [[_e(c["key"]), _e(c["value"]), _e("you" if c["source"] == "user" else "rule"), _e(c["reason"])] for c in recipe["choices"]]
    return ("<h2>Recipe</h2>"
            f"<p><b>Dataset fingerprint:</b> {_e(facts)}</p>"
            '<p class="note">recipe: auto fills every training value the config leaves unset by fixed rules (docs/recipe.md); '
            "a value set in the config always wins.</p>" + _table(["Setting", "Value", "Chosen by", "Why"], rows))


def _ensemble_section(s: Mapping) -> str:
    """Each ensemble member's data and validation AUROC, and their spread."""
    ensemble = _lookup(s["info"], ("training", "ensemble"))
    if not ensemble:
        return ""
    rows = [[_e(m["name"]), _e(m["seed"]), _e(m["train_scans"]), _e(m["val_scans"]), _e(f"{m['best_epoch']} of {m['epochs_run']}"),
             _e(_num(m["val_auroc"], 4))] for m in ensemble["members"]]
    low, high = ensemble["val_auroc_range"]
    return (f"<h2>Ensemble: {_e(ensemble['kind'])}</h2>"
            f"<p>{len(rows)} members; the bundle averages their probabilities. Member validation AUROC "
            f"{_e(_num(ensemble['val_auroc_mean'], 4))} &plusmn; {_e(_num(ensemble['val_auroc_sd'], 4))} (range "
            f"{_e(_num(low, 4))}&ndash;{_e(_num(high, 4))}).</p>"
            + _table(["Member", "Seed", "Training scans", "Validation scans", "Kept epoch", "Validation AUROC"], rows, numeric=(1, 2, 3, 5)))


def render_page(summary: Mapping, images: Mapping[str, Path], *, title: str) -> str:
    """The whole report page for ``summary`` (from :func:`medtl.report.summarize`) and the PNG
    files ``images`` (from :func:`medtl.report.plots.draw_all`)."""
    s = summary
    positive = s["positive_class"]
    roc_caption = (f"ROC curve for '{positive}' (calibrated probabilities) with a pointwise 95% bootstrap band"
                   if positive else "One-vs-rest ROC curve per class (calibrated probabilities)")
    figures = [
        _figure(images, "roc", roc_caption),
        _figure(images, "decision_curve", "Decision curve: net benefit of acting on the model vs treating all or none"),
    ]
    body = [
        f"<h1>{_e(title)}</h1>",
        f'<p class="sub">{_e(s["n"])} cases; classes: {_e(", ".join(s["class_names"]))}.</p>',
        _headline(s),
        _data_section(s),
        "<h2>Discrimination</h2>",
        f"<p>AUROC: {_auroc(s['calibrated']['auroc'])} after recalibration; {_auroc(s['uncalibrated']['auroc'])} before. "
        f"CI: {_e(s['conventions']['ci_methods']['auroc'])}.</p>",
        f'<div class="figs">{"".join(figures)}</div>',
        _threshold_section(s, images),
        _calibration_section(s, images),
        _subgroup_section(s),
        _site_shift_section(s, images),
    ]
    if "training" in images:
        body += ["<h2>Training</h2>", f'<div class="figs">{_figure(images, "training", "Loss and validation AUROC per epoch")}</div>']
    body += [_ensemble_section(s), _recipe_section(s)]
    body += [
        _checklist(s),
        "<h2>All recorded run information</h2><details><summary>Show as JSON</summary>"
        f"<pre>{_e(json.dumps(s['info'], indent=2, sort_keys=True))}</pre></details>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{_e(title)}</title>'
        f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n"
    )
