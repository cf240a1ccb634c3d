"""Task types: the multi-label manifest, masked loss, per-label calibration, thresholds and report
figures checked against scikit-learn; single-label tasks keep the numbers they had."""

import csv

import numpy as np
import pytest
import torch
from scipy.special import expit
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss, recall_score, roc_auc_score

from helpers import write_small_split
from medtl.bundle import load
from medtl.config import ConfigError, load_config
from medtl.io import ManifestError
from medtl.metrics import auroc_point, choose_operating_point, expected_calibration_error, roc_auc_multilabel
from medtl.pipeline import train
from medtl.report import summarize_multilabel
from medtl.tasks import TASKS, Binary, Multiclass, MultiLabel, make_task, register_task, softmax, task_from_meta

NAMES = ["opacity", "effusion", "cardiomegaly"]


def _multilabel(n: int = 300, seed: int = 0):
    """Logits and 0/1 targets that follow them, with a tenth of the effusion cells unknown."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 3)) < [0.35, 0.25, 0.2]).astype(float)
    z = 2.5 * (y - 0.3) + rng.normal(size=(n, 3)) + [0.5, -0.3, 0.8]  # informative, miscalibrated
    y[rng.random(n) < 0.1, 1] = np.nan
    return z, y


def _manifest(tmp_path, rows, columns=("image", *NAMES, "site")):
    (tmp_path / "a.png").write_bytes(b"")
    path = tmp_path / "m.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows([["a.png", *row] for row in rows])
    return path


def test_the_task_types_are_registered_and_configurable():
    assert {"binary", "multiclass", "multilabel"} <= set(TASKS)
    assert load_config(None, ["task.type=multilabel"]).task.type == "multilabel"
    with pytest.raises(ConfigError, match="unknown task type 'multilable'; did you mean 'multilabel'"):
        load_config(None, ["task.type=multilable"])


def test_multilabel_manifest_cells_and_strata(tmp_path):
    path = _manifest(tmp_path, [["1", "0", "1", "A"], ["0", "", "0", "A"], ["", "", "", "B"], ["0", "0", "0", "B"]])
    records = MultiLabel.read(path, NAMES)
    assert [r.label for r in records] == ["opacity|cardiomegaly", "none", None, "none"]  # all blank: unlabelled
    with pytest.raises(ValueError, match=r"findings \['effusion'\] have no positive labelled scans"):
        make_task("multilabel", records, NAMES)
    task = MultiLabel(NAMES)
    y = task.targets([r for r in records if r.label])
    np.testing.assert_array_equal(y[1], [0, np.nan, 0])
    assert task.counts(records) == {"opacity": 1, "effusion": 0, "cardiomegaly": 1}
    assert task.items(records)[2]["label"].dtype == np.float32 and len(task.items(records)) == 3


def test_multilabel_manifest_errors_name_the_cell(tmp_path):
    with pytest.raises(ManifestError, match=r"row 2, column 'effusion': 'yes' is not 1"):
        MultiLabel.read(_manifest(tmp_path, [["1", "yes", "0", "A"]]), NAMES)
    with pytest.raises(ManifestError, match=r"missing finding column\(s\) \['cardiomegaly'\]"):
        MultiLabel.read(_manifest(tmp_path, [["1", "0", "A"]], ("image", "opacity", "effusion", "site")), NAMES)
    with pytest.raises(ValueError, match="needs data.classes"):
        MultiLabel.read(_manifest(tmp_path, [["1", "0", "0", "A"]]), None)


def test_masked_bce_ignores_unknown_cells_and_weights_positives():
    z, y = _multilabel(50)
    loss = MultiLabel(NAMES).loss()(torch.tensor(z), torch.tensor(y))
    known = ~np.isnan(y)
    p = expit(z[known])
    expected = -np.mean(y[known] * np.log(p) + (1 - y[known]) * np.log(1 - p))
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    items = [{"label": row} for row in y]
    weighted = MultiLabel(NAMES).loss(items)
    ratio = np.nansum(y == 0, axis=0) / np.nansum(y == 1, axis=0)
    np.testing.assert_allclose(weighted.pos_weight.numpy(), ratio, rtol=1e-6)


def test_per_label_platt_matches_unpenalised_logistic_regression_on_known_scans():
    z, y = _multilabel()
    task = MultiLabel(NAMES)
    calibrator = task.calibrator("auto").fit(z, y)
    probs = calibrator.transform(z)
    for k in range(3):
        known = ~np.isnan(y[:, k])
        sk = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(z[known, k : k + 1], y[known, k])
        np.testing.assert_allclose(probs[:, k], sk.predict_proba(z[:, k : k + 1])[:, 1], atol=1e-5)
    again = task.load_calibrator(calibrator.to_dict())
    np.testing.assert_array_equal(again.transform(z), probs)
    temperature = task.calibrator("temperature").fit(z, y).transform(z)
    assert np.all(np.argsort(temperature[:, 0]) == np.argsort(z[:, 0]))  # one positive scale per label: ranking kept


def test_one_threshold_per_label_and_the_prediction_columns():
    z, y = _multilabel()
    task = MultiLabel(NAMES)
    probs = task.calibrator("platt").fit(z, y).transform(z)
    points = task.choose_decision(y, probs, "youden", None)
    known = ~np.isnan(y[:, 1])
    alone = choose_operating_point(y[known, 1].astype(int), probs[known, 1], "youden")
    assert points["effusion"].threshold == alone.threshold and points["effusion"].n_positive + points["effusion"].n_negative == known.sum()
    decided = task.decide(probs, task.load_decision(task.decision_to_dict(points)))
    np.testing.assert_array_equal(decided[:, 2], probs[:, 2] >= points["cardiomegaly"].threshold)
    assert task.columns() == [*(f"prob_{n}" for n in NAMES), *(f"pred_{n}" for n in NAMES)]
    assert task.row(probs[0], decided[0])["pred_opacity"] == decided[0, 0]
    assert task.named(np.array([[1, 0, 1]])) == [["opacity", "cardiomegaly"]]
    assert task.uncertain(np.array([[0.9, 0.1, 0.1]]), None, 0.45).tolist() == [True]  # 0.1 is within 0.45 of 0.5


def test_validation_score_is_the_macro_auroc_over_known_cells():
    z, y = _multilabel()
    expected = np.mean([roc_auc_score(y[~np.isnan(y[:, k]), k], z[~np.isnan(y[:, k]), k]) for k in range(3)])
    assert MultiLabel(NAMES).score(y, z) == pytest.approx(expected, abs=1e-12)
    result = roc_auc_multilabel(y, z, NAMES, n_resamples=200)
    assert result.auc == pytest.approx(expected, abs=1e-12) and result.ci[0] < expected < result.ci[1]


def test_per_label_report_figures_match_scikit_learn():
    z, y = _multilabel()
    task = MultiLabel(NAMES)
    probs = task.calibrator("platt").fit(z, y).transform(z)
    points = task.choose_decision(y, probs, "youden", None)
    s = summarize_multilabel(y_true=y, probs_uncalibrated=task.probabilities(z), probs_calibrated=probs, label_names=NAMES,
                             operating_points=points, groups={"site": ["A", "B"] * 150}, info={}, n_resamples=200)
    for k, name in enumerate(NAMES):
        known = ~np.isnan(y[:, k])
        yk, d = y[known, k].astype(int), s["per_label"][name]
        assert d["n"] == known.sum() and d["positives"] == yk.sum()
        assert d["auroc"]["calibrated"]["auc"] == pytest.approx(roc_auc_score(yk, probs[known, k]), abs=1e-12)
        assert d["auroc"]["uncalibrated"]["auc"] == pytest.approx(roc_auc_score(yk, expit(z[known, k])), abs=1e-12)
        for key, p in (("uncalibrated", expit(z[known, k])), ("calibrated", probs[known, k])):
            cal = d["calibration"][key]
            assert cal["brier"]["value"] == pytest.approx(brier_score_loss(yk, p), abs=1e-12)
            bins = np.minimum((p * 15).astype(int), 14)
            ece = sum(abs(p[bins == b].mean() - yk[bins == b].mean()) * np.sum(bins == b) for b in np.unique(bins)) / len(p)
            assert cal["ece"]["value"] == pytest.approx(ece, abs=1e-12)
        tm = d["threshold_metrics"]
        assert tm["sensitivity"]["value"] == pytest.approx(recall_score(yk, probs[known, k] >= points[name].threshold))
        assert tm["specificity"]["value"] == pytest.approx(recall_score(1 - yk, probs[known, k] < points[name].threshold))
    # Platt recalibration lowers the ECE of these deliberately shifted logits
    assert all(d["calibration"]["calibrated"]["ece"]["value"] < d["calibration"]["uncalibrated"]["ece"]["value"]
               for d in s["per_label"].values())
    assert s["calibrated"]["auroc"]["auc"] == pytest.approx(np.mean([s["per_label"][n]["auroc"]["calibrated"]["auc"] for n in NAMES]))
    assert s["label_counts"]["effusion"]["unknown"] == np.isnan(y[:, 1]).sum()
    site_a = np.arange(300) % 2 == 0
    known = site_a & ~np.isnan(y[:, 0])
    assert s["subgroups"]["site"]["A"]["per_label"]["opacity"]["auroc"]["auc"] == pytest.approx(roc_auc_score(y[known, 0], probs[known, 0]))
    assert s["subgroups"]["site"]["A"]["per_label"]["opacity"]["ece"] == pytest.approx(
        expected_calibration_error(y[known, 0].astype(int), probs[known, 0], 15))


def test_single_label_tasks_keep_the_existing_rules():
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(80, 2)), rng.integers(0, 2, 80)
    binary = Binary(["normal", "opacity"], 1)
    assert binary.score(labels, logits) == auroc_point(labels, softmax(logits))
    probs = binary.calibrator("auto").fit(logits, labels).transform(logits)
    point = binary.choose_decision(labels, probs, "youden", None)
    assert point == choose_operating_point(labels, probs[:, 1], "youden")
    np.testing.assert_array_equal(binary.decide(probs, point), (probs[:, 1] >= point.threshold).astype(int))
    assert binary.columns() == ["prob_normal", "prob_opacity", "pred"]
    assert isinstance(binary.loss(), torch.nn.CrossEntropyLoss) and Multiclass(["a", "b", "c"]).choose_decision(labels, probs, "youden", None) is None


def test_bundles_without_a_task_load_as_before():
    assert isinstance(task_from_meta({"classes": ["a", "b"], "positive_index": 0}), Binary)
    assert isinstance(task_from_meta({"classes": ["a", "b", "c"], "positive_index": None}), Multiclass)
    ml = task_from_meta({"classes": NAMES, "positive_index": None, "task": {"type": "multilabel", "labels": NAMES}})
    assert isinstance(ml, MultiLabel) and ml.names == NAMES


class SmoothedBinary(Binary):
    """A toy task type: binary with label-smoothed cross-entropy (what a plug-in would add)."""

    name = "toy_smoothed_binary"

    def loss(self, items=None) -> torch.nn.Module:
        return torch.nn.CrossEntropyLoss(label_smoothing=0.2)


@pytest.fixture
def toy_task():
    register_task(SmoothedBinary)
    yield SmoothedBinary
    TASKS.unregister(SmoothedBinary.name)


@pytest.mark.slow
def test_a_task_type_registered_by_the_test_trains_and_lands_in_the_bundle(toy_task, tmp_path):
    manifest = write_small_split(tmp_path, patients_per_site=12, n_train=24, n_val=16)
    config = load_config(None, [f"data.manifest={manifest}", "recipe=none", "model.weights=none", "data.image_size=[32, 32]",
                                "data.num_workers=0", "data.cache=none", "train.epochs=1", "train.batch_size=8",
                                "train.folds=1", "report.bootstrap=100", f"task.type={toy_task.name}"])
    outcome = train(config, tmp_path / "run")
    predictor = load(outcome.bundle)
    assert type(predictor.task) is SmoothedBinary and predictor.meta["task"] == {"type": toy_task.name}
    assert predictor.predict_proba(sorted((tmp_path).rglob("*.dcm"))[:2]).shape == (2, 2)
