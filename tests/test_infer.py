"""Batch inference: resume after a kill, bad files, torchrun sharding, agreement with evaluate,
test-time augmentation, Grad-CAM overlays and the CPU fallbacks of the speed options."""

import copy
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import write_tiny_bundle
from medtl import pipeline
from medtl.backbones import Ensemble
from medtl.bundle import load, save
from medtl.bundle.runtime import CompiledOrEager, amp_dtype
from medtl.infer import auto_batch_size, predict_scans, read_rows
from medtl.infer.tta import views
from medtl.io.synthetic import chest_phantom, write_dicom

REPO = Path(__file__).resolve().parents[1]
N_SCANS = 12


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A ResNet-18 bundle with random weights at 32 px: temperature and threshold fitted on random logits."""
    return write_tiny_bundle(tmp_path_factory.mktemp("bundle"))


def _write_scans(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(1)
    paths = []
    for i in range(n):
        path = folder / f"site{i % 2}" / f"scan{i:02d}.dcm"
        write_dicom(path, chest_phantom(rng, 48, bool(i % 3 == 0)), patient=f"{i:03d}", uid_seed=f"t{i}")
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scans")
    _write_scans(folder, N_SCANS)
    return folder


def _medtl(*args: str, env: dict | None = None, code: str | None = None) -> subprocess.CompletedProcess:
    """``python -m medtl ...`` (or ``python -c code ...``) in a fresh process."""
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "medtl", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


# A run killed (SIGKILL) after 5 rows, while writing the 6th: the kill lands mid-line.
_KILLED_RUN = """
import os, signal, sys
from medtl.infer import table
append = table.ResultTable.append
def append_then_die(self, rows):
    append(self, rows)
    if len(self.rows) >= 5:
        with open(self.path, "a") as handle:
            handle.write("site1/scan99.dcm,0.12")
        os.kill(os.getpid(), signal.SIGKILL)
