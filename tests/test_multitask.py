"""Multi-task models: a findings head (multilabel) and a scanner head (binary) on one backbone,
trained on rows that each head knows only in part; train -> evaluate -> predict through the CLI
and Python, the per-head report checked against scikit-learn, and the loss's masking and weights."""

import csv
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from medtl.bundle import load
from medtl.cli import main
from medtl.config import ConfigError, load_config
from medtl.io import read_manifest
from medtl.io.synthetic import FINDINGS
from medtl.pipeline import train
from medtl.tasks import MaskedBCE, MultiTask, make_task, task_from_meta, task_type

HEADS = ("task.heads=[{name: findings, type: multilabel, classes: [" + ", ".join(FINDINGS) + "]}, "
         "{name: scanner, type: binary, classes: [A, B], weight: 0.5}]")
SETTINGS = ["task.type=multitask", HEADS, "model.weights=none", "data.image_size=[48, 48]", "data.num_workers=0", "train.epochs=3",
            "train.batch_size=32", "train.lr=0.001", "adapt.head_lr_multiplier=1", "report.bootstrap=200"]


def _with_scanner(source, out, blank_every: int | None):
    """``source`` with a ``scanner`` column (the site); with ``blank_every`` some rows lose the
    scanner and others their findings, so each head is known on part of the rows only."""
    rows = list(csv.DictReader(open(source)))
    for i, row in enumerate(rows):
        row["scanner"] = row["site"]
        if blank_every and i % blank_every == 1:
            row["scanner"] = ""
        if blank_every and i % blank_every == 2:
            row.update({f: "" for f in FINDINGS})
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("multitask")
    assert main(["synth", "--task", "multilabel", "--out", str(out), "--patients", "40", "--test-patients", "20"]) == 0
    _with_scanner(out / "manifest.csv", out / "multitask.csv", blank_every=4)
    _with_scanner(out / "test" / "labels.csv", out / "test" / "multitask.csv", blank_every=None)
    return out


def _task(data) -> MultiTask:
    config = load_config(None, [f"data.manifest={data / 'multitask.csv'}", *SETTINGS])
    kind = config.task
    records = task_type(kind.type, kind.heads).read(data / "multitask.csv", None)
    return make_task(kind.type, [r for r in records if r.label], heads=kind.heads)


def test_rows_targets_and_the_masked_weighted_loss(data):
    task = _task(data)
    assert task.names == [*(f"findings:{f}" for f in FINDINGS), "scanner:A", "scanner:B"] and task.outputs == 5
    records = [r for r in task.read(data / "multitask.csv", None) if r.label]
    assert len(records) == len(read_manifest(data / "multitask.csv", require_label=False))  # every row knows some head
    y = task.targets(records)
    assert y.shape == (len(records), 4)  # three findings, one class index for the scanner
    assert np.isnan(y[1, 3]) and not np.isnan(y[1, :3]).any() and np.isnan(y[2, :3]).all() and y[2, 3] in (0, 1)

    torch.manual_seed(0)
    logits, targets = torch.randn(len(y), 5), torch.from_numpy(y)
    loss = task.loss()(logits, targets)
    known_f, known_s = ~torch.isnan(targets[:, :3]).all(1), ~torch.isnan(targets[:, 3])
    expected = (MaskedBCE()(logits[known_f, :3], targets[known_f, :3])
                + 0.5 * nn.functional.cross_entropy(logits[known_s, 3:], targets[known_s, 3].long()))
    torch.testing.assert_close(loss, expected)


def test_config_errors_name_the_heads_rule(tmp_path):
    with pytest.raises(ConfigError, match="task.type=multitask needs it"):
        load_config(None, ["task.type=multitask"])
    with pytest.raises(ConfigError, match="head names must differ"):
        load_config(None, ["task.type=multitask", "task.heads=[{name: a, classes: [x, y]}, {name: a, classes: [x, y]}]"])
    with pytest.raises(ConfigError, match="a binary head needs at least two classes"):
        load_config(None, ["task.type=multitask", "task.heads=[{name: a, classes: [x]}]"])
    with pytest.raises(ConfigError, match="trains without domain adaptation"):
        load_config(None, ["task.type=multitask", HEADS, "adapt.domain=coral"])


