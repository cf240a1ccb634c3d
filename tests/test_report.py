"""The report: metrics.json against independent sklearn figures, the figures, and a safe,
self-contained report.html."""

import json
import re

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from medtl.metrics import choose_operating_point
from medtl.metrics.bootstrap import resample_indices
from medtl.report import roc_band, summarize, write_report
from medtl.report.jsonable import jsonable

MALICIOUS = '<script>alert("x")</script>'


def _binary_data(n=300, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    z = rng.normal(size=n) + 1.6 * y - 0.8
    p_unc = 1 / (1 + np.exp(-2.5 * z))  # over-confident
    p_cal = 1 / (1 + np.exp(-1.6 * z))
    sites = np.where(rng.random(n) < 0.5, "A", "B")
    return y, np.c_[1 - p_unc, p_unc], np.c_[1 - p_cal, p_cal], sites


def _multiclass_data(n=300, seed=1):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), y] += 1.5
    soft = lambda x: np.exp(x) / np.exp(x).sum(axis=1, keepdims=True)  # noqa: E731
    return y, soft(2 * logits), soft(logits)


INFO = {
    "title": "test",
    "evaluated_on": f"held-out test split {MALICIOUS}",
    "software": {"python": "3.11", "torch": "2.4.0"},
    "seed": 7,
    "initial_weights": "imagenet",
    "backbone": "resnet18",
    "transfer_method": "full_finetune",
    "partitions": {
        "train": {"scans": 200, "patients": 180, "per_class": {"normal": 100, "opacity": 100}},
        "val": {"scans": 60, "patients": 60, "per_class": {"normal": 30, "opacity": 30}},
        "patients_shared_between_partitions": {"train/val": 0},
        "patient_level_disjoint": True,
    },
    "recalibration": "temperature scaling fitted on the validation split",
}
HISTORY = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.1 / e, "val_auroc": 0.6 + 0.05 * e, "lr": 1e-3, "seconds": 1.0} for e in range(1, 6)]


@pytest.fixture(scope="module")
def binary_report(tmp_path_factory):
    y, p_unc, p_cal, sites = _binary_data()
    op = choose_operating_point(y, p_cal[:, 1], "youden")
    out = tmp_path_factory.mktemp("binary") / "report"
    metrics = write_report(
        out, y_true=y, probs_uncalibrated=p_unc, probs_calibrated=p_cal, class_names=["normal", "opacity"],
        positive_index=1, operating_point=op, groups={"site": list(sites)}, info=INFO, history=HISTORY,
        title=f"Report {MALICIOUS}",
    )
    return out, metrics, (y, p_unc, p_cal, sites, op)


def test_binary_files_and_keys(binary_report):
    out, metrics, _ = binary_report
    for name in ("report.html", "metrics.json", "roc.png", "reliability.png", "decision_curve.png", "confusion.png", "training.png"):
        assert (out / name).is_file(), name
        assert (out / name).stat().st_size > 0
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == metrics
    for key in ("uncalibrated", "calibrated", "subgroups", "decision_curve", "conventions", "info", "n", "class_names"):
        assert key in metrics, key
    for key in ("uncalibrated", "calibrated"):
        auroc = metrics[key]["auroc"]
        assert 0 <= auroc["ci"][0] <= auroc["auc"] <= auroc["ci"][1] <= 1
        cal = metrics[key]["calibration"]
        for name in ("ece", "adaptive_ece", "mce", "brier"):
            assert cal[name]["value"] is not None and len(cal[name]["ci"]) == 2
        assert cal["slope"]["slope"]["value"] is not None
    tm = metrics["calibrated"]["threshold_metrics"]
    for name in ("sensitivity", "specificity", "ppv", "npv", "lr_positive", "lr_negative", "accuracy", "f1"):
        assert tm[name]["value"] is not None and len(tm[name]["ci"]) == 2, name
    conv = metrics["conventions"]
    assert conv["positive_class"] == "opacity"
    assert len(conv["ece_bin_edges"]) == 16 and conv["ece_bin_edges"][0] == 0 and conv["ece_bin_edges"][-1] == 1
    assert metrics["info"]["seed"] == 7
    assert metrics["n"] == 300 and metrics["class_names"] == ["normal", "opacity"]


