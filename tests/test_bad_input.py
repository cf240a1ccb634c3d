"""No batch dies on one bad scan: a corpus of broken files through ``medtl predict``, non-finite
scans and outputs, missing scans in ``evaluate``, label-free manifests and scan inventories as
prediction input, empty folders, and LF line endings."""

import csv
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from helpers import write_tiny_bundle
from medtl.bundle import load
from medtl.cli import main
from medtl.infer import predict_scans, read_rows
from medtl.io.synthetic import chest_phantom, write_dicom


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return write_tiny_bundle(tmp_path_factory.mktemp("bundle"))


def _good_dicom(path: Path, seed: int = 0) -> Path:
    write_dicom(path, chest_phantom(np.random.default_rng(seed), 48, bool(seed % 2)), patient=f"{seed:03d}", uid_seed=f"g{seed}")
    return path


def _nifti(path: Path, image: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(np.ascontiguousarray(image.T[:, :, None].astype(np.float32)), np.eye(4)), str(path))
    return path


def _corpus(root: Path) -> tuple[set[str], set[str]]:
    """A folder of good and bad scans; returns (good names, bad names) relative to ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    _good_dicom(root / "good1.dcm", 1)
    _good_dicom(root / "ünïcødé 胸部.dcm", 2)
    Image.fromarray((chest_phantom(rng, 40, True) * 255).astype(np.uint8)).save(root / "good.png")
    _nifti(root / "good.nii.gz", chest_phantom(rng, 40, False))
    good = {"good1.dcm", "ünïcødé 胸部.dcm", "good.png", "good.nii.gz"}

    (root / "empty.dcm").write_bytes(b"")
    data = _good_dicom(root / "truncated.dcm", 4).read_bytes()
    (root / "truncated.dcm").write_bytes(data[: len(data) // 2])
    (root / "text.dcm").write_text("this is a note, not a scan\n" * 20)
    (root / "noise.png").write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    ds = pydicom.dcmread(_good_dicom(root / "nopixels.dcm", 5))
    del ds.PixelData
    ds.save_as(root / "nopixels.dcm")
    nan = chest_phantom(rng, 40, True)
    nan[5:9, 5:9] = np.nan
    _nifti(root / "nan.nii.gz", nan)
    (root / "zero.nii.gz").write_bytes(b"")
    os.symlink("loop.dcm", root / "loop.dcm")
    bad = {"empty.dcm", "truncated.dcm", "text.dcm", "noise.png", "nopixels.dcm", "nan.nii.gz", "zero.nii.gz", "loop.dcm"}
    return good, bad


def test_bad_input_corpus_names_every_bad_file_and_predicts_every_good_one(bundle, tmp_path, capsys):
    good, bad = _corpus(tmp_path / "scans")
    out = tmp_path / "preds.csv"
    assert main(["predict", str(bundle), str(tmp_path / "scans"), "--out", str(out), "--workers", "0", "--batch-size", "3",
                 "--device", "cpu"]) == 0
    assert {row["image"] for row in read_rows(out, "csv")} == good
    errors = {row["image"]: row["error"] for row in read_rows(tmp_path / "preds.errors.csv", "csv")}
    assert set(errors) == bad
    assert "NaN or infinite" in errors["nan.nii.gz"]
    assert "symbolic link loop" in errors["loop.dcm"]
    assert "no pixel data" in errors["nopixels.dcm"]
    assert all(reason.strip() and "\n" not in reason for reason in errors.values())
    assert b"\r\n" not in out.read_bytes() and b"\r\n" not in (tmp_path / "preds.errors.csv").read_bytes()
    assert f"failed {len(bad)}" in capsys.readouterr().out


def test_non_finite_output_fails_its_row_only(bundle, tmp_path, monkeypatch):
    """A model that returns NaN for one scan of a batch: that scan is an error, the others are predicted."""
    for i in range(4):
        _good_dicom(tmp_path / "scans" / f"s{i}.dcm", i)
    predictor = load(bundle)
    logits = predictor.logits

    def poisoned(images):
        out = logits(images)
        out[1] = np.nan
        return out

    monkeypatch.setattr(predictor, "logits", poisoned)
    summary = predict_scans(predictor, tmp_path / "scans", tmp_path / "p.csv", batch_size=4, num_workers=0, progress=False)
    assert (summary.predicted, summary.failed) == (3, 1)
    assert summary.failures == [("s1.dcm", "the model's output is NaN or infinite for this scan")]
    assert [r["image"] for r in read_rows(tmp_path / "p.csv", "csv")] == ["s0.dcm", "s2.dcm", "s3.dcm"]


def test_evaluate_excludes_missing_and_nan_scans_and_says_so(bundle, tmp_path, capsys):
    scans = tmp_path / "scans"
    rows = [{"image": f"scans/{_good_dicom(scans / f's{i}.dcm', i).name}", "label": ["normal", "opacity"][i % 2]} for i in range(8)]
    nan = chest_phantom(np.random.default_rng(0), 40, True)
    nan[0, 0] = np.inf
    _nifti(scans / "nan.nii.gz", nan)
    rows += [{"image": "scans/nan.nii.gz", "label": "opacity"}, {"image": "scans/gone.dcm", "label": "normal"}]
    with open(tmp_path / "test.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "label"])
        writer.writeheader()
        writer.writerows(rows)
    assert main(["evaluate", str(bundle), str(tmp_path / "test.csv"), "--out", str(tmp_path / "report")]) == 0
    printed = capsys.readouterr().out
    assert "AUROC" in printed and "sensitivity" in printed and "excluded 2 scans" in printed
    errors = {Path(r["image"]).name: r["error"] for r in read_rows(tmp_path / "report" / "errors.csv", "csv")}
    assert set(errors) == {"nan.nii.gz", "gone.dcm"} and "no such file" in errors["gone.dcm"]
    assert "<b>Excluded:</b> 2 scans" in (tmp_path / "report" / "report.html").read_text()


def test_predict_takes_a_manifest_without_labels_and_the_scan_inventory(bundle, tmp_path):
    for i in range(3):
        _good_dicom(tmp_path / "scans" / f"s{i}.dcm", i)
    (tmp_path / "new.csv").write_text("image\nscans/s0.dcm\nscans/s2.dcm\n")
    assert main(["predict", str(bundle), str(tmp_path / "new.csv"), "--out", str(tmp_path / "a.csv"), "--workers", "0"]) == 0
    assert [r["image"] for r in read_rows(tmp_path / "a.csv", "csv")] == ["scans/s0.dcm", "scans/s2.dcm"]
    inventory = tmp_path / "lists" / "inventory.csv"
    assert main(["scan", str(tmp_path / "scans"), "--out", str(inventory)]) == 0
    assert main(["predict", str(bundle), str(inventory), "--out", str(tmp_path / "b.csv"), "--workers", "0"]) == 0
    assert len(read_rows(tmp_path / "b.csv", "csv")) == 3


def test_predict_on_an_empty_folder_is_an_error(bundle, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(bundle), str(tmp_path / "empty"), "--out", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err
    assert "no scans found" in err and len(err.strip().splitlines()) <= 2
    assert not (tmp_path / "p.csv").exists()


def test_inventory_lists_symlink_loops(tmp_path):
    from medtl.io import inventory

    _good_dicom(tmp_path / "a.dcm")
    os.symlink("loop", tmp_path / "loop")
    rows = {Path(r["image"]).name: r for r in inventory(tmp_path, workers=1)}
    assert rows["loop"]["kind"] == "unreadable" and "symbolic link loop" in rows["loop"]["problems"]


def test_quick_fingerprint_is_what_its_docstring_says(tmp_path):
    """Name, size, first and last 64 KiB: a replaced head or tail or a new size changes it; an
    edit in the middle of a large file does not (why it is not called a content hash)."""
    from medtl.infer import quick_fingerprint

    data = bytearray(np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes())
    path = tmp_path / "a.dcm"
    path.write_bytes(data)
    before = quick_fingerprint(path)
    for change in (lambda d: d.__setitem__(10, d[10] ^ 1), lambda d: d.__setitem__(-10, d[-10] ^ 1), lambda d: d.append(0)):
        edited = bytearray(data)
        change(edited)
        path.write_bytes(edited)
        assert quick_fingerprint(path) != before
    data[150_000] ^= 1
    path.write_bytes(data)
    assert quick_fingerprint(path) == before