@pytest.mark.slow
def test_cli_trains_evaluates_and_predicts_a_multitask_model(data, tmp_path):
    run = tmp_path / "run"
    args = [arg for setting in SETTINGS for arg in ("--set", setting)]
    assert main(["train", "--out", str(run), "--set", f"data.manifest={data / 'multitask.csv'}", *args]) == 0
    meta = json.loads((run / "bundle" / "bundle.json").read_text())
    assert [h["name"] for h in meta["task"]["heads"]] == ["findings", "scanner"] and meta["model"]["num_classes"] == 5
    assert set(meta["operating_point"]) == {"findings", "scanner"} and set(meta["operating_point"]["findings"]) == set(FINDINGS)
    assert meta["calibration"]["method"] == "per-head findings: per-label platt, scanner: platt"  # recipe: each head's own default
    assert (run / "report" / "findings" / "report.html").is_file() and (run / "report" / "scanner" / "report.html").is_file()
    assert "scanner/report.html" in (run / "report" / "report.html").read_text()

    evaluation = tmp_path / "evaluation"
    assert main(["evaluate", str(run / "bundle"), str(data / "test" / "multitask.csv"), "--out", str(evaluation), "--workers", "0"]) == 0
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert metrics["task"] == "multitask" and set(metrics["heads"]) == {"findings", "scanner"}
    preds = tmp_path / "preds.csv"
    assert main(["predict", str(run / "bundle"), str(data / "test"), "--out", str(preds), "--workers", "0"]) == 0
    rows = {r["image"]: r for r in csv.DictReader(open(preds))}
    assert list(next(iter(rows.values())))[:10] == ["image", *(f"findings_prob_{f}" for f in FINDINGS),
                                                    *(f"findings_pred_{f}" for f in FINDINGS), "scanner_prob_A", "scanner_prob_B",
                                                    "scanner_pred"]
    labels = list(csv.DictReader(open(data / "test" / "multitask.csv")))
    for finding in FINDINGS:  # each head's figures are scikit-learn's on the predicted probabilities
        y = np.array([int(r[finding]) for r in labels])
        p = np.array([float(rows[r["image"]][f"findings_prob_{finding}"]) for r in labels])
        assert metrics["heads"]["findings"]["per_label"][finding]["auroc"]["calibrated"]["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-4)
    y = np.array([r["scanner"] == "B" for r in labels])
    p = np.array([float(rows[r["image"]]["scanner_prob_B"]) for r in labels])
    assert metrics["heads"]["scanner"]["calibrated"]["auroc"]["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-4)
    assert main(["predict", str(run / "bundle"), str(data / "test"), "--out", str(tmp_path / "tta.csv"), "--workers", "0", "--tta"]) == 0
    spread = [float(r["tta_std"]) for r in csv.DictReader(open(tmp_path / "tta.csv"))]
    assert len(spread) == len(rows) and all(0 <= s < 0.5 for s in spread) and max(spread) > 0
    threshold = meta["operating_point"]["scanner"]["threshold"]
    assert all(rows[r["image"]]["scanner_pred"] == ("B" if float(rows[r["image"]]["scanner_prob_B"]) >= threshold - 1e-6 else "A")
               for r in labels)


@pytest.mark.slow
def test_python_api_multitask_bundle(data, tmp_path):
    config = load_config(None, [f"data.manifest={data / 'multitask.csv'}", "recipe=none", *SETTINGS])
    outcome = train(config, tmp_path / "run")
    predictor = load(outcome.bundle)
    assert isinstance(predictor.task, MultiTask) and [h.weight for h in predictor.task.heads] == [1.0, 0.5]
    scans = sorted((data / "test").glob("*.dcm"))[:5]
    probs = predictor.predict_proba(scans)
    assert probs.shape == (5, 5) and np.allclose(probs[:, 3:].sum(axis=1), 1.0)  # the scanner head is a softmax pair
    named = predictor.predict(scans)
    assert all(set(n) == {"findings", "scanner"} and n["scanner"] in ("A", "B") and set(n["findings"]) <= set(FINDINGS) for n in named)
    again = task_from_meta(predictor.meta)
    assert again.names == predictor.task.names and again.to_dict() == predictor.task.to_dict()
    with pytest.raises(ValueError, match="task.type=multitask trains one model: ensembles"):
        train(load_config(None, [f"data.manifest={data / 'multitask.csv'}", *SETTINGS, "train.folds=3"]), tmp_path / "ensemble")


def test_each_head_is_calibrated_and_decided_on_its_known_rows_and_round_trips(data):
    task = _task(data)
    records = [r for r in task.read(data / "multitask.csv", None) if r.label]
    y = task.targets(records)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(len(y), 5)) + np.nan_to_num(np.column_stack([y[:, :3], y[:, 3] == 0, y[:, 3] == 1]))
    calibrator = task.calibrator("auto").fit(logits, y)
    probs = calibrator.transform(logits)
    scanner = task.heads[1]
    known = scanner.known(y)  # the scanner head's calibrator saw only its known rows: the same fit as on them alone
    alone = scanner.task.calibrator("auto").fit(logits[known][:, 3:], scanner.labels(y[known]))
    np.testing.assert_allclose(probs[:, 3:], alone.transform(logits[:, 3:]))
    decision = task.choose_decision(y, probs, "youden", None)
    again = task.load_calibrator(json.loads(json.dumps(calibrator.to_dict())))
    np.testing.assert_allclose(again.transform(logits), probs)
    assert task.load_decision(json.loads(json.dumps(task.decision_to_dict(decision))))["scanner"] == decision["scanner"]
    decided = task.decide(probs, decision)
    assert decided.shape == (len(y), 4) and set(np.unique(decided[:, 3])) <= {0, 1}