def test_binary_figures_match_sklearn(binary_report):
    _, metrics, (y, p_unc, p_cal, sites, op) = binary_report
    assert metrics["calibrated"]["auroc"]["auc"] == pytest.approx(roc_auc_score(y, p_cal[:, 1]), abs=1e-12)
    assert metrics["uncalibrated"]["auroc"]["auc"] == pytest.approx(roc_auc_score(y, p_unc[:, 1]), abs=1e-12)
    for site in ("A", "B"):
        mask = sites == site
        group = metrics["subgroups"]["site"][site]
        assert group["n"] == mask.sum() and group["events"] == y[mask].sum()
        assert group["auroc"]["auc"] == pytest.approx(roc_auc_score(y[mask], p_cal[mask, 1]), abs=1e-12)
        predicted = p_cal[mask, 1] >= op.threshold
        assert group["sensitivity"]["value"] == pytest.approx(predicted[y[mask] == 1].mean())
        assert group["specificity"]["value"] == pytest.approx(1 - predicted[y[mask] == 0].mean())
    predicted = (p_cal[:, 1] >= op.threshold).astype(int)
    assert metrics["calibrated"]["confusion_matrix"]["matrix"] == confusion_matrix(y, predicted).tolist()
    tm = metrics["calibrated"]["threshold_metrics"]
    assert (tm["tp"], tm["fn"]) == (int(np.sum(predicted & y)), int(np.sum((1 - predicted) & y)))


def test_html_is_self_contained_and_escaped(binary_report):
    out, _, _ = binary_report
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 5
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", page, flags=re.I)
    assert "<link" not in page and "@import" not in page and "<script" not in page.lower()
    assert "&lt;script&gt;" in page
    for text in ("Reporting checklist (TRIPOD+AI / CLAIM)", "imagenet", "full_finetune", "not recorded", "Sensitivity", "opacity"):
        assert text in page, text


def test_multiclass_report(tmp_path):
    y, p_unc, p_cal = _multiclass_data()
    sites = np.where(np.arange(len(y)) % 3 == 0, "X", "Y")
    metrics = write_report(
        tmp_path, y_true=y, probs_uncalibrated=p_unc, probs_calibrated=p_cal, class_names=["a", "b", "c"],
        positive_index=None, operating_point=None, groups={"site": list(sites)}, info={}, n_resamples=200,
    )
    auroc = metrics["calibrated"]["auroc"]
    assert auroc["auc"] == pytest.approx(roc_auc_score(y, p_cal, multi_class="ovr", average="macro"), abs=1e-12)
    assert auroc["ci"][0] < auroc["auc"] < auroc["ci"][1]
    for k, name in enumerate("abc"):
        assert auroc["per_class"][name]["auc"] == pytest.approx(roc_auc_score(y == k, p_cal[:, k]), abs=1e-12)
    assert metrics["calibrated"]["accuracy"]["value"] == pytest.approx(np.mean(p_cal.argmax(axis=1) == y))
    assert metrics["calibrated"]["confusion_matrix"]["matrix"] == confusion_matrix(y, p_cal.argmax(axis=1)).tolist()
    assert metrics["decision_curve"] is None and "threshold_metrics" not in metrics["calibrated"]
    mask = sites == "X"
    assert metrics["subgroups"]["site"]["X"]["auroc"]["auc"] == pytest.approx(
        roc_auc_score(y[mask], p_cal[mask], multi_class="ovr"), abs=1e-12
    )
    for name in ("report.html", "metrics.json", "roc.png", "reliability.png", "confusion.png"):
        assert (tmp_path / name).is_file(), name
    assert not (tmp_path / "decision_curve.png").exists()
    assert "data:image/png;base64," in (tmp_path / "report.html").read_text()


def test_single_class_group_gives_null_auroc(tmp_path):
    y, p_unc, p_cal, _ = _binary_data(n=200, seed=3)
    sites = np.where(y == 0, "A", "B")  # every site holds one class only
    sites[:20] = "C"
    op = choose_operating_point(y, p_cal[:, 1], "youden")
    write_report(tmp_path, y_true=y, probs_uncalibrated=p_unc, probs_calibrated=p_cal, class_names=["neg", "pos"],
                 positive_index=1, operating_point=op, groups={"site": list(sites)}, info={}, n_resamples=100)
    groups = json.loads((tmp_path / "metrics.json").read_text())["subgroups"]["site"]
    assert groups["A"]["auroc"] is None and groups["B"]["auroc"] is None
    assert groups["A"]["sensitivity"]["value"] is None  # no positives: undefined, not zero
    assert groups["B"]["specificity"]["value"] is None
    assert groups["C"]["auroc"]["auc"] == pytest.approx(roc_auc_score(y[:20], p_cal[:20, 1]))
    assert "not estimable" in (tmp_path / "report.html").read_text()