table.ResultTable.append = append_then_die
from medtl.cli import main
sys.exit(main(["predict", *sys.argv[1:]]))
"""


@pytest.mark.slow
def test_resume_after_kill_loses_and_duplicates_nothing(bundle, scans, tmp_path):
    out = tmp_path / "preds.csv"
    args = (str(bundle), str(scans), "--out", str(out), "--batch-size", "1", "--workers", "0")
    killed = _medtl(*args, code=_KILLED_RUN)
    assert killed.returncode == -9, killed.stderr
    assert not out.read_text().endswith("\n"), "the kill left a partial last line"
    before = read_rows(out, "csv")  # also cuts the partial line
    assert len(before) == 5 and "scan99" not in out.read_text()

    resumed = _medtl("predict", *args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"predicted {N_SCANS - 5}, skipped 5" in resumed.stdout
    rows = list(csv.DictReader(open(out)))
    names = [r["image"] for r in rows]
    assert len(names) == len(set(names)) == N_SCANS
    assert rows[:5] == [dict(r) for r in before]

    again = _medtl("predict", *args)
    assert f"predicted 0, skipped {N_SCANS}" in again.stdout
    assert list(csv.DictReader(open(out))) == rows


def test_bad_files_are_reported_and_good_ones_predicted(bundle, tmp_path):
    folder = tmp_path / "mixed"
    good = _write_scans(folder, 4)
    truncated = folder / "truncated.dcm"
    data = good[0].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    (folder / "notes.txt").write_text("not a scan: discovery skips it")
    (folder / "fake.dcm").write_text("this is not DICOM")
    (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")

    summary = predict_scans(load(bundle), folder, tmp_path / "preds.csv", batch_size=2, num_workers=1, progress=False)
    assert (summary.predicted, summary.failed) == (4, 3)
    rows = read_rows(tmp_path / "preds.csv", "csv")
    assert sorted(r["image"] for r in rows) == sorted(str(p.relative_to(folder)) for p in good)
    errors = {r["image"]: r["error"] for r in read_rows(summary.errors, "csv")}
    assert set(errors) == {"truncated.dcm", "fake.dcm", "broken.nii.gz"}
    assert all(reason.strip() for reason in errors.values())
    text = summary.errors.read_text() + (tmp_path / "preds.csv").read_text()
    assert "SYNTHETIC" not in text and "SYN-" not in text, "no patient identifiers in outputs"


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(bundle, scans, tmp_path):
    single, sharded = tmp_path / "single.csv", tmp_path / "sharded.csv"
    common = ("--batch-size", "4", "--workers", "0")
    assert _medtl("predict", str(bundle), str(scans), "--out", str(single), *common).returncode == 0
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "medtl", "predict", str(bundle), str(scans), "--out", str(sharded), *common],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = read_rows(single, "csv"), read_rows(sharded, "csv")
    assert [r["image"] for r in two] == [r["image"] for r in one]
    for a, b in zip(one, two):
        assert (a["pred"], a["uncertain"], a["fingerprint"]) == (b["pred"], b["uncertain"], b["fingerprint"])
        assert float(a["prob_opacity"]) == pytest.approx(float(b["prob_opacity"]), abs=1e-5)
    assert not list(tmp_path.glob("*.part-*")), "rank 0 removed the part files"


def test_predictions_equal_evaluate(bundle, scans, tmp_path, monkeypatch):
    manifest = tmp_path / "labels.csv"
    paths = sorted(scans.rglob("*.dcm"))
    manifest.write_text("image,label\n" + "".join(f"{p},{'opacity' if i % 3 == 0 else 'normal'}\n" for i, p in enumerate(paths)))
    seen = {}
    report = pipeline.write_report

    def capture(out_dir, **kwargs):
        seen.update(kwargs)
        return report(out_dir, **{**kwargs, "n_resamples": 100})

    monkeypatch.setattr(pipeline, "write_report", capture)
    pipeline.evaluate(bundle, manifest, tmp_path / "evaluation", num_workers=0)

    predictor = load(bundle).accelerate()  # as medtl predict runs it: channels-last, other batches
    predict_scans(predictor, manifest, tmp_path / "preds.csv", num_workers=0, progress=False)
    rows = read_rows(tmp_path / "preds.csv", "csv")
    assert [r["image"] for r in rows] == [str(p) for p in paths]
    probs = np.array([[float(r["prob_normal"]), float(r["prob_opacity"])] for r in rows])
    np.testing.assert_allclose(probs, seen["probs_calibrated"], atol=1e-5)


def test_tta_adds_spread_and_jsonl_output(bundle, scans, tmp_path):
    out = tmp_path / "preds.jsonl"
    summary = predict_scans(load(bundle), scans, out, fmt="jsonl", tta=True, num_workers=0, progress=False)
    assert summary.predicted == N_SCANS
    rows = read_rows(out, "jsonl")
    assert list(rows[0]) == ["image", "prob_normal", "prob_opacity", "pred", "uncertain", "tta_std", "fingerprint"]
    spread = np.array([r["tta_std"] for r in rows])
    assert (spread >= 0).all() and spread.max() > 0
    threshold = load(bundle).operating_point.threshold
    flags = [abs(r["prob_opacity"] - threshold) < 2 * r["tta_std"] for r in rows]
    assert [bool(r["uncertain"]) for r in rows] == flags
    plain = read_rows(Path(predict_scans(load(bundle), scans, tmp_path / "plain.csv", num_workers=0, progress=False).out), "csv")
    assert "tta_std" not in plain[0]


def _ensemble_bundle(single: Path, folder: Path, biases: list[float]) -> Path:
    """An ensemble bundle of copies of ``single``'s model, member k's head tilted by ``biases[k]``
    towards the positive class; calibrator, threshold and preprocessing as in ``single``."""
    source = load(single)
    members = []
    for bias in biases:
        member = copy.deepcopy(source.model)
        with torch.no_grad():
            member.head.bias += torch.tensor([-bias, bias]) / 2
        members.append(member)
    meta = source.meta
    return save(folder, Ensemble(members), model_spec={**meta["model"], "members": len(biases), "combine": "log_prob_mean"},
                classes=meta["classes"], positive_index=1, preprocessing=meta["preprocessing"], calibrator=source.calibrator,
                operating_point=source.operating_point, config_yaml=(single / "config.yaml").read_text())


def test_ensemble_members_vote_on_uncertainty(bundle, scans, tmp_path):
    def predict(path: Path, name: str, **kwargs) -> list[dict]:
        out = predict_scans(load(path), scans, tmp_path / f"{name}.jsonl", fmt="jsonl", num_workers=0, progress=False, **kwargs)
        return read_rows(out.out, "jsonl")

    single = predict(bundle, "single")
    assert "member_std" not in single[0]

    # Identical members: the ensemble is the single model, and its members never disagree.
    rows = predict(_ensemble_bundle(bundle, tmp_path / "same", [0.0, 0.0, 0.0]), "same")
    assert list(rows[0])[:6] == ["image", "prob_normal", "prob_opacity", "pred", "uncertain", "member_std"]
    assert [r["member_std"] for r in rows] == [0.0] * N_SCANS
    assert [r["prob_opacity"] for r in rows] == pytest.approx([r["prob_opacity"] for r in single], abs=1e-5)
    assert [(r["pred"], r["uncertain"]) for r in rows] == [(r["pred"], r["uncertain"]) for r in single]

    # Members pulled far to either side: every decision is split, so every scan is uncertain,
    # and the pooled probability lies between theirs.
    split = _ensemble_bundle(bundle, tmp_path / "split", [-20.0, 20.0])
    rows = predict(split, "split")
    assert [r["uncertain"] for r in rows] == [1] * N_SCANS
    assert min(r["member_std"] for r in rows) > 0.2  # the bundle's temperature (fitted on noise) flattens them
    assert all(0.0 < r["prob_opacity"] < 1.0 for r in rows)
    assert "member_std" not in predict(split, "tta", tta=True)[0]  # with --tta the views' spread decides


def test_tta_views_shift_content():
    images = torch.arange(2 * 1 * 25, dtype=torch.float32).reshape(2, 1, 5, 5)
    out = views(images, fraction=0.2)
    assert len(out) == 5 and torch.equal(out[0], images)
    assert torch.equal(out[1][:, :, 1:], images[:, :, :-1]) and torch.equal(out[1][:, :, 0], images[:, :, 0])
    assert torch.equal(out[4][:, :, :, :-1], images[:, :, :, 1:]) and torch.equal(out[4][:, :, :, -1], images[:, :, :, -1])


def test_cam_writes_one_overlay_per_scan(bundle, scans, tmp_path):
    from PIL import Image

    cams = tmp_path / "cams"
    predict_scans(load(bundle).accelerate(), scans, tmp_path / "preds.csv", cam_dir=cams, num_workers=0, progress=False)
    pngs = sorted(cams.rglob("*.png"))
    assert [p.relative_to(cams).as_posix() for p in pngs] == sorted(
        f"{p.relative_to(scans).as_posix()}.png" for p in scans.rglob("*.dcm"))
    picture = np.asarray(Image.open(pngs[0]))
    assert picture.shape == (256, 256, 3) and picture.std() > 0  # 32 px network input, shown at 256 px


def test_speed_options_fall_back_on_cpu(bundle, scans, tmp_path):
    assert amp_dtype(torch.device("cpu"), True) is None and amp_dtype(torch.device("cpu"), False) is None
    baseline = predict_scans(load(bundle), scans, tmp_path / "a.csv", num_workers=0, progress=False)
    fast = load(bundle).accelerate(channels_last=True, amp=True)
    assert fast.channels_last and fast.amp_dtype is None
    predict_scans(fast, scans, tmp_path / "b.csv", batch_size=5, num_workers=1, progress=False)
    a, b = read_rows(baseline.out, "csv"), read_rows(tmp_path / "b.csv", "csv")
    np.testing.assert_allclose([float(r["prob_opacity"]) for r in a], [float(r["prob_opacity"]) for r in b], atol=1e-5)


def test_compile_failure_falls_back_to_eager(monkeypatch, caplog):
    def broken(model, **kwargs):
        def fail(x):
            raise RuntimeError("no backend here")
        return fail

    monkeypatch.setattr(torch, "compile", broken)
    model = torch.nn.Linear(3, 2)
    wrapped = CompiledOrEager(model)
    x = torch.randn(4, 3)
    assert torch.equal(wrapped(x), model(x)) and torch.equal(wrapped(x), model(x))
    assert wrapped.failed == "RuntimeError: no backend here"
    assert "torch.compile failed" in caplog.text


def test_auto_batch_size(bundle):
    predictor = load(bundle)
    assert auto_batch_size(predictor, 3) == 3  # short runs: no probe
    assert auto_batch_size(predictor, 100) == 16
    assert auto_batch_size(predictor, 10_000) in (8, 16, 32)
