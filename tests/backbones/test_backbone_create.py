"""create(): the classifier contract, stem adaptation, plain state-dict files and the load report."""

from __future__ import annotations

import logging

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from medtl.backbones import (
    WeightsFormatError,
    WeightsMismatchError,
    WeightsNotFoundError,
    create,
    get_spec,
    list_backbones,
    preprocessing_for,
)


def _save(module: torch.nn.Module, path) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in module.state_dict().items()}
    torch.save(state, path)
    return state


def test_classifier_contract():
    model = create("resnet18", in_channels=1, num_classes=3).eval()
    x = torch.randn(2, 1, 32, 32)
    assert model.forward_features(x).shape == (2, model.feature_dim) == (2, 512)
    assert model(x).shape == (2, 3)
    tv_keys = {k for k in torchvision.models.resnet18().state_dict() if not k.startswith("fc.")}
    keys = set(model.state_dict())
    assert {k.removeprefix("backbone.") for k in keys if k.startswith("backbone.")} == tv_keys
    assert keys - {f"backbone.{k}" for k in tv_keys} == {"head.weight", "head.bias"}
    model.reset_head(5)
    assert model(x).shape == (2, 5)
    assert model.spec is get_spec("resnet18") and model.spec.cam_layer == "layer4"
    assert model.load_report.source == "none" and model.preprocessing["source"] == "none"


def test_registry_lists_the_required_backbones():
    names = set(list_backbones(2))
    for required in ["resnet18", "resnet34", "resnet50", "resnet101", "densenet121", "densenet169", "convnext_tiny",
                     "convnext_small", "vit_b_16", "swin_t", "mobilenet_v3_large"] + [f"efficientnet_b{i}" for i in range(5)]:
        assert required in names
    assert set(list_backbones(3)) == {"resnet10", "resnet18", "resnet34", "resnet50", "resnet18_proj", "resnet34_proj", "densenet121",
                                      "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"}
    assert get_spec("resnet10").dims == 3 and get_spec("resnet18").spatial_dims == (2, 3)
    with pytest.raises(KeyError, match="unknown backbone"):
        get_spec("resnet9000")
    with pytest.raises(KeyError, match="not built in 3D"):
        get_spec("vit_b_16", 3)


@pytest.mark.parametrize("in_channels", [1, 3, 4, 6])
def test_state_dict_file_adapts_the_stem(tmp_path, in_channels):
    source = torchvision.models.resnet18()
    state = _save(source, tmp_path / "rn18.pth")
    model = create("resnet18", weights=str(tmp_path / "rn18.pth"), in_channels=in_channels)
    report = model.load_report
    assert report.ok and report.dropped == ["fc.weight", "fc.bias"]
    got = model.backbone.state_dict()
    for key, tensor in state.items():
        if key.startswith("fc.") or key == "conv1.weight":
            continue
        assert torch.equal(got[key], tensor), key
    if in_channels == 3:
        assert torch.equal(got["conv1.weight"], state["conv1.weight"]) and not report.adapted
    elif in_channels == 4:  # tiled R, G, B, R and rescaled by 3/4
        rgb = state["conv1.weight"]
        torch.testing.assert_close(got["conv1.weight"], torch.cat([rgb, rgb[:, :1]], 1) * 0.75)
    else:
        assert list(report.adapted) == ["conv1.weight"]
        assert got["conv1.weight"].shape[1] == in_channels
        # Identical channels give the RGB network's response exactly.
        source.fc = torch.nn.Identity()
        source.eval(), model.eval()
        grey = torch.rand(2, 1, 64, 64)
        torch.testing.assert_close(model.forward_features(grey.repeat(1, in_channels, 1, 1)),
                                   source(grey.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-5)
    if in_channels == 1:
        torch.testing.assert_close(got["conv1.weight"], state["conv1.weight"].sum(1, keepdim=True))


def test_medtl_classifier_state_dict_and_safetensors(tmp_path):
    trained = create("resnet18", in_channels=1, num_classes=2)
    save_file(trained.state_dict(), str(tmp_path / "model.safetensors"))
    again = create("resnet18", weights=str(tmp_path / "model.safetensors"), in_channels=1)
    assert again.load_report.ok and not again.load_report.adapted
    assert sorted(again.load_report.dropped) == ["head.bias", "head.weight"]
    for key, tensor in trained.backbone.state_dict().items():
        assert torch.equal(again.backbone.state_dict()[key], tensor)


def test_mismatch_is_an_error_unless_allowed(tmp_path, caplog):
    _save(torchvision.models.resnet34(), tmp_path / "rn34.pth")
    with pytest.raises(WeightsMismatchError, match="unexpected layer1.2"):
        create("resnet18", weights=str(tmp_path / "rn34.pth"))
    _save(torchvision.models.resnet18(num_classes=10), tmp_path / "rn18.pth")
    with pytest.raises(WeightsMismatchError, match="layer4.1.bn2.weight"):
        _save_truncated(tmp_path)
        create("resnet18", weights=str(tmp_path / "partial.pth"))
    with caplog.at_level(logging.INFO, logger="medtl.backbones"):
        model = create("resnet18", weights=str(tmp_path / "partial.pth"), allow_mismatch=True)
    report = model.load_report
    assert report.missing == ["layer4.1.bn2.weight", "layer4.1.bn2.bias"] and not report.ok
    assert "2 missing" in caplog.text and "loaded with mismatches" in caplog.text


def _save_truncated(tmp_path):
    state = torchvision.models.resnet18().state_dict()
    del state["layer4.1.bn2.weight"], state["layer4.1.bn2.bias"]
    torch.save(state, tmp_path / "partial.pth")


def test_shape_mismatch_is_reported(tmp_path):
    state = torchvision.models.resnet18().state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 5, 5)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(WeightsMismatchError, match=r"layer1.0.conv1.weight: weights \(64, 64, 5, 5\) vs model \(64, 64, 3, 3\)"):
        create("resnet18", weights=str(tmp_path / "bad.pth"))


def test_pickled_module_is_refused(tmp_path):
    torch.save(torchvision.models.resnet18(), tmp_path / "whole_model.pt")
    with pytest.raises(WeightsFormatError, match="whole_model.pt: cannot be read as a state dict with weights_only=True"):
        create("resnet18", weights=str(tmp_path / "whole_model.pt"))
    with pytest.raises(WeightsNotFoundError, match="nowhere.pth: weights file not found"):
        create("resnet18", weights=str(tmp_path / "nowhere.pth"))


def test_preprocessing_for_sources():
    assert preprocessing_for("resnet18", "imagenet") == {
        "source": "imagenet", "kind": "mean_std", "mean": 0.449, "std": 0.226, "resolution": 224}
    assert preprocessing_for("resnet18", "imagenet", in_channels=3)["mean"] == [0.485, 0.456, 0.406]
    assert preprocessing_for("densenet121", "torchxrayvision:x.pt")["range"] == [-1024.0, 1024.0]
    assert preprocessing_for("resnet18", "medicalnet")["kind"] == "zscore"
    assert preprocessing_for("resnet18", "/some/file.pth")["source"] == "file"
    with pytest.raises(KeyError, match="no 'radimagenet' weights"):
        preprocessing_for("resnet18", "radimagenet")
