"""The whole path through the CLI, as a user runs it: synth -> train -> evaluate -> predict."""

import csv
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from medtl.cli import main


@pytest.mark.slow
def test_cli_synth_train_evaluate_predict(tmp_path):
    data = tmp_path / "data"
    assert main(["synth", "--out", str(data)]) == 0
    config = tmp_path / "run.yaml"
    config.write_text(
        "data:\n  manifest: data/manifest.csv\n  image_size: [48, 48]\n  num_workers: 0\n"
        "model:\n  backbone: resnet18\n  weights: none\n"
        "train:\n  epochs: 4\n  batch_size: 32\n  lr: 0.001\n  head_lr: 0.001\n  folds: 1\n"
    )
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run), "--set", "train.seed=1"]) == 0
    for name in ("bundle/model.safetensors", "bundle/bundle.json", "bundle/config.yaml", "train_log.csv",
                 "report/report.html", "report/metrics.json"):
        assert (run / name).is_file(), name
    meta = json.loads((run / "bundle" / "bundle.json").read_text())
    budget = json.loads((run / "versions.json").read_text())["threads"]  # the thread budget the run had
    assert budget["intra_op"] == torch.get_num_threads() and budget["inter_op"] == 1 and budget["worker_threads"] == 1
    assert meta["calibration"]["method"] == "platt"  # calibration auto, binary
    assert meta["operating_point"]["method"] == "most_probable"  # recipe: auto, classes 60/40
    assert list(run.joinpath("report").glob("*.png")), "report plots"
    shift = json.loads((run / "report" / "metrics.json").read_text())["site_shift"]
    assert set(shift) == {"before", "after"} and "A vs B" in shift["after"]["proxy_a_distance"]
    assert (run / "report" / "site_shift.png").is_file()
    html = (run / "report" / "report.html").read_text()
    training_row = html[html.index("<td>Training run</td>"):][:400]
    assert "not recorded" not in training_row and "best_epoch" in training_row

    evaluation = tmp_path / "evaluation"
    assert main(["evaluate", str(run / "bundle"), str(data / "test" / "labels.csv"), "--out", str(evaluation), "--workers", "0",
                 "--prevalence", "0.1"]) == 0
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert metrics["calibrated"]["threshold_metrics"]["prevalence"] == 0.1

    preds = tmp_path / "preds.csv"
    assert main(["predict", str(run / "bundle"), str(data / "test"), "--out", str(preds), "--workers", "0"]) == 0
    rows = list(csv.DictReader(open(preds)))
    classes = meta["classes"]
    assert list(rows[0]) == ["image", *[f"prob_{c}" for c in classes], "pred", "uncertain", "ood_distance", "ood_p", "fingerprint"]
    labels = {r["image"]: r["label"] for r in csv.DictReader(open(data / "test" / "labels.csv"))}
    assert sorted(r["image"] for r in rows) == sorted(labels)
    positive = classes[meta["positive_index"]]
    y = np.array([labels[r["image"]] == positive for r in rows])
    p = np.array([float(r[f"prob_{positive}"]) for r in rows])
    np.testing.assert_allclose([sum(float(r[f"prob_{c}"]) for c in classes) for r in rows], 1.0, atol=1e-5)
    # An independent AUROC from the CSV equals the evaluate report's (same scans, same model).
    assert roc_auc_score(y, p) == pytest.approx(metrics["calibrated"]["auroc"]["auc"], abs=1e-4)
    assert roc_auc_score(y, p) > 0.75