def test_separated_outcomes_report_without_slope(tmp_path):
    y = np.r_[np.zeros(50, int), np.ones(50, int)]
    p = np.r_[np.linspace(0.05, 0.4, 50), np.linspace(0.6, 0.95, 50)]
    probs = np.c_[1 - p, p]
    op = choose_operating_point(y, p, "youden")
    metrics = write_report(tmp_path, y_true=y, probs_uncalibrated=probs, probs_calibrated=probs, class_names=["n", "p"],
                           positive_index=1, operating_point=op, groups=None, info={}, n_resamples=100)
    cal = metrics["calibrated"]["calibration"]
    assert cal["slope"] is None and "slope_not_estimable" in cal
    assert cal["ece"]["value"] > 0 and cal["ece"]["ci"] is not None
    assert metrics["calibrated"]["auroc"]["auc"] == 1.0
    assert metrics["subgroups"] == {}


def test_roc_band_matches_a_direct_bootstrap():
    y, _, p_cal, _ = _binary_data(n=120, seed=5)
    score = np.round(p_cal[:, 1], 2)  # ties
    grid = np.linspace(0, 1, 21)
    band = roc_band(y, score, fpr_grid=grid, n_resamples=60, seed=3)
    sens = []
    for chunk in resample_indices(y == 1, 60, 3, stratified=True):
        for idx in chunk:
            fpr, tpr, _ = roc_curve(y[idx], score[idx], drop_intermediate=False)
            row = []
            for g in grid:
                k = np.flatnonzero(fpr <= g)[-1]
                if k + 1 < len(fpr):
                    row.append(tpr[k] + (g - fpr[k]) / (fpr[k + 1] - fpr[k]) * (tpr[k + 1] - tpr[k]))
                else:
                    row.append(tpr[k])
            sens.append(row)
    low, high = np.quantile(np.array(sens), [0.025, 0.975], axis=0)
    np.testing.assert_allclose(band["sensitivity_low"], low, atol=1e-12)
    np.testing.assert_allclose(band["sensitivity_high"], high, atol=1e-12)
    assert band["sensitivity_high"][-1] == 1.0


def test_bootstrap_settings_are_used_and_reproducible():
    y, p_unc, p_cal, _ = _binary_data(n=150, seed=2)
    args = dict(y_true=y, probs_uncalibrated=p_unc, probs_calibrated=p_cal, class_names=["n", "p"], positive_index=1,
                operating_point=None, groups=None, info={})
    a, b = summarize(**args, n_resamples=150, seed=4), summarize(**args, n_resamples=150, seed=4)
    c = summarize(**args, n_resamples=150, seed=5)
    assert a == b
    assert a["calibrated"]["calibration"]["ece"]["ci"] != c["calibrated"]["calibration"]["ece"]["ci"]
    assert a["conventions"]["bootstrap"]["n_resamples"] == 150 and a["calibrated"]["roc_band"]["n_resamples"] == 150
    assert "threshold_metrics" not in a["calibrated"]


def test_bad_inputs_are_refused():
    y, p_unc, p_cal, _ = _binary_data(n=50)
    op = choose_operating_point(y, p_cal[:, 1], "youden")
    args = dict(y_true=y, probs_uncalibrated=p_unc, probs_calibrated=p_cal, class_names=["n", "p"], info={}, n_resamples=20)
    with pytest.raises(ValueError, match="positive_index"):
        summarize(**args, positive_index=None, operating_point=op, groups=None)
    with pytest.raises(ValueError, match="group column 'site'"):
        summarize(**args, positive_index=1, operating_point=op, groups={"site": ["A"] * 10})
    with pytest.raises(ValueError, match="class names"):
        summarize(**{**args, "class_names": ["n"]}, positive_index=1, operating_point=op, groups=None)


def test_jsonable():
    value = {1: (np.float32(0.5), np.int64(3)), "a": np.array([1.0, np.nan]), "b": float("inf"), "c": np.bool_(True)}
    assert jsonable(value) == {"1": [0.5, 3], "a": [1.0, None], "b": None, "c": True}
    json.dumps(jsonable(value), allow_nan=False)


def test_checklist_reads_an_evaluation_runs_info(tmp_path):
    y, p_unc, p_cal, _ = _binary_data(n=80, seed=4)
    info = {"evaluated_on": "external site C", "training": {"best_epoch": 3, "epochs_run": 4, "best_val_auroc": 0.8,
                                                           "partitions": INFO["partitions"]}}
    write_report(tmp_path, y_true=y, probs_uncalibrated=p_unc, probs_calibrated=p_cal, class_names=["normal", "opacity"],
                 positive_index=1, operating_point=None, groups=None, info=info, n_resamples=50)
    page = (tmp_path / "report.html").read_text()
    checklist = page[page.index("Reporting checklist"):]
    assert "epoch 3 of 4, highest validation AUROC (0.8000)" in checklist
    assert "<td>train</td>" in checklist and "patient_level_disjoint" in checklist
    assert checklist.count("not recorded") >= 5  # seed, transfer method, preprocessing, hyperparameters, recalibration
    assert "No operating point was recorded" in page


