"""2D -> 3D inflation: a volume constant along depth gives the 2D network's answer on the slice."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from medtl.backbones import create, imagenet_checkpoint, inflate_to_3d, sha256_file
from medtl.backbones import sources as sources_module


def test_mean_inflation_matches_2d_inside_the_volume():
    weight, bias = torch.randn(8, 3, 3, 3), torch.randn(8)
    image = torch.randn(1, 3, 16, 16)
    volume = image.unsqueeze(2).repeat(1, 1, 9, 1, 1)
    flat = F.conv2d(image, weight, bias, padding=1)
    inflated = F.conv3d(volume, inflate_to_3d(weight, 3, "mean"), bias, padding=1)
    for depth in range(1, 8):  # away from the zero-padded depth borders
        torch.testing.assert_close(inflated[:, :, depth], flat, rtol=1e-5, atol=1e-5)
    centred = F.conv3d(volume, inflate_to_3d(weight, 3, "centre"), bias, padding=1)
    for depth in range(9):  # every slice, borders included
        torch.testing.assert_close(centred[:, :, depth], flat, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown inflation mode"):
        inflate_to_3d(weight, 3, "spread")


@pytest.mark.parametrize("name2d, name3d, convolutions", [("resnet50", "resnet50", 53), ("resnet18", "resnet18_proj", 20)])
def test_imagenet_resnet_initialises_its_3d_twin(monkeypatch, name2d, name3d, convolutions):
    """The ImageNet file in the torch cache inflates into MONAI's 3D ResNet (projection shortcuts);
    a constant-depth volume through the 3D net equals the 2D net on the slice."""
    net2d = getattr(torchvision.models, name2d)()
    for m in net2d.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    path = imagenet_checkpoint(name2d)[0]
    path.parent.mkdir(parents=True)
    torch.save(net2d.state_dict(), path)
    digest = sha256_file(path)
    monkeypatch.setattr(sources_module, "_torchvision_hash_prefix", lambda name: digest[:8])

    flat = create(name2d, weights="imagenet", in_channels=1).eval()
    twin = create(name3d, weights="imagenet", in_channels=1, spatial_dims=3, inflation="centre").eval()
    report = twin.load_report
    assert report.ok and report.adapted["conv1.weight"] == "2D -> 3D (centre over depth 7); 3 -> 1 input channels (summed)"
    assert not report.missing and not report.unexpected
    assert len(report.adapted) == convolutions  # every convolution
    image = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        expected = flat.forward_features(image)
        got = twin.forward_features(image.unsqueeze(2).repeat(1, 1, 8, 1, 1))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
