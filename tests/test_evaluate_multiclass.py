"""The report for a multi-class bundle, with subgroups by site and by an extra manifest column."""

import csv
import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medtl.bundle import load
from medtl.config import load_config
from medtl.io import write_synthetic
from medtl.pipeline import evaluate, train


@pytest.mark.slow
def test_multiclass_bundle_trains_and_evaluates_with_subgroups(tmp_path):
    paths = write_synthetic(tmp_path / "data", seed=2, patients_per_site=40, test_per_site=15)
    # four classes: finding x site, and a 'view' column to group by
    rows = list(csv.DictReader(open(paths["manifest"])))
    for i, row in enumerate(rows):
        row["label"] = f"{row['label']}_{row['site']}"
        row["view"] = "PA" if i % 2 else "AP"
    manifest = tmp_path / "data" / "multi.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    config = load_config(None, [f"data.manifest={manifest}", "data.image_size=[32,32]", "data.num_workers=0",
                                "model.weights=none", "train.epochs=2", "report.bootstrap=200",
                                "report.subgroups=[site,view]"])
    outcome = train(config, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "report" / "metrics.json").read_text())
    assert metrics["class_names"] == sorted({r["label"] for r in rows})
    assert set(metrics["subgroups"]) == {"site", "view"}
    assert metrics["decision_curve"] is None  # binary-only

    evaluation = evaluate(outcome.bundle, manifest, tmp_path / "eval", num_workers=0, subgroups=["view"])
    assert set(evaluation["subgroups"]) == {"view"}
    assert (tmp_path / "eval" / "report.html").is_file()
    per_class = evaluation["calibrated"]["auroc"]["per_class"]
    assert len(per_class) == 4
    macro = np.mean([c["auc"] for c in per_class.values()])
    assert evaluation["calibrated"]["auroc"]["auc"] == pytest.approx(macro)
    # each class's one-vs-rest AUROC equals sklearn's on the bundle's own calibrated probabilities
    predictor = load(outcome.bundle)
    labelled = [r for r in rows if r["label"]]
    probs = predictor.predict_proba([manifest.parent / r["image"] for r in labelled])
    for k, name in enumerate(predictor.classes):
        expected = roc_auc_score([r["label"] == name for r in labelled], probs[:, k])
        assert per_class[name]["auc"] == pytest.approx(expected, abs=1e-4), name