def test_stated_prevalence_adds_bayes_ppv_and_npv(tmp_path):
    y, p_unc, p_cal, _ = _binary_data(n=200, seed=3)
    op = choose_operating_point(y, p_cal[:, 1], "youden")
    metrics = write_report(tmp_path, y_true=y, probs_uncalibrated=p_unc, probs_calibrated=p_cal, class_names=["n", "p"],
                           positive_index=1, operating_point=op, groups=None, info={}, n_resamples=100, prevalence=0.05)
    tm = metrics["calibrated"]["threshold_metrics"]
    se, sp = tm["sensitivity"]["value"], tm["specificity"]["value"]
    assert tm["prevalence"] == 0.05
    assert tm["ppv_at_prevalence"]["value"] == pytest.approx(0.05 * se / (0.05 * se + 0.95 * (1 - sp)), rel=1e-12)
    assert tm["npv_at_prevalence"]["value"] == pytest.approx(0.95 * sp / (0.95 * sp + 0.05 * (1 - se)), rel=1e-12)
    # the sample's own prevalence is about 0.5: a 5 % prevalence lowers the PPV and raises the NPV
    assert tm["ppv_at_prevalence"]["value"] < tm["ppv"]["value"] and tm["npv_at_prevalence"]["value"] > tm["npv"]["value"]
    page = (tmp_path / "report.html").read_text()
    assert "PPV at the stated prevalence 5.0%" in page and "NPV at the stated prevalence 5.0%" in page
    without = summarize(y_true=y, probs_uncalibrated=p_unc, probs_calibrated=p_cal, class_names=["n", "p"], positive_index=1,
                        operating_point=op, groups=None, info={}, n_resamples=100)
    assert without["calibrated"]["threshold_metrics"]["ppv_at_prevalence"] is None


def test_confusion_title_is_never_cut_off(tmp_path, monkeypatch):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from medtl.report import plots

    figures = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (figures.append(fig), save(fig, path))[1])
    confusion = {"matrix": [[40, 3], [5, 52]], "labels": ["normal", "opacity"]}
    plots.confusion_plot(tmp_path / "c.png", confusion, title="Confusion matrix (at the operating point)")
    (fig,) = figures
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.tight_layout()
    title = fig.axes[0].title.get_window_extent(renderer)
    assert title.x0 >= 0 and title.x1 <= fig.bbox.x1 and title.y1 <= fig.bbox.y1


def test_unset_optional_settings_are_grey_and_missing_items_red(tmp_path):
    y, p_unc, p_cal, _ = _binary_data()
    info = {**INFO, "hyperparameters": {"lr": 0.001, "head_lr": None}, "preprocessing": {"target_spacing": None}}
    write_report(tmp_path, y_true=y, probs_uncalibrated=p_unc, probs_calibrated=p_cal, class_names=["normal", "opacity"],
                 positive_index=1, operating_point=None, groups=None, info=info, title="t", n_resamples=100)
    html = (tmp_path / "report.html").read_text()
    assert '<b>head_lr</b>: <span class="unset">not set</span>' in html
    assert '<b>target_spacing</b>: <span class="unset">not set</span>' in html
    row = html[html.index("<td>Selection of the final model</td>"):][:200]
    assert '<span class="missing">not recorded</span>' in row  # a checklist item the run did not record stays red


def test_report_info_is_built_once_and_names_the_adaptation(tmp_path):
    """The training and the evaluation report take their facts from one builder: an AdaBN bundle's
    evaluation says AdaBN, and both fill the checklist's training run."""
    from helpers import write_tiny_bundle
    from medtl.bundle import read_meta
    from medtl.config import Config
    from medtl.report import RunInfo

    config = Config.model_validate({"adapt": {"domain": "adabn"}, "train": {"seed": 5}})
    training = {"best_epoch": 3, "epochs_run": 5, "adaptation": {"strategy": "full", "domain": "adabn", "target_scans": 12}}
    meta = read_meta(write_tiny_bundle(tmp_path / "bundle", config=config, training=training))
    run = RunInfo.of(config, meta)
    assert (run.classes, run.positive_index, run.calibration) == (meta["classes"], meta["positive_index"], meta["calibration"]["method"])
    info = run.report(title="t", evaluated_on="x", recalibration="platt")
    assert info["transfer_method"] == "full + adabn (12 unlabelled target scans)"
    assert info["training"]["best_epoch"] == 3 and info["seed"] == 5 and info["backbone"] == "resnet18"
