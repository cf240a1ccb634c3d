"""``medtl scan`` and the header checks behind it: inventory rows, problems found, no patient
identifiers, and train refusing (or skipping) unreadable scans."""

import csv
import shutil

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from medtl.cli import main
from medtl.config import Config
from medtl.io import ScanReadError, inventory, unreadable_scans, write_synthetic
from medtl.io.inventory import filesystem_type, scan_mode
from medtl.io.synthetic import write_dicom, write_dicom_series

IDENTIFIERS = ("SYNTHETIC", "SYN-", "19700101", "DOE", "MRN")


@pytest.fixture()
def messy(tmp_path):
    """A tree with the usual problems, every DICOM file carrying a patient name, ID and birth date."""
    root = tmp_path / "tree"
    write_dicom_series(root / "good", np.zeros((8, 8, 5)), spacing=(1, 1, 2), uid_seed="good")
    write_dicom_series(root / "gap", np.zeros((8, 8, 6)), spacing=(1, 1, 2), uid_seed="gap")
    (root / "gap" / "slice0003.dcm").unlink()  # a missing slice
    write_dicom_series(root / "two", np.zeros((8, 8, 3)), uid_seed="two-a")
    write_dicom_series(root / "two_b", np.zeros((8, 8, 3)), uid_seed="two-b")
    for f in (root / "two_b").iterdir():  # a second series in the same folder
        f.rename(root / "two" / f"b_{f.name}")
    (root / "two_b").rmdir()
    write_dicom(root / "cxr" / "pa.dcm", np.zeros((16, 12)), patient="P1", uid_seed="pa")
    (root / "cxr" / "broken.dcm").write_bytes(b"\x00" * 200)
    (root / "cxr" / "notes.txt").write_text("not a scan")
    shutil.copy(get_testdata_file("test-SR.dcm"), root / "report.dcm")
    return root


def test_inventory_rows_and_problems(messy):
    rows = {r["image"].removeprefix(str(messy) + "/"): r for r in inventory(messy, workers=4)}
    assert set(rows) == {"good", "gap", "two", "cxr/pa.dcm", "cxr/broken.dcm", "report.dcm"}
    good = rows["good"]
    assert (good["kind"], good["modality"], good["dimensions"], good["spacing"], good["slices"]) == (
        "dicom-series", "CT", "8 x 8 x 5", "1 x 1 x 2", 5)
    assert good["transfer_syntax"] == "Explicit VR Little Endian" and good["problems"] == ""
    assert "missing slices: 1 gap" in rows["gap"]["problems"]
    assert "folder holds 2 series" in rows["two"]["problems"]  # both series land on the folder's row
    assert rows["cxr/pa.dcm"]["dimensions"] == "12 x 16" and rows["cxr/pa.dcm"]["kind"] == "dicom"
    assert rows["cxr/broken.dcm"]["kind"] == "unreadable" and "not a readable DICOM" in rows["cxr/broken.dcm"]["problems"]
    assert "no pixel data: SR (Comprehensive SR Storage)" in rows["report.dcm"]["problems"]


