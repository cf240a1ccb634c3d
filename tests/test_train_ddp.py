"""Data-parallel training under torchrun (2 gloo processes on the CPU) against one process."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import write_small_split
from medtl.train.distributed import gather_sharded

CONFIG = (
    "data:\n  manifest: small.csv\n  image_size: [32, 32]\n  num_workers: 0\n  augment: false\n"
    "model:\n  backbone: resnet18\n  weights: none\n"
    # BatchNorm on running statistics: 2 ranks x 8 images then see exactly what 1 x 16 sees
    "adapt:\n  bn: frozen_stats\n"
    "train:\n  epochs: 2\n  batch_size: 16\n  lr: 0.0003\n  head_lr: 0.0003\n  patience: 5\n  folds: 1\n"
    "report:\n  bootstrap: 100\n"
)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """32 training and 25 validation scans (odd: the validation sampler pads one duplicate)."""
    root = tmp_path_factory.mktemp("ddp")
    write_small_split(root, patients_per_site=30, n_train=32, n_val=25)
    (root / "run.yaml").write_text(CONFIG)
    return root


def _log(run):
    return list(csv.DictReader(open(run / "train_log.csv")))


def _train(cwd, out, processes, *extra):
    """``medtl train`` in a fresh process (or ``processes`` under torchrun), one thread each."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    cmd = [sys.executable, *launcher, "-m", "medtl", "train", "run.yaml", "--out", out, *extra]
    done = subprocess.run(cmd, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_two_gloo_processes_match_one_and_write_one_bundle(small_run):
    single, ddp = small_run / "single", small_run / "ddp"
    _train(small_run, "single", 1)
    assert _train(small_run, "ddp", 2).count("bundle: ") == 1  # one summary: rank 0's

    # Same global batches, gradients averaged over ranks: same validation metrics on the whole
    # (gathered, de-duplicated) validation set, up to float summation order.
    for a, b in zip(_log(single), _log(ddp), strict=True):
        assert float(b["val_loss"]) == pytest.approx(float(a["val_loss"]), rel=1e-4)
        assert float(b["val_auroc"]) == pytest.approx(float(a["val_auroc"]), abs=1e-3)
        assert float(b["train_loss"]) == pytest.approx(float(a["train_loss"]), rel=1e-4)  # reduced over ranks

    # The gathered AUROC the early stopping saw is the one rank 0 reports from an unsharded pass.
    best = max(_log(ddp), key=lambda r: (float(r["val_auroc"]), -float(r["val_loss"])))
    metrics = json.loads((ddp / "report" / "metrics.json").read_text())
    assert metrics["uncalibrated"]["auroc"]["auc"] == pytest.approx(float(best["val_auroc"]), abs=1e-5)
    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in single.iterdir())
    assert [p.parent.name for p in small_run.rglob("model.safetensors") if "ddp" in p.parts] == ["bundle"]


@pytest.mark.slow
def test_one_member_per_rank_under_torchrun_matches_one_process(small_run):
    """As many ranks as folds: each rank trains one member on its own, with the batches, seeds and
    numbers of a one-process run, and rank 0 writes every member and the one bundle."""
    single, ddp = small_run / "folds_single", small_run / "folds_ddp"
    _train(small_run, "folds_single", 1, "--folds", "2", "--set", "train.epochs=1")
    assert _train(small_run, "folds_ddp", 2, "--folds", "2", "--set", "train.epochs=1").count("bundle: ") == 1
    for member in ("fold0", "fold1"):
        for a, b in zip(_log(single / "members" / member), _log(ddp / "members" / member), strict=True):
            assert [float(b[k]) for k in ("train_loss", "val_loss", "val_auroc")] == \
                pytest.approx([float(a[k]) for k in ("train_loss", "val_loss", "val_auroc")], rel=1e-6)
        assert (ddp / "members" / member / "model.safetensors").is_file()
    bundles = [json.loads((run / "bundle" / "bundle.json").read_text()) for run in (single, ddp)]
    assert bundles[1]["model"]["members"] == 2
    assert bundles[1]["calibration"] == bundles[0]["calibration"]  # fitted on the same out-of-fold scores
    assert [p.parent.name for p in ddp.rglob("model.safetensors")].count("bundle") == 1

    # Resuming with one member unfinished: rank 0 reads fold0 back, fold1 trains again, same bundle.
    kept = (ddp / "members" / "fold0" / "model.safetensors").stat().st_mtime_ns
    (ddp / "members" / "fold1" / "member.json").unlink()
    _train(small_run, "folds_ddp", 2, "--folds", "2", "--set", "train.epochs=1", "--resume", "folds_ddp")
    assert (ddp / "members" / "fold0" / "model.safetensors").stat().st_mtime_ns == kept
    assert (ddp / "members" / "fold1" / "member.json").is_file()
    assert json.loads((ddp / "bundle" / "bundle.json").read_text())["calibration"] == bundles[0]["calibration"]


@pytest.mark.slow
def test_more_members_than_ranks_train_one_after_another_data_parallel(small_run):
    """Three folds on two ranks: members train in turn, each data-parallel: the same member logs."""
    single, ddp = small_run / "folds3_single", small_run / "folds3_ddp"
    _train(small_run, "folds3_single", 1, "--folds", "3", "--set", "train.epochs=1")
    assert _train(small_run, "folds3_ddp", 2, "--folds", "3", "--set", "train.epochs=1").count("bundle: ") == 1
    for member in ("fold0", "fold1", "fold2"):
        for a, b in zip(_log(single / "members" / member), _log(ddp / "members" / member), strict=True):
            assert float(b["val_loss"]) == pytest.approx(float(a["val_loss"]), rel=1e-4)
    assert json.loads((ddp / "bundle" / "bundle.json").read_text())["model"]["members"] == 3


def test_gather_without_process_group_cuts_padding():
    local = torch.arange(6).view(3, 2)
    np.testing.assert_array_equal(gather_sharded(local, 2).numpy(), [[0, 1], [2, 3]])
