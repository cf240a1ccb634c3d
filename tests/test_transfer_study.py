"""Smoke run of scripts/transfer_study.py --quick on a few real scans of the shared data."""

import csv
import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.shared_data,
    pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not present on this machine"),
]


def _load_script():
    sys.path.insert(0, str(ROOT / "scripts"))
    return importlib.import_module("transfer_study")


def test_nested_stratified_subsets():
    data = _load_script().data
    labels = np.array([0] * 30 + [1] * 70)
    small, large = (data.stratified_subset(labels, f, seed=1) for f in (0.1, 0.5))
    assert set(small) <= set(large)
    assert np.bincount(labels[small]).tolist() == [3, 7] and np.bincount(labels[large]).tolist() == [15, 35]
    assert data.stratified_subset(labels, 0.01, seed=1).size == 2  # at least one per class
    assert not np.array_equal(small, data.stratified_subset(labels, 0.1, seed=2))


def test_quick_study_end_to_end(tmp_path):
    study = _load_script()
    argv = ["--quick", "--data", str(DATA), "--work", str(tmp_path), "--fractions", "1", "--limit", "16", "--mednist-per-class", "8"]
    assert study.main(argv) == 0
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert {(r["task"], r["method"]) for r in rows} >= {
        ("pneumonia", "scratch"), ("pneumonia", "mednist_linear_probe"), ("pneumonia", "mednist_full"),
        ("pneumonia", "mednist_lp_ft"), ("adrenal3d", "scratch"), ("adrenal3d", "mednist_full"),
        ("pneumonia", "lite_scratch"), ("pneumonia", "lite_imagenet_full"),
        ("adrenal3d", "lite_scratch"), ("adrenal3d", "lite_imagenet_full"),
    }
    lite3d = (tmp_path / "runs" / "adrenal3d" / "lite_imagenet_full" / "frac1_seed0" / "config.yaml").read_text()
    assert "inflation: centre" in lite3d and "backbone: efficientnet_lite0" in lite3d
    lite = next(r for r in rows if r["method"] == "lite_imagenet_full" and r["task"] == "pneumonia")
    assert (lite["backbone"], lite["weights"]) == ("efficientnet_lite0", "imagenet")
    for row in rows:
        assert 0 <= float(row["auroc_lo"]) <= float(row["auroc"]) <= float(row["auroc_hi"]) <= 1
        assert 0 <= float(row["ece_after"]) <= 1 and float(row["train_seconds"]) > 0
        if row["method"] != "scratch":
            assert row["delta_lo"] and float(row["delta_lo"]) <= float(row["delta_auroc"]) <= float(row["delta_hi"])
    # every method saw the same training subset, and the source bundle is what the transfer runs loaded
    manifest = tmp_path / "data" / "pneumonia" / "manifests" / "seed0_frac1.csv"
    assert sum(1 for r in csv.DictReader(open(manifest)) if r["split"] == "train") == int(rows[0]["n_train"])
    config = (tmp_path / "runs" / "pneumonia" / "mednist_full" / "frac1_seed0" / "config.yaml").read_text()
    assert f"bundle:{tmp_path / 'runs' / 'mednist_source' / 'bundle'}" in config
    assert "Δ AUROC vs scratch" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "transfer_pneumonia.png").stat().st_size > 10_000
    assert (tmp_path / "transfer_adrenal3d.png").is_file()