def test_scan_cli_writes_inventory_without_patient_identifiers(messy, tmp_path, capsys):
    out = tmp_path / "inventory.csv"
    assert main(["scan", str(messy), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    text = out.read_text()
    assert list(csv.DictReader(open(out)))[0].keys() >= {"image", "kind", "modality", "dimensions", "spacing", "slices",
                                                         "transfer_syntax", "problems"}
    for marker in IDENTIFIERS:
        assert marker not in text and marker not in printed.out and marker not in printed.err, marker


def test_unreadable_scans_judged_from_headers(messy):
    bad = dict(unreadable_scans([messy / "good", messy / "two", messy / "cxr" / "broken.dcm", messy / "report.dcm",
                                 messy / "cxr" / "pa.dcm", messy / "gone.dcm"]))
    assert set(bad) == {str(messy / p) for p in ("two", "cxr/broken.dcm", "report.dcm", "gone.dcm")}
    assert "holds 2" in bad[str(messy / "two")] and "no such file" in bad[str(messy / "gone.dcm")]


def _config_with_bad_scans(tmp_path, skip: bool) -> Config:
    paths = write_synthetic(tmp_path / "data", seed=1, patients_per_site=8, test_per_site=1)
    manifest = paths["manifest"]
    lines = manifest.read_text().splitlines()
    broken = tmp_path / "data" / "site_a" / "broken.dcm"
    broken.write_bytes(b"\x00" * 300)
    lines.append("site_a/broken.dcm,normal,A,BROKEN1")
    manifest.write_text("\n".join(lines) + "\n")
    return Config.model_validate({
        "data": {"manifest": str(manifest), "image_size": [32, 32], "num_workers": 0, "skip_unreadable": skip, "cache": "none"},
        "model": {"backbone": "resnet18", "weights": "none"},
        "train": {"epochs": 1, "batch_size": 16, "device": "cpu"},
    }), broken


def test_train_refuses_unreadable_scans_and_lists_them(tmp_path):
    from medtl.pipeline import train

    config, broken = _config_with_bad_scans(tmp_path, skip=False)
    with pytest.raises(ScanReadError, match="1 of .* scans cannot be read") as info:
        train(config, tmp_path / "run")
    assert str(broken) in str(info.value) and "skip_unreadable" in str(info.value)


def test_train_skips_unreadable_scans_when_told_and_lists_them(tmp_path):
    from medtl.pipeline import train

    config, broken = _config_with_bad_scans(tmp_path, skip=True)
    outcome = train(config, tmp_path / "run")
    listed = list(csv.DictReader(open(outcome.run_dir / "unreadable.csv")))
    assert [r["image"] for r in listed] == [str(broken)] and "not a readable DICOM" in listed[0]["error"]


def test_train_checks_unlabelled_target_scans_before_training(tmp_path):
    from medtl.pipeline import train

    config, broken = _config_with_bad_scans(tmp_path, skip=False)
    lines = config.data.manifest.read_text().splitlines()
    config.data.manifest.write_text("\n".join(line for line in lines if "broken" not in line) + "\n")
    target = tmp_path / "target.csv"
    target.write_text(f"image\n{broken}\n")
    config = config.model_copy(update={"data": config.data.model_copy(update={"target_manifest": target}),
                                       "adapt": config.adapt.model_copy(update={"domain": "coral"})})
    with pytest.raises(ScanReadError, match="1 of .* scans cannot be read") as info:
        train(config, tmp_path / "run")
    assert str(broken) in str(info.value)
    config = config.model_copy(update={"data": config.data.model_copy(update={"skip_unreadable": True})})
    with pytest.raises(ValueError, match="none of the unlabelled target scans can be read"):
        train(config, tmp_path / "run2")


def test_process_and_thread_modes_give_the_same_inventory(messy):
    """Headers parsed in worker processes (in chunks) or threads or this process: the same rows."""
    threads = inventory(messy, workers=4, mode="threads")
    assert inventory(messy, workers=2, mode="processes") == threads
    assert inventory(messy, workers=1, mode="processes") == threads


def test_auto_mode_takes_threads_on_a_network_share(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/sda1 / ext4 rw 0 0\nserver:/pacs /mnt/pacs\\040export nfs4 rw 0 0\n")
    assert filesystem_type("/mnt/pacs export/study1", mounts) == "nfs4"
    assert filesystem_type("/mnt/pacs", mounts) == "ext4"
    assert filesystem_type("/data", tmp_path / "none") == ""
    assert scan_mode(tmp_path) in ("processes", "threads") and scan_mode(tmp_path, "threads") == "threads"
    with pytest.raises(ValueError, match="scan mode 'fast'"):
        scan_mode(tmp_path, "fast")
