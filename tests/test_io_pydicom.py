"""Every file in pydicom's bundled test data, and nibabel's bundled NIfTI, through ScanReader.

Files nobody here wrote: each either loads with the shape and values pydicom itself decodes
(modality LUT applied, MONOCHROME1 inverted, palette mapped) or fails with a ScanReadError whose
message names the file and the reason.  The table below is the expected outcome of every file, so
a regression (or a new file in a pydicom upgrade) fails loudly.
"""

import logging
from fnmatch import fnmatch
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_files
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from medtl.io import ScanReader, ScanReadError
from medtl.transforms import build_transforms, make_preprocessing

ROOT = next(p for p in Path(get_testdata_files()[0]).parents if p.name == "test_files")
NIBABEL_DATA = Path(nibabel.__file__).parent / "tests" / "data"

# Loads: the (columns, rows[, slices/frames][, 3]) shape.
LOADS = {
    "693_J2KI.dcm": (512, 512),
    "CT_small.dcm": (128, 128),
    "ExplVR_BigEnd.dcm": (80, 60, 3),
    "GDCMJ2K_TextGBR.dcm": (400, 400, 3),
    "J2K_pixelrep_mismatch.dcm": (512, 512),
    "JPEG2000.dcm": (256, 1024),
    "JPEGLSNearLossless_08.dcm": (10, 45),
    "JPEGLSNearLossless_16.dcm": (10, 50),
    "JPGExtended.dcm": (256, 1024),
    "MR_small.dcm": (64, 64),
    "MR_small_RLE.dcm": (64, 64),
    "MR_small_bigendian.dcm": (64, 64),
    "MR_small_expb.dcm": (64, 64),
    "MR_small_implicit.dcm": (64, 64),
    "MR_small_jp2klossless.dcm": (64, 64),
    "MR_small_jpeg_ls_lossless.dcm": (64, 64),
    "MR_small_padded.dcm": (64, 64),
    "SC_jpeg_no_color_transform*.dcm": (256, 256, 3),
    "SC_rgb_dcmtk_+eb+*.dcm": (100, 100, 3),
    "SC_rgb_gdcm_KY.dcm": (100, 100, 3),
    "SC_rgb_jls_lossy_*.dcm": (100, 100, 3),
    "SC_rgb_jpeg.dcm": (256, 256, 3),
    "SC_rgb_jpeg_app14_dcmd.dcm": (256, 256, 3),
    "SC_rgb_jpeg_dcmd.dcm": (256, 256, 3),
    "SC_rgb_jpeg_dcmtk.dcm": (100, 100, 3),
    "SC_rgb_jpeg_gdcm.dcm": (100, 100, 3),
    "SC_rgb_jpeg_lossy_gdcm.dcm": (100, 100, 3),
    "SC_rgb_rle.dcm": (100, 100, 3),
    "SC_rgb_rle_16bit.dcm": (100, 100, 3),
    "SC_rgb_rle_32bit.dcm": (100, 100, 3),
    "SC_rgb_rle*_2frame.dcm": (100, 100, 2, 3),
    "SC_rgb_small_odd*.dcm": (3, 3, 3),
    "SC_ybr_full_422_uncompressed.dcm": (100, 100, 3),
    "examples_jpeg2k.dcm": (640, 480, 3),
    "examples_overlay.dcm": (484, 300),
    "examples_palette.dcm": (800, 350, 3),
    "examples_rgb_color.dcm": (320, 240, 3),
    "examples_ybr_color.dcm": (320, 240, 30, 3),
    "image_dfl.dcm": (512, 512),
    "liver*_1frame.dcm": (512, 512),
    "rtdose*_1frame.dcm": (10, 10),
    "rtdose.dcm": (10, 10, 15),  # multi-frame placed by GridFrameOffsetVector
    "rtdose_expb.dcm": (10, 10, 15),
    "rtdose_rle.dcm": (10, 10, 15),
    "dicomdirtests/*/C[RT]*/*": (16, 16),  # single CR (MONOCHROME1) and CT slices
    "dicomdirtests/*/MR*/*": (16, 16),
    "dicomdirtests/77654033/CR?": (16, 16),  # a folder holding one file
    "dicomdirtests/77654033/CT2": (16, 16, 4),  # a series folder
    "dicomdirtests/98892001/CT5N": (16, 16, 5),
}

