"""Ensembles: the module, its bundle round trip, cross-validation folds, and a K-fold run end to end."""

import csv
import json

import numpy as np
import pytest
import torch

from medtl import bundle as bundles
from medtl.backbones import Ensemble, create
from medtl.calibrate import make_calibrator
from medtl.cli import main
from medtl.config import Config, dump_config
from medtl.io import ScanRecord
from medtl.train import cross_validation_members, seed_members
from medtl.transforms import make_preprocessing


def _members(k: int, seed: int = 0):
    torch.manual_seed(seed)
    return [create("resnet18", spatial_dims=2, num_classes=3).eval() for _ in range(k)]


def test_ensemble_pools_member_log_probabilities():
    members = _members(3)
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        log_probs = torch.stack([m(x).log_softmax(dim=1) for m in members])
        geometric = log_probs.mean(dim=0).exp()
        out = Ensemble(members).eval()(x)
        torch.testing.assert_close(out.softmax(dim=1), geometric / geometric.sum(dim=1, keepdim=True), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.exp().sum(dim=1), torch.ones(4), rtol=1e-5, atol=1e-6)  # log-probabilities
        # Temperature scaling of one member's scale commutes with the pooling.
        torch.testing.assert_close((out / 2).softmax(dim=1), (log_probs / 2).mean(dim=0).softmax(dim=1), rtol=1e-5, atol=1e-6)
        old = Ensemble(members, combine="prob_mean").eval()(x)  # bundles from before the rule was recorded
        torch.testing.assert_close(old.softmax(dim=1), log_probs.exp().mean(dim=0), rtol=1e-5, atol=1e-6)
        for combine in ("log_prob_mean", "prob_mean"):
            torch.testing.assert_close(Ensemble(members[:1], combine=combine)(x).softmax(dim=1), members[0](x).softmax(dim=1))
        torch.testing.assert_close(Ensemble(members).forward_features(x), members[0].forward_features(x))
    assert Ensemble(members).feature_dim == members[0].feature_dim
    with pytest.raises(ValueError, match="combine rule 'median'"):
        Ensemble(members, combine="median")


def test_ensemble_bundle_round_trip(tmp_path):
    ensemble = Ensemble(_members(2)).eval()
    pre = make_preprocessing(spatial_dims=2, image_size=[32, 32], channels=1, intensity="cxr", ct_window=(40, 400),
                             normalization={"source": "none", "mean": 0.5, "std": 0.25})
    calibrator = make_calibrator("temperature", 3).fit(np.random.default_rng(0).normal(size=(30, 3)), np.arange(30) % 3)
    spec = {"backbone": "resnet18", "in_channels": 1, "spatial_dims": 2, "num_classes": 3, "weights": "none", "members": 2,
            "combine": ensemble.combine}
    x = torch.randn(3, 1, 32, 32)
    for name, model_spec in (("b", spec), ("old", {k: v for k, v in spec.items() if k != "combine"})):
        bundles.save(tmp_path / name, ensemble, model_spec=model_spec, classes=["a", "b", "c"], positive_index=None,
                     preprocessing=pre, calibrator=calibrator, operating_point=None, config_yaml=dump_config(Config()))
    predictor = bundles.load(tmp_path / "b")
    assert isinstance(predictor.model, Ensemble) and len(predictor.model.members) == 2
    assert bundles.load(tmp_path / "old").model.combine == "prob_mean"  # a bundle that does not say: the old rule
    with torch.no_grad():
        np.testing.assert_allclose(predictor.logits(x), ensemble(x).numpy(), rtol=1e-5, atol=1e-6)


def _records(n_patients: int, scans_per_patient: int = 2) -> list[ScanRecord]:
    return [ScanRecord(image=f"/x/{p}_{s}.png", label="pos" if p % 3 == 0 else "neg", patient_id=f"P{p}")
            for p in range(n_patients) for s in range(scans_per_patient)]


