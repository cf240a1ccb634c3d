"""ImageNet weights through the torch hub cache: offline error, checksum, and a real-layout load."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torchvision

from medtl.backbones import ChecksumError, WeightsNotFoundError, create, imagenet_checkpoint, sha256_file
from medtl.backbones import sources as sources_module


def test_offline_error_names_file_url_and_folder(offline_caches):
    cache = offline_caches / "torch_home" / "hub" / "checkpoints"
    with pytest.raises(WeightsNotFoundError) as err:
        create("resnet18", weights="imagenet")
    message = str(err.value)
    assert "resnet18-f37072fd.pth" in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert f"in {cache}" in message


def _write_cache_file(name: str, state: dict) -> Path:
    path, _, _ = imagenet_checkpoint(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def test_checkpoint_with_wrong_sha256_is_refused():
    path = _write_cache_file("resnet18", torchvision.models.resnet18().state_dict())
    with pytest.raises(ChecksumError, match=re.escape(f"{path}: sha256")):
        create("resnet18", weights="imagenet")


def _trust_file_as_published(monkeypatch, path: Path) -> None:
    """A random-weights file cannot carry torchvision's published hash; let the test's own file
    stand in for it, so the rest of the path (hash check included) runs for real."""
    digest = sha256_file(path)
    monkeypatch.setattr(sources_module, "_torchvision_hash_prefix", lambda file_name: digest[:8])


def test_imagenet_load_from_cache(monkeypatch):
    state = torchvision.models.resnet18().state_dict()
    path = _write_cache_file("resnet18", state)
    _trust_file_as_published(monkeypatch, path)
    model = create("resnet18", weights="imagenet", in_channels=1, num_classes=2)
    report = model.load_report
    assert report.ok and report.file == str(path)
    assert report.adapted == {"conv1.weight": "3 -> 1 input channels (summed)"}
    assert len(report.loaded) == len(state) - 3  # all but conv1 and the ImageNet fc
    got = model.backbone.state_dict()
    assert torch.equal(got["layer3.1.bn2.running_var"], state["layer3.1.bn2.running_var"])
    assert model.preprocessing["mean"] == 0.449


def test_densenet_checkpoint_legacy_key_names(monkeypatch):
    """torchvision's published DenseNet files use 'norm.1'-style keys; they map onto the model."""
    state = torchvision.models.densenet121().state_dict()
    legacy = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v for k, v in state.items()}
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    path = _write_cache_file("densenet121", legacy)
    _trust_file_as_published(monkeypatch, path)
    model = create("densenet121", weights="imagenet", in_channels=3)
    assert model.load_report.ok and not model.load_report.adapted
    got = model.backbone.state_dict()
    for key, tensor in state.items():
        if not key.startswith("classifier."):
            assert torch.equal(got[key], tensor), key