# Fails: a fragment of the reason.
FAILS = {
    "JPEG-lossy.dcm": "JPEG Extended (Process 2 and 4) (1.2.840.10008.1.2.4.51) with the installed decoders",
    "JPEG2000-embedded-sequence-delimiter.dcm": "JPEG 2000 Image Compression (1.2.840.10008.1.2.4.91) with the installed",
    "MR_truncated.dcm": "pixel data cannot be read (Explicit VR Little Endian): The number of bytes of pixel data is less",
    "badVR.dcm": "pixel data cannot be read",
    "meta_missing_tsyntax.dcm": "pixel data cannot be read (unknown transfer syntax)",
    "nested_priv_SQ.dcm": "Bits Allocated",
    "no_meta.dcm": "not a DICOM file",
    "ExplVR_*EndNoMeta.dcm": "no pixel data: RTPLAN (RT Ion Plan Storage), not an image",
    "rtplan*.dcm": "no pixel data: RTPLAN (RT Plan Storage)",
    "rtstruct.dcm": "no pixel data: RTSTRUCT",
    "reportsi*.dcm": "no pixel data: SR (Basic Text SR Storage)",
    "test-SR.dcm": "no pixel data: SR (Comprehensive SR Storage)",
    "waveform_ecg.dcm": "no pixel data: ECG (12-lead ECG Waveform Storage)",
    "UN_sequence.dcm": "no pixel data: CT Image Storage",
    "empty_charset_LEI.dcm": "no pixel data: DICOM object of unknown type",
    "no_meta_group_length.dcm": "no pixel data: RT Image Storage",
    "priv_SQ.dcm": "no pixel data: MR Image Storage",
    "dicomdirtests/DICOMDIR*": "no pixel data: Media Storage Directory Storage",
    "dicomdirtests/TINY_ALPHA/DICOMDIR": "no pixel data: Media Storage Directory Storage",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM*": "no pixel data: CT (CT Image Storage)",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000": "no DICOM images in this folder (50 DICOM objects without an image)",
    "dicomdirtests/TINY_ALPHA": "no DICOM images in this folder (1 DICOM objects",
    "dicomdirtests": "no DICOM images in this folder (7 DICOM objects",
    "dicomdirtests/77654033": "no DICOM images in this folder",  # folders of folders
    "dicomdirtests/98892001": "no DICOM images in this folder",
    "dicomdirtests/98892003": "no DICOM images in this folder",
    "dicomdirtests/TINY_ALPHA/PT000000": "no DICOM images in this folder",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000": "no DICOM images in this folder",
    "dicomdirtests/98892001/CT2N": "mixed orientations",
    "dicomdirtests/98892003/MR700": "mixed orientations",
    "dicomdirtests/98892003/MR[12]": "holds 3 DICOM series",
    "*README*": "not a scan medtl reads",
    "*.json": "not a scan medtl reads",
    "*.dump": "not a scan medtl reads",
    "crayons.icc": "not a scan medtl reads",
    "zipMR.gz": "not a scan medtl reads",
}

FILES = sorted(str(Path(f).relative_to(ROOT)) for f in get_testdata_files())


def _expected(name: str):
    """The first matching entry: loads first (so 'dicomdirtests/*/MR*/*' beats the folder rules)."""
    for table in (LOADS, FAILS):
        for pattern, outcome in table.items():
            if fnmatch(name, pattern):
                return outcome
    pytest.fail(f"{name}: a file in pydicom's test data with no expected outcome; add it to LOADS or FAILS")


def _reference(path: Path) -> np.ndarray:
    """pydicom's own decode, in display values: modality LUT for grey, palette for PALETTE COLOR."""
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    photometric = ds.PhotometricInterpretation
    if photometric == "PALETTE COLOR":
        return apply_color_lut(pixels, ds)
    if photometric.startswith("MONOCHROME"):
        return apply_modality_lut(pixels, ds)
    return pixels


