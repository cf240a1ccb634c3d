"""Scan I/O: manifests and splits, the DICOM reader on synthetic files and series, discovery."""

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medtl.io import (
    ManifestError,
    ScanReader,
    ScanReadError,
    assign_splits,
    find_scans,
    load_dicom,
    read_manifest,
    write_synthetic,
)
from medtl.io.synthetic import write_dicom
from medtl.transforms import build_transforms, make_preprocessing

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def write_ct_slice(path: Path, pixels: np.ndarray, *, z: float, instance: int, series: str, iop=(1, 0, 0, 0, 1, 0),
                   rows_cols=None, slope=1.0, intercept=-1024.0) -> None:
    """A minimal valid CT Image Storage slice at height ``z``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.StudyInstanceUID = series, "1.2.3.4"
    ds.Modality = "CT"
    ds.PatientName, ds.PatientID = "DOE^JANE", "MRN-12345"
    ds.InstanceNumber = instance
    ds.ImageOrientationPatient = list(iop)
    ds.ImagePositionPatient = [-10.0, -20.0, z]
    ds.PixelSpacing = [0.8, 0.6]
    ds.Rows, ds.Columns = rows_cols or pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_series(folder: Path, zs, *, shuffle_instances=True, series="1.2.3.4.5") -> np.ndarray:
    """Slices whose constant value encodes their z; InstanceNumbers deliberately scrambled."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    instances = rng.permutation(len(zs)) + 1 if shuffle_instances else np.arange(len(zs)) + 1
    for i, z in enumerate(zs):
        write_ct_slice(folder / f"slice{i:03d}.dcm", np.full((6, 4), 1000 + 10 * z), z=z, instance=int(instances[i]), series=series)
    return np.asarray(zs)


# --- manifests ----------------------------------------------------------------------------

def _manifest(tmp_path: Path, text: str) -> Path:
    (tmp_path / "a.png").write_bytes(b"")
    path = tmp_path / "m.csv"
    path.write_text(text)
    return path


def test_manifest_reads_paths_relative_to_its_folder_and_keeps_extra_columns(tmp_path):
    records = read_manifest(_manifest(tmp_path, "image,label,site,scanner\na.png,opacity,A,GE\n"))
    assert records[0].image == (tmp_path / "a.png").resolve()
    assert (records[0].label, records[0].site, records[0].extra) == ("opacity", "A", {"scanner": "GE"})


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("image\na.png\n", "missing column"),
        ("image,label\n,normal\n", "row 2, column 'image'"),
        ("image,label\na.png,x\nb.png,y\n", "row 3, column 'image'"),
        ("image,label,split\na.png,x,training\n", "row 2, column 'split'"),
        ("image,label\na.png,x,extra\n", "row 2"),
    ],
)
def test_malformed_manifest_names_row_and_column(tmp_path, text, fragment):
    with pytest.raises(ManifestError, match=fragment):
        read_manifest(_manifest(tmp_path, text))


def test_assign_splits_is_patient_level_and_stratified(tmp_path):
    from medtl.io import ScanRecord

    records = [
        ScanRecord(tmp_path / f"{p}_{v}.png", label="opacity" if p % 4 == 0 else "normal", site="AB"[p % 2], patient_id=f"P{p}")
        for p in range(80)
        for v in range(1 + p % 3)
    ]
    split = assign_splits(records, val_fraction=0.25, seed=1)
    by_patient = {}
    for r in split:
        by_patient.setdefault(r.patient_id, set()).add(r.split)
    assert all(len(s) == 1 for s in by_patient.values())
    val_patients = [p for p, s in by_patient.items() if s == {"val"}]
    assert len(val_patients) == 20
    positives = [p for p in val_patients if int(p[1:]) % 4 == 0]
    assert len(positives) == 5  # a quarter of the val patients, as in the data
    assert assign_splits(records, val_fraction=0.25, seed=1) == split


# --- DICOM --------------------------------------------------------------------------------

def test_synthetic_dicom_applies_rescale_and_inverts_monochrome1(tmp_path):
    image = np.linspace(0, 1, 12 * 10).reshape(12, 10)
    write_dicom(tmp_path / "m2.dcm", image, patient="X", uid_seed="a")
    write_dicom(tmp_path / "m1.dcm", image, patient="X", uid_seed="b", monochrome1=True)
    m2, meta = load_dicom(tmp_path / "m2.dcm")
    m1, _ = load_dicom(tmp_path / "m1.dcm")
    expected = 150 + 1800 * image.T  # detector units after slope 0.5 / intercept 100, (cols, rows)
    np.testing.assert_allclose(m2, expected, atol=0.5)
    assert np.corrcoef(m1.ravel(), m2.ravel())[0, 1] > 0.999  # inverted back: brighter is brighter
    assert meta["Modality"] == "DX" and m2.shape == (10, 12)
    assert not any("SYNTHETIC" in str(v) or "SYN-" in str(v) for v in meta.values())