def test_cross_validation_folds_partition_by_patient_and_keep_class_shares():
    records = _records(60)
    members = cross_validation_members(records, 5, seed=0)
    assert len(members) == 5 and len({m.seed for m in members}) == 5
    validated = [r for m in members for r in m.val]
    assert sorted(map(str, (r.image for r in validated))) == sorted(map(str, (r.image for r in records)))
    for m in members:
        assert not {r.patient for r in m.train} & {r.patient for r in m.val}
        assert len(m.train) + len(m.val) == len(records)
        share = sum(r.label == "pos" for r in m.val) / len(m.val)
        assert abs(share - 1 / 3) < 0.1
    with pytest.raises(ValueError, match="rarest class"):
        cross_validation_members(_records(6), 5, seed=0)  # 2 positive patients (4 scans) for 5 folds
    assert [m.seed for m in seed_members(records[:10], records[10:], 3, seed=4)] == [4, 5, 6]


@pytest.mark.slow
def test_kfold_ensemble_through_train_evaluate_predict_and_resume(tmp_path):
    data = tmp_path / "data"
    assert main(["synth", "--out", str(data), "--patients", "16", "--test-patients", "6"]) == 0
    run = tmp_path / "run"
    args = ["train", "--set", f"data.manifest={data / 'manifest.csv'}", "--set", "data.image_size=[32,32]",
            "--set", "data.num_workers=0", "--set", "train.epochs=2", "--set", "report.bootstrap=100", "--folds", "3"]
    assert main([*args, "--out", str(run)]) == 0
    meta = json.loads((run / "bundle" / "bundle.json").read_text())
    assert meta["model"]["members"] == 3 and meta["model"]["combine"] == "log_prob_mean"
    ensemble = meta["training"]["ensemble"]
    assert [m["name"] for m in ensemble["members"]] == ["fold0", "fold1", "fold2"]
    assert sum(m["val_scans"] for m in ensemble["members"]) == sum(m["train_scans"] + m["val_scans"] for m in ensemble["members"]) / 3
    recipe = json.loads((run / "recipe.json").read_text())
    assert {c["key"]: c["source"] for c in recipe["choices"]}["train.folds"] == "user"
    assert "out-of-fold" in (run / "report" / "report.html").read_text()

    evaluation = tmp_path / "evaluation"
    assert main(["evaluate", str(run / "bundle"), str(data / "test" / "labels.csv"), "--out", str(evaluation), "--workers", "0"]) == 0
    preds = tmp_path / "preds.csv"
    assert main(["predict", str(run / "bundle"), str(data / "test"), "--out", str(preds), "--workers", "0",
                 "--cam", str(tmp_path / "cams")]) == 0
    rows = list(csv.DictReader(open(preds)))
    assert len(list((tmp_path / "cams").rglob("*.png"))) == len(rows)  # Grad-CAM averaged over the members
    assert len(rows) == len(list(csv.DictReader(open(data / "test" / "labels.csv"))))
    assert all(abs(sum(float(r[k]) for k in r if k.startswith("prob_")) - 1) < 1e-5 for r in rows)

    # The ensemble bundle through local recalibration and the Python API, like any bundle.
    local = data / "test" / "labels.csv"
    assert main(["recalibrate", str(run / "bundle"), str(local), "--out", str(tmp_path / "recal")]) == 0
    assert json.loads((tmp_path / "recal" / "bundle.json").read_text())["model"]["members"] == 3
    predictor = bundles.load(tmp_path / "recal", device="auto")
    first = data / "test" / rows[0]["image"]
    assert predictor.predict_proba(first).shape == (1, 2) and predictor.predict(str(first))[0] in meta["classes"]

    # Resuming a finished run reads every member back instead of training it again.
    stamps = {p: p.stat().st_mtime_ns for p in run.glob("members/*/*.safetensors")}
    assert len(stamps) == 6  # weights and out-of-fold scores of each member: resuming refits on these scores
    assert main([*args, "--resume", str(run)]) == 0
    assert {p: p.stat().st_mtime_ns for p in run.glob("members/*/*.safetensors")} == stamps
    assert json.loads((run / "bundle" / "bundle.json").read_text())["calibration"] == meta["calibration"]
