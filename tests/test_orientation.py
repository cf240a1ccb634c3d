"""Orientation: 2D images reach the network as displayed (pydicom's pixel_array, rows x columns)
from DICOM, PNG and NIfTI alike; Grad-CAM overlays show a top-left marker top-left, at least
256 px; bundles from before the display layout keep the input they were trained on."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from helpers import write_tiny_bundle
from medtl.bundle import load
from medtl.infer import CamWriter
from medtl.infer.cam import MIN_SIDE
from medtl.io.synthetic import write_dicom
from medtl.transforms import DISPLAY_LAYOUT, IMAGE, build_transforms

ROWS, COLS = 40, 56


def _marked() -> np.ndarray:
    """A dim, smooth image (rows x columns) with a bright 6 x 18 block in the top-left corner."""
    rows, cols = np.mgrid[0:ROWS, 0:COLS]
    image = 0.2 + 0.1 * np.sin(rows / 7.0) * np.cos(cols / 11.0)
    image[:6, :18] = 1.0
    return image


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("marked")
    image = _marked()
    write_dicom(folder / "m.dcm", image, patient="1", uid_seed="m")
    Image.fromarray((image * 255).astype(np.uint8)).save(folder / "m.png")
    # NIfTI: the first voxel axis runs along a row (x), the second down the image (MONAI's layout)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(image.T[:, :, None].astype(np.float32)), np.eye(4)), str(folder / "m.nii.gz"))
    return {"dicom": folder / "m.dcm", "png": folder / "m.png", "nifti": folder / "m.nii.gz"}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    new = write_tiny_bundle(tmp_path_factory.mktemp("new"), image_size=[ROWS, COLS])
    old = write_tiny_bundle(tmp_path_factory.mktemp("old"), image_size=[COLS, ROWS], layout=None)
    return {"new": new, "old": old}


def _marker_box(image: np.ndarray) -> tuple[slice, ...]:
    bright = np.argwhere(image > image.min() + 0.8 * np.ptp(image))
    return tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(bright.min(axis=0), bright.max(axis=0)))


@pytest.mark.parametrize("kind", ["dicom", "png", "nifti"])
def test_network_input_is_the_image_as_displayed(files, bundles, kind):
    pre = load(bundles["new"]).preprocessing
    assert pre["layout"] == DISPLAY_LAYOUT
    seen = build_transforms(pre)({IMAGE: str(files[kind])})[IMAGE][0].numpy()
    displayed = pydicom.dcmread(files["dicom"]).pixel_array.astype(np.float64)
    assert seen.shape == displayed.shape == (ROWS, COLS)
    assert _marker_box(seen) == (slice(0, 6), slice(0, 18))
    assert np.corrcoef(seen.ravel(), displayed.ravel())[0, 1] > 0.99


def test_bundles_without_the_layout_keep_their_columns_first_input(files, bundles):
    pre = load(bundles["old"]).preprocessing
    seen = build_transforms(pre)({IMAGE: str(files["dicom"])})[IMAGE][0].numpy()
    assert seen.shape == (COLS, ROWS) and _marker_box(seen) == (slice(0, 18), slice(0, 6))


@pytest.mark.parametrize("which", ["new", "old"])
def test_cam_overlay_shows_the_marker_top_left_at_256_px(files, bundles, which, tmp_path):
    predictor = load(bundles[which])
    batch = torch.stack([predictor.transforms()({IMAGE: str(files["dicom"])})[IMAGE]])
    writer = CamWriter(predictor, tmp_path)
    writer.write(["m.dcm"], batch)
    picture = np.asarray(Image.open(writer.path("m.dcm")).convert("L"), dtype=np.float64)
    assert min(picture.shape) >= MIN_SIDE and picture.shape[1] > picture.shape[0]  # wider than tall, like the scan
    small = np.asarray(Image.fromarray(picture.astype(np.uint8)).resize((COLS, ROWS), Image.Resampling.BILINEAR), dtype=np.float64)
    displayed = pydicom.dcmread(files["dicom"]).pixel_array.astype(np.float64)
    assert np.corrcoef(small.ravel(), displayed.ravel())[0, 1] > 0.8
    assert small[:6, :18].mean() > small[:6, -18:].mean() + 20 and small[:6, :18].mean() > small[-6:, :18].mean() + 20