def test_series_sorted_by_position_not_instance_number(tmp_path):
    zs = [12.5, 0.0, 5.0, 10.0, 2.5, 7.5]  # files in scrambled order, spacing 2.5
    write_series(tmp_path / "s", zs)
    volume, meta = load_dicom(tmp_path / "s")
    assert volume.shape == (4, 6, 6)
    np.testing.assert_allclose(volume[0, 0, :], 1000 + 10 * np.sort(zs) - 1024)
    np.testing.assert_allclose(meta["spacing"], [0.6, 0.8, 2.5])
    assert meta["slice_spacing_uniform"]
    np.testing.assert_allclose(meta["affine"][:3, 3], [10.0, 20.0, 0.0])  # LPS origin (-10, -20, 0) in RAS


def test_missing_slice_warns_and_names_the_series(tmp_path, caplog):
    write_series(tmp_path / "s", [0.0, 2.5, 5.0, 10.0, 12.5])
    with caplog.at_level(logging.WARNING):
        _, meta = load_dicom(tmp_path / "s")
    assert not meta["slice_spacing_uniform"]
    assert "uneven slice spacing" in caplog.text and str(tmp_path / "s") in caplog.text


def test_duplicate_slices_two_series_and_mixed_sizes_are_errors(tmp_path):
    write_series(tmp_path / "dup", [0.0, 2.5, 2.5, 5.0])
    with pytest.raises(ScanReadError, match="share a position"):
        load_dicom(tmp_path / "dup")
    write_series(tmp_path / "two", [0.0, 2.5, 5.0], series="1.1")
    write_ct_slice(tmp_path / "two" / "other.dcm", np.zeros((6, 4)), z=0, instance=1, series="2.2")
    with pytest.raises(ScanReadError, match="holds 2 DICOM series"):
        load_dicom(tmp_path / "two")
    write_series(tmp_path / "sizes", [0.0, 2.5])
    write_ct_slice(tmp_path / "sizes" / "big.dcm", np.zeros((8, 4)), z=5.0, instance=3, series="1.2.3.4.5")
    with pytest.raises(ScanReadError, match="different sizes"):
        load_dicom(tmp_path / "sizes")


def test_stray_file_in_series_folder_is_skipped(tmp_path):
    write_series(tmp_path / "s", [0.0, 2.5, 5.0])
    (tmp_path / "s" / "notes.txt").write_text("not a scan")
    volume, _ = load_dicom(tmp_path / "s")
    assert volume.shape[-1] == 3


def test_reader_errors_name_the_file_and_reason(tmp_path):
    reader = ScanReader()
    (tmp_path / "bad.dcm").write_bytes(b"\x00" * 64)
    (tmp_path / "notes.txt").write_text("hello")
    truncated = tmp_path / "cut.dcm"
    write_dicom(truncated, np.zeros((32, 32)), patient="X", uid_seed="c")
    truncated.write_bytes(truncated.read_bytes()[:-500])
    for name, reason in (("bad.dcm", "not a DICOM file"), ("notes.txt", "not a scan"), ("cut.dcm", "pixel data"), ("gone.png", "no such file")):
        with pytest.raises(ScanReadError, match=reason) as info:
            reader.read(str(tmp_path / name))
        assert name in str(info.value)


# --- discovery and the transform chain ------------------------------------------------------

def test_find_scans_groups_series_and_keeps_radiographs_apart(tmp_path):
    write_series(tmp_path / "ct" / "s1", [0.0, 2.5, 5.0])
    write_dicom(tmp_path / "cxr" / "pa.dcm", np.zeros((8, 8)), patient="X", uid_seed="pa")
    write_dicom(tmp_path / "cxr" / "lat.dcm", np.zeros((8, 8)), patient="X", uid_seed="lat")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(tmp_path / "vol.nii.gz"))
    (tmp_path / "readme.txt").write_text("x")
    found = {str(s.path.relative_to(tmp_path)): s.n_files for s in find_scans(tmp_path)}
    assert found == {"ct/s1": 3, "cxr/lat.dcm": 1, "cxr/pa.dcm": 1, "vol.nii.gz": 1}


def test_every_synthetic_format_loads_to_the_same_orientation(tmp_path):
    paths = write_synthetic(tmp_path, seed=3, patients_per_site=6, test_per_site=3)
    records = read_manifest(paths["manifest"])
    assert {r.image.suffix for r in records} >= {".dcm", ".png"}
    pre = make_preprocessing(spatial_dims=2, image_size=32, channels=1, intensity="auto", ct_window=(40, 400),
                             normalization={"kind": "mean_std", "mean": 0.0, "std": 1.0})
    chain = build_transforms(pre)
    images = [chain({"image": str(r.image)})["image"] for r in records] + [
        chain({"image": str(p)})["image"] for p in sorted(paths["test_dir"].glob("*.dcm"))
    ]
    assert all(tuple(x.shape) == (1, 32, 32) for x in images)
    # the spine (bright, centred column) and dark lungs either side: same layout in every format
    for x in images:
        column = x[0].mean(dim=0)  # (rows, columns) as displayed: the mean down each column
        assert column[15:17].mean() > column[8:10].mean() and column[15:17].mean() > column[22:24].mean()
