"""The ``medtl`` command's shape: help is fast because building the parser imports no torch."""

import subprocess
import sys

from medtl.cli.predict import OUTPUT_FORMATS


def test_help_does_not_import_torch():
    code = ("import sys; from medtl.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'monai', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_predict_formats_match_the_result_table():
    from medtl.infer import FORMATS

    assert OUTPUT_FORMATS == FORMATS


def test_rank_scores_the_training_split_that_train_uses(tmp_path, capsys):
    """``medtl rank`` reads the data as ``medtl train`` does (same splits and classes): its LogME
    runs on exactly the rows of the training split."""
    from helpers import write_small_split
    from medtl.cli import main

    manifest = write_small_split(tmp_path, patients_per_site=12, n_train=14, n_val=6)
    (tmp_path / "c.yaml").write_text(f"data:\n  manifest: {manifest}\n  image_size: [32, 32]\nmodel:\n  weights: none\n")
    assert main(["rank", str(tmp_path / "c.yaml"), "--backbones", "resnet18", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "LogME on 14 training scans (2 classes)" in out and "1. resnet18@none: LogME" in out


def test_demo_runs_the_multilabel_pipeline(tmp_path, capsys):
    """``medtl demo --task multilabel``: synthetic findings -> train -> evaluate -> predict, with a
    probability and a decision per finding in the table and a macro AUROC in the headline."""
    import csv
    import json

    from medtl.cli import main
    from medtl.io.synthetic import FINDINGS

    assert main(["demo", "--task", "multilabel", "--out", str(tmp_path), "--set", "train.epochs=1",
                 "--set", "data.image_size=[32, 32]"]) == 0
    meta = json.loads((tmp_path / "run" / "bundle" / "bundle.json").read_text())
    assert meta["task"] == {"type": "multilabel", "labels": list(FINDINGS)}
    rows = list(csv.DictReader(open(tmp_path / "predictions.csv")))
    assert len(rows) == 100 and {f"prob_{f}" for f in FINDINGS} | {f"pred_{f}" for f in FINDINGS} <= set(rows[0])
    metrics = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert set(metrics["per_label"]) == set(FINDINGS)
    assert f"macro AUROC {metrics['calibrated']['auroc']['auc']:.4f}" in capsys.readouterr().out
