"""The Python API of a loaded bundle: one path or any iterable, in-memory arrays through the
bundle's own preprocessing, class names, device="auto", and logits() refusing raw input."""

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from helpers import write_tiny_bundle
from medtl.bundle import load
from medtl.io.synthetic import chest_phantom, write_dicom


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
    return load(write_tiny_bundle(tmp_path_factory.mktemp("bundle")), device="auto")


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("scans")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        image = chest_phantom(rng, 48, bool(i % 2))
        image[:6, :10] = image.max()  # asymmetric, so a transposed read would differ
        write_dicom(folder / f"s{i}.dcm", image, patient=f"{i}", uid_seed=f"a{i}")
        paths.append(folder / f"s{i}.dcm")
    return paths


def test_device_auto_and_one_path_or_any_iterable(predictor, scans):
    assert predictor.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    many = predictor.predict_proba(scans)
    assert many.shape == (3, 2) and np.allclose(many.sum(axis=1), 1)
    assert np.allclose(predictor.predict_proba(str(scans[1])), many[1:2], atol=1e-6)
    assert np.allclose(predictor.predict_proba(scans[1]), many[1:2], atol=1e-6)
    assert np.allclose(predictor.predict_proba(p for p in scans), many, atol=1e-6)
    assert np.allclose(predictor.predict_proba(tuple(map(str, scans))), many, atol=1e-6)
    with pytest.raises(TypeError, match="expected scan paths"):
        predictor.predict_proba([np.zeros((4, 4))])


def test_predict_gives_class_names_at_the_operating_point(predictor, scans):
    names = predictor.predict(scans)
    probs = predictor.predict_proba(scans)
    threshold = predictor.operating_point.threshold
    assert names == ["opacity" if p >= threshold else "normal" for p in probs[:, 1]]
    assert predictor.predict(scans[0]) == names[:1]


def test_predict_array_equals_the_file_path(predictor, scans):
    """pydicom's pixel_array (rows x columns, as displayed) gives what the file gives; so does a
    torch tensor, a PNG read with PIL, and a list of arrays."""
    from_files = predictor.predict_proba(scans)
    arrays = [pydicom.dcmread(p).pixel_array for p in scans]
    assert np.allclose(predictor.predict_array(arrays[0]), from_files[:1], atol=1e-5)
    assert np.allclose(predictor.predict_array(torch.as_tensor(arrays[2].astype(np.float32))), from_files[2:], atol=1e-5)
    assert np.allclose(predictor.predict_array(arrays), from_files, atol=1e-5)
    png = scans[0].with_suffix(".png")
    Image.fromarray((arrays[0] >> 4).astype(np.uint8)).save(png)  # 12 bits stored -> 8
    assert np.allclose(predictor.predict_array(np.asarray(Image.open(png))), predictor.predict_proba(png), atol=1e-5)
    nan = arrays[0].astype(np.float32)
    nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        predictor.predict_array(nan)


def test_logits_refuses_raw_images(predictor, scans):
    raw = torch.as_tensor(pydicom.dcmread(scans[0]).pixel_array.astype(np.float32))
    with pytest.raises(ValueError, match="preprocessed batches of shape"):
        predictor.logits(raw[None, None])
    size = predictor.preprocessing["image_size"]
    with pytest.raises(ValueError, match="use predict_array"):
        predictor.logits(torch.full((1, 1, *size), 3000.0))
    chain = predictor.transforms()
    ready = torch.stack([chain({"image": str(p)})["image"] for p in scans])
    assert predictor.logits(ready).shape == (3, 2)


def test_logits_checks_only_the_shape_when_the_recipe_has_no_fixed_range(tmp_path):
    """Without an intensity preset the bundle's own inputs keep their raw range: not refused."""
    raw = load(write_tiny_bundle(tmp_path / "b", intensity="none"))
    size = raw.preprocessing["image_size"]
    assert raw.logits(torch.full((2, 1, *size), 500.0)).shape == (2, 2)
