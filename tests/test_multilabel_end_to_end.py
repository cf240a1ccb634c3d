"""A multi-label run as a user makes it, through the CLI and from Python: synth --task multilabel
-> train -> evaluate -> predict, with the report's per-finding figures checked against the
prediction table and scikit-learn."""

import csv
import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medtl.bundle import load, recalibrate
from medtl.cli import main
from medtl.config import load_config
from medtl.io.synthetic import FINDINGS
from medtl.pipeline import train
from medtl.tasks import MultiLabel

SETTINGS = ["task.type=multilabel", f"data.classes=[{','.join(FINDINGS)}]", "model.weights=none", "data.image_size=[48, 48]",
            "data.num_workers=0", "train.epochs=3", "train.batch_size=32", "train.lr=0.001", "adapt.head_lr_multiplier=1",
            "report.bootstrap=200"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("multilabel")
    assert main(["synth", "--task", "multilabel", "--out", str(out), "--patients", "40", "--test-patients", "20"]) == 0
    return out


@pytest.mark.slow
def test_cli_trains_evaluates_and_predicts_a_multilabel_model(data, tmp_path):
    run = tmp_path / "run"
    args = [arg for setting in SETTINGS for arg in ("--set", setting)]
    assert main(["train", "--out", str(run), "--set", f"data.manifest={data / 'manifest.csv'}", *args]) == 0
    meta = json.loads((run / "bundle" / "bundle.json").read_text())
    assert meta["task"] == {"type": "multilabel", "labels": list(FINDINGS)} and meta["model"]["num_classes"] == 3
    assert meta["calibration"]["method"].startswith("per-label") and set(meta["operating_point"]) == set(FINDINGS)
    assert json.loads((run / "recipe.json").read_text())["choices"][0]  # recipe: auto ran
    assert meta["training"]["partitions"]["train"]["per_class"].keys() == set(FINDINGS)
    html = (run / "report" / "report.html").read_text()
    assert "Summary per finding" in html and "effusion" in html

    evaluation = tmp_path / "evaluation"
    assert main(["evaluate", str(run / "bundle"), str(data / "test" / "labels.csv"), "--out", str(evaluation), "--workers", "0"]) == 0
    metrics = json.loads((evaluation / "metrics.json").read_text())
    preds = tmp_path / "preds.csv"
    assert main(["predict", str(run / "bundle"), str(data / "test"), "--out", str(preds), "--workers", "0"]) == 0
    rows = {r["image"]: r for r in csv.DictReader(open(preds))}
    first = next(iter(rows.values()))
    assert list(first) == ["image", *(f"prob_{f}" for f in FINDINGS), *(f"pred_{f}" for f in FINDINGS), "uncertain",
                           "ood_distance", "ood_p", "fingerprint"]
    labels = list(csv.DictReader(open(data / "test" / "labels.csv")))
    for finding in FINDINGS:
        y = np.array([int(r[finding]) for r in labels])
        p = np.array([float(rows[r["image"]][f"prob_{finding}"]) for r in labels])
        d = metrics["per_label"][finding]
        # the report's AUROC is scikit-learn's on the predicted probabilities (same scans, same model)
        assert d["auroc"]["calibrated"]["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-4)
        decided = np.array([int(rows[r["image"]][f"pred_{finding}"]) for r in labels])
        np.testing.assert_array_equal(decided, p >= meta["operating_point"][finding]["threshold"] - 1e-6)


@pytest.mark.slow
def test_python_api_multilabel_bundle_predicts_one_column_per_finding(data, tmp_path):
    config = load_config(None, [f"data.manifest={data / 'manifest.csv'}", "recipe=none", *SETTINGS])
    outcome = train(config, tmp_path / "run")
    assert outcome.metrics["task"] == "multilabel" and outcome.training["calibration"] == "per-label platt"
    predictor = load(outcome.bundle)
    assert isinstance(predictor.task, MultiLabel)
    scans = sorted((data / "test").glob("*.dcm"))[:5]
    probs = predictor.predict_proba(scans)
    assert probs.shape == (5, len(FINDINGS)) and not np.allclose(probs.sum(axis=1), 1.0)
    names = predictor.predict(scans)
    assert all(set(found) <= set(FINDINGS) for found in names)
    with pytest.raises(ValueError, match="medtl recalibrate and medtl adapt take single-label bundles; this one is multilabel"):
        recalibrate(outcome.bundle, data / "test" / "labels.csv", tmp_path / "recalibrated")


def test_multilabel_ensembles_are_refused_with_a_clear_error(data, tmp_path):
    config = load_config(None, [f"data.manifest={data / 'manifest.csv'}", *SETTINGS, "train.folds=3"])
    with pytest.raises(ValueError, match=r"task.type=multilabel trains one model: ensembles"):
        train(config, tmp_path / "run")


def test_rank_refuses_a_multilabel_config(data, tmp_path, capsys):
    config = tmp_path / "ml.yaml"
    config.write_text(f"task: {{type: multilabel}}\ndata: {{manifest: {data / 'manifest.csv'}, classes: [{', '.join(FINDINGS)}]}}\n")
    assert main(["rank", str(config), "--backbones", "resnet18"]) == 2
    assert "error: medtl rank scores class labels (LogME); task.type=multilabel is not single-label" in capsys.readouterr().err