def _check_values(path: Path, array: np.ndarray) -> None:
    """Single frames equal pydicom's decode transposed to (columns, rows); MONOCHROME1 comes out
    as exactly the negative plus a constant; multi-frame volumes hold the same values."""
    reference = np.asarray(_reference(path), dtype=np.float64)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        np.testing.assert_allclose(np.sort(array.ravel()), np.sort(reference.ravel()), rtol=1e-5, atol=1e-3)
        return
    reference = np.swapaxes(reference, 0, 1)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        total = array + reference
        assert np.ptp(total) < 1e-3 and np.ptp(reference) > 0, "MONOCHROME1 is not inverted"
    else:
        np.testing.assert_allclose(array, reference, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("name", FILES)
def test_pydicom_test_file_loads_or_fails_with_named_reason(name, caplog):
    path = ROOT / name
    expected = _expected(name)
    reader = ScanReader()
    with caplog.at_level(logging.ERROR):
        if isinstance(expected, tuple):
            array, meta = reader.get_data(reader.read(str(path)))
            assert array.shape == expected
            assert np.isfinite(array).all()
            if path.is_file():
                _check_values(path, array)
            assert "PatientName" not in meta and "PatientID" not in meta
        else:
            with pytest.raises(ScanReadError) as info:
                reader.read(str(path))
            assert info.value.path == str(path)
            assert str(path) in str(info.value)
            assert expected in info.value.reason


@pytest.mark.parametrize(
    "name, syntax, package",
    [
        ("MR_small_RLE.dcm", RLELossless, "pylibjpeg-rle"),
        ("MR_small_jp2klossless.dcm", JPEG2000Lossless, "pylibjpeg-openjpeg"),
        ("MR_small_jpeg_ls_lossless.dcm", JPEGLSLossless, "pylibjpeg-libjpeg"),
    ],
)
def test_missing_decoder_names_the_transfer_syntax_and_package(monkeypatch, name, syntax, package):
    monkeypatch.setattr(get_decoder(syntax), "_available", {})  # as on a machine without the codecs extra
    with pytest.raises(ScanReadError) as info:
        ScanReader().read(str(ROOT / name))
    message = str(info.value)
    assert name in message and syntax.name in message and str(syntax) in message
    assert package in message and "pip install 'medtl[codecs]'" in message


def test_rtdose_frames_are_placed_along_the_normal():
    array, meta = ScanReader().get_data(ScanReader().read(str(ROOT / "rtdose.dcm")))
    ds = pydicom.dcmread(ROOT / "rtdose.dcm", stop_before_pixels=True)
    offsets = np.asarray(ds.GridFrameOffsetVector, dtype=float)
    assert meta["spacing"][2] == pytest.approx(np.median(np.diff(offsets)))
    assert meta["slice_spacing_uniform"]


# --- nibabel's bundled NIfTI ---------------------------------------------------------------

def _chain(size):
    pre = make_preprocessing(spatial_dims=3, image_size=size, channels=1, intensity="mr", ct_window=(40, 400),
                             normalization={"kind": "zscore"})
    return build_transforms(pre)


def test_nibabel_anatomical_loads_as_3d_volume():
    path = NIBABEL_DATA / "anatomical.nii"
    array, meta = ScanReader().get_data(ScanReader().read(str(path)))
    reference = np.asanyarray(nibabel.load(path).dataobj)
    assert array.shape == reference.shape == (33, 41, 25)
    np.testing.assert_allclose(array, reference)
    np.testing.assert_allclose(meta["pixdim"][1:4], 2.0)
    out = _chain(16)({"image": str(path)})["image"]
    assert tuple(out.shape) == (1, 16, 16, 16) and np.isfinite(out.numpy()).all()


def test_nibabel_4d_series_given_to_a_3d_model_is_a_named_error():
    path = NIBABEL_DATA / "example4d.nii.gz"
    array, _ = ScanReader().get_data(ScanReader().read(str(path)))
    assert array.shape == (128, 96, 24, 2)
    with pytest.raises(ScanReadError, match="4D") as info:
        _chain(16)({"image": str(path)})
    assert str(path) in str(info.value)
