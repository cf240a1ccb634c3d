"""Trust at a new site: the local recalibrators, medtl recalibrate and medtl adapt on a trained
bundle, the feature reference written by training, and predict's shift alarm."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy.special import expit

from helpers import write_small_split
from medtl.bundle import FeatureReference, bundle_hash, em_prevalence, load
from medtl.bundle.reference import REFERENCE_FILE, Reservoir
from medtl.calibrate import (
    LOCAL_UPDATES,
    InterceptUpdate,
    LogisticRecalibration,
    PlattScaling,
    TemperatureScaling,
    calibrator_from_dict,
    register_local_update,
)
from medtl.cli import main
from medtl.io.synthetic import chest_phantom, write_dicom

CONFIG = (
    "data:\n  manifest: small.csv\n  image_size: [32, 32]\n  num_workers: 0\n"
    "model:\n  backbone: resnet18\n  weights: none\n"
    "train:\n  epochs: 2\n  batch_size: 16\n  lr: 0.001\n  head_lr: 0.001\n  folds: 1\n"
    "report:\n  bootstrap: 100\n"
)


# ---- the recalibrators and the statistics, on synthetic logits ---------------------------------------


def _shifted_site(n: int, slope: float, intercept: float, seed: int):
    """Logits and labels where the truth is ``logit P = slope * margin + intercept``, and a base
    calibrator (temperature 1) that believes ``logit P = margin``."""
    rng = np.random.default_rng(seed)
    margin = rng.normal(scale=2.0, size=n)
    labels = (rng.random(n) < expit(slope * margin + intercept)).astype(int)
    logits = np.column_stack([np.zeros(n), margin])
    base = TemperatureScaling().fit(np.column_stack([np.zeros(4), [-1.0, 1, -1, 1]]), [0, 1, 1, 0])
    base.temperature_ = 1.0
    return logits, labels, base


def test_intercept_update_recovers_a_prevalence_shift_and_round_trips():
    logits, labels, base = _shifted_site(20000, 1.0, -1.2, seed=0)
    update = InterceptUpdate(base).fit(logits, labels)
    assert update.slope_ == 1.0 and update.intercept_ == pytest.approx(-1.2, abs=0.06)
    again = calibrator_from_dict(json.loads(json.dumps(update.to_dict())))
    np.testing.assert_allclose(again.transform(logits), update.transform(logits))
    assert again.to_dict()["base"]["method"] == "temperature"


def test_logistic_recovers_slope_and_intercept_and_stays_finite_when_separated():
    logits, labels, base = _shifted_site(20000, 0.5, 0.7, seed=1)
    update = LogisticRecalibration(base).fit(logits, labels)
    assert update.slope_ == pytest.approx(0.5, abs=0.03) and update.intercept_ == pytest.approx(0.7, abs=0.06)
    separated = np.column_stack([np.zeros(12), np.r_[-np.arange(1, 7), np.arange(1, 7)]])
    fit = LogisticRecalibration(base).fit(separated, np.r_[np.zeros(6), np.ones(6)].astype(int))
    assert np.isfinite(fit.slope_) and 1 < fit.slope_ < 10  # the prior keeps a separated sample finite


def test_recalibrators_need_their_base_and_two_classes():
    with pytest.raises(ValueError, match="needs the fitted calibrator"):
        InterceptUpdate().fit(np.zeros((4, 2)), [0, 1, 0, 1])
    base = PlattScaling().fit(np.column_stack([np.zeros(4), [-1.0, 1, -1, 1]]), [0, 1, 1, 0])
    with pytest.raises(ValueError, match="binary"):
        LogisticRecalibration(base).fit(np.zeros((4, 3)), [0, 1, 2, 1])


def test_em_recovers_the_prevalence_under_pure_label_shift():
    rng = np.random.default_rng(2)
    # class-conditional scores fixed; source prior 0.5, site prior 0.2; calibrated source posteriors
    y = (rng.random(20000) < 0.2).astype(int)
    x = rng.normal(loc=1.5 * y)
    p1 = expit(1.5 * x - 1.125)  # the posterior at prior 0.5 for unit-variance Gaussians 1.5 apart
    estimate = em_prevalence(np.column_stack([1 - p1, p1]), np.array([0.5, 0.5]))
    assert estimate[1] == pytest.approx(0.2, abs=0.02) and estimate.sum() == pytest.approx(1.0)


def test_shift_test_false_positive_rate_and_power():
    rng = np.random.default_rng(3)
    train = rng.normal(size=(400, 8))
    reference = FeatureReference.fit(train, rng.integers(0, 2, 400), rng.normal(size=(300, 8)))
    same = [reference.shift_test(rng.normal(size=(40, 8)), permutations=200, seed=s)["shifted"] for s in range(40)]
    moved = [reference.shift_test(rng.normal(loc=0.5, size=(40, 8)), permutations=200, seed=s)["shifted"] for s in range(10)]
    assert np.mean(same) <= 0.125 and np.mean(moved) >= 0.9
    distances = reference.distances(rng.normal(size=(2000, 8)))
    pvalues = reference.pvalues(distances)
    assert 0.02 < np.mean(pvalues < 0.05) < 0.09  # p-values of in-distribution scans are calibrated
    assert np.all(reference.pvalues(reference.distances(np.full((1, 8), 10.0))) < 0.01)


def test_reservoir_keeps_a_bounded_uniform_sample():
    sample = Reservoir(size=100, seed=0)
    for start in range(0, 10000, 250):
        sample.add(np.arange(start, start + 250)[:, None].astype(float))
    kept = sample.array()[:, 0]
    assert kept.shape == (100,) and sample.seen == 10000 and 3000 < kept.mean() < 7000


# ---- on a trained bundle -------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for this module's commands too (``medtl`` sets torch's threads itself)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDTL_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A bundle trained on synthetic scans, and a labelled local set of scans it never saw."""
    root = tmp_path_factory.mktemp("site")
    write_small_split(root, patients_per_site=40, n_train=32, n_val=16)
    (root / "run.yaml").write_text(CONFIG)
    torch.set_num_threads(1)
    assert main(["train", str(root / "run.yaml"), "--out", str(root / "run")]) == 0
    used = {r["image"] for r in csv.DictReader(open(root / "small.csv"))}
    rows = [r for r in csv.DictReader(open(root / "data" / "manifest.csv")) if r["label"] and f"data/{r['image']}" not in used]
    _write_manifest(root / "local.csv", [{"image": f"data/{r['image']}", "label": r["label"]} for r in rows])
    return root


def _write_manifest(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _rows(site: Path) -> list[dict]:
    return list(csv.DictReader(open(site / "local.csv")))


def test_training_writes_a_feature_reference(site):
    bundle = site / "run" / "bundle"
    assert (bundle / REFERENCE_FILE).is_file()
    reference = load(bundle).reference
    assert reference.means.shape == (2, 512) and reference.precision.shape == (512, 512)
    assert len(reference.val_distances) == 16 and reference.sample.shape == (16, 512)


def test_recalibrate_writes_a_complete_bundle_with_provenance_and_an_honest_report(site, capsys):
    parent, out = site / "run" / "bundle", site / "recalibrated"
    assert main(["recalibrate", str(parent), str(site / "local.csv"), "--out", str(out), "--operating-point", "sensitivity=0.9",
                 "--normalization", "keep"]) == 0
    assert "cross-validated" in capsys.readouterr().out
    meta = json.loads((out / "bundle.json").read_text())
    step = meta["provenance"][-1]
    rows = _rows(site)
    labels = [r["label"] for r in rows]
    events = min(labels.count(c) for c in set(labels))
    assert step["parent"]["sha256"] == bundle_hash(parent) and step["step"] == "recalibrate"
    assert step["local_set"]["scans"] == len(rows) and step["local_set"]["events"] == events
    assert len(step["local_set"]["sha256"]) == 64
    assert meta["calibration"]["method"] == ("intercept" if events < 10 else "logistic")  # auto's rule
    assert meta["calibration"]["base"] == json.loads((parent / "bundle.json").read_text())["calibration"]
    assert meta["operating_point"]["method"] == "sensitivity" and meta["operating_point"]["target"] == 0.9
    for name in ("model.safetensors", "config.yaml", REFERENCE_FILE):
        assert (out / name).read_bytes() == (parent / name).read_bytes()
    report = json.loads((out / "recalibration.json").read_text())
    assert report["after"]["how"].startswith("stratified 5-fold" if len(rows) >= 30 else "leave-one-out")
    for key in ("ece", "brier", "accuracy", "sensitivity", "specificity"):
        assert report["before"][key]["ci"] is not None and report["after"][key]["ci"] is not None
    assert "before (parent)" in (out / "recalibration.md").read_text()
    predictor = load(out)  # the new bundle loads and predicts with the new calibration
    assert predictor.calibrator.method == meta["calibration"]["method"]
    # a second recalibration chains the provenance
    again = site / "recalibrated2"
    assert main(["recalibrate", str(out), str(site / "local.csv"), "--out", str(again), "--keep-threshold",
                 "--method", "intercept"]) == 0
    chained = json.loads((again / "bundle.json").read_text())
    assert [s["step"] for s in chained["provenance"]] == ["recalibrate", "recalibrate"]
    assert chained["provenance"][-1]["parent"]["sha256"] == bundle_hash(out)
    assert chained["operating_point"] == meta["operating_point"]


def test_recalibrate_renormalises_on_the_local_scans_when_that_lowers_the_cross_validated_loss(site):
    from medtl.bundle import adapt, recalibrate

    parent, local = site / "run" / "bundle", site / "local.csv"
    forced = recalibrate(parent, local, site / "renormalised", normalization="adabn")
    norm = forced.report["normalization"]
    assert norm["chosen"] == "adabn" and set(norm["cross_validated_log_loss"]) == {"keep", "adabn"}
    assert forced.report["after"]["how"].startswith("stratified 5-fold")
    old, new = load_file(str(parent / "model.safetensors")), load_file(str(forced.bundle / "model.safetensors"))
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert changed and all(k.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked") for k in changed)
    # the same statistics as medtl adapt over the same scans
    adapted = adapt(parent, local, site / "adapted_local", method="adabn", batch_size=16)
    for key, value in load_file(str(adapted.bundle / "model.safetensors")).items():
        torch.testing.assert_close(new[key], value)
    assert json.loads((forced.bundle / "bundle.json").read_text())["provenance"][-1]["normalization"] == "adabn"

    auto = recalibrate(parent, local, site / "renormalised_auto")  # the default: the lower cross-validated loss
    losses = auto.report["normalization"]["cross_validated_log_loss"]
    assert losses == norm["cross_validated_log_loss"]
    shifted = auto.report["normalization"]["shift_test"].startswith("these scans look unlike")
    assert shifted or auto.report["normalization"]["shift_test"].startswith("no shift detected")
    assert auto.report["normalization"]["chosen"] == ("adabn" if shifted else min(losses, key=losses.get))
    kept = load_file(str(auto.bundle / "model.safetensors"))
    assert all(torch.equal(kept[k], (new if auto.report["normalization"]["chosen"] == "adabn" else old)[k]) for k in old)
    assert "Normalisation:" in (auto.bundle / "recalibration.md").read_text()


@pytest.mark.parametrize("shifted", [True, False])
def test_recalibrate_renormalises_local_scans_that_look_shifted(site, monkeypatch, shifted):
    from medtl.bundle import recalibrate

    verdict = {"shifted": shifted, "message": "these scans look unlike the training data" if shifted else "no shift detected"}
    monkeypatch.setattr(FeatureReference, "shift_test", lambda self, features, seed=0: verdict)
    report = recalibrate(site / "run" / "bundle", site / "local.csv", site / f"flagged_{shifted}").report["normalization"]
    losses = report["cross_validated_log_loss"]
    assert report["chosen"] == ("adabn" if shifted else min(losses, key=losses.get))


def test_cross_validated_figures_never_score_a_scan_on_its_own_fit(site, monkeypatch):
    """A calibrator that knows the labels of the scans it was fitted on and says 0.5 for any other
    scan: fitted-and-scored figures would have Brier 0, cross-validated ones exactly 0.25."""
    from medtl.bundle import site as site_module

    class Memorise(PlattScaling):
        def _fit(self, logits, labels):
            self.seen = {tuple(np.round(row, 6)): label for row, label in zip(logits, labels)}
            super()._fit(logits, labels)

        def _transform(self, logits):
            hit = [self.seen.get(tuple(np.round(row, 6))) for row in logits]
            return np.array([[1 - h, h] if h is not None else [0.5, 0.5] for h in hit], dtype=float)

    monkeypatch.setattr(site_module, "_fit", lambda method, base, logits, labels: Memorise().fit(logits, labels))
    result = site_module.recalibrate(site / "run" / "bundle", site / "local.csv", site / "memorised", method="platt")
    assert result.report["after"]["brier"]["value"] == pytest.approx(0.25)


@pytest.mark.parametrize(
    "rows, fragment",
    [
        (lambda rows: [r for r in rows if r["label"] == "normal"], "every scan is 'normal'"),
        (lambda rows: rows[:6], "at least 10"),
        (lambda rows: [{**r, "label": "pneumothorax" if i == 0 else r["label"]} for i, r in enumerate(rows)],
         r"labels \['pneumothorax'\] are not classes"),
        (lambda rows: [r for r in rows if r["label"] == "normal"] + [r for r in rows if r["label"] == "opacity"][:1],
         "too few scans of class"),
    ],
)
def test_bad_local_sets_exit_2_with_one_line_and_no_bundle(site, capsys, rows, fragment):
    local = _write_manifest(site / "bad.csv", rows(_rows(site)))
    out = site / "never"
    assert main(["recalibrate", str(site / "run" / "bundle"), str(local), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.csv" in err.splitlines()[0]
    import re
    assert re.search(fragment, err.splitlines()[0])
    assert not out.exists() and not list(site.glob(".never.*"))


def test_recalibrate_refuses_an_existing_output_and_a_bad_rule(site, capsys):
    existing = site / "exists"
    existing.mkdir(exist_ok=True)
    (existing / "keep.txt").write_text("work")
    assert main(["recalibrate", str(site / "run" / "bundle"), str(site / "local.csv"), "--out", str(existing)]) == 2
    assert "already exists" in capsys.readouterr().err and (existing / "keep.txt").read_text() == "work"
    assert main(["recalibrate", str(site / "run" / "bundle"), str(site / "local.csv"), "--out", str(site / "x"),
                 "--operating-point", "sensitivity=2"]) == 2
    assert "operating point" in capsys.readouterr().err and not (site / "x").exists()


def test_method_names_come_from_the_registries(site, capsys):
    """recalibrate and adapt take their method names from the registries: an unknown one is one line
    with the closest name, refused before any scan is read; a local update registered here is accepted."""
    bundle, local = site / "run" / "bundle", site / "local.csv"
    assert main(["recalibrate", str(bundle), str(local), "--out", str(site / "y"), "--method", "intercpt"]) == 2
    line = capsys.readouterr().err.splitlines()[0]
    assert line.startswith("error: unknown recalibration method 'intercpt'; did you mean 'intercept'?")
    assert "auto, intercept, logistic" in line and "platt" in line
    assert main(["adapt", str(bundle), str(local), "--out", str(site / "y"), "--method", "adabm"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown normalisation adaptation 'adabm'; did you mean 'adabn'?")
    assert not (site / "y").exists()

    @register_local_update
    class HalfIntercept(InterceptUpdate):
        method = "half_intercept"

    try:
        assert main(["recalibrate", str(bundle), str(local), "--out", str(site / "y"), "--method", "half_intercept"]) == 0
        assert json.loads((site / "y" / "bundle.json").read_text())["calibration"]["method"] == "half_intercept"
    finally:
        LOCAL_UPDATES.unregister("half_intercept")

def _inverted_folder(root: Path, n: int) -> Path:
    """Synthetic chest radiographs written with inverted intensities: a different site pipeline."""
    rng = np.random.default_rng(5)
    for i in range(n):
        image = chest_phantom(rng, 48, bool(i % 3 == 0))
        write_dicom(root / f"scan{i:02d}.dcm", image.max() - image, patient=f"{i:03d}", uid_seed=f"inv{i}")
    return root


def test_predict_adds_ood_columns_and_a_folder_verdict(site, capsys):
    bundle = site / "run" / "bundle"
    shifted = _inverted_folder(site / "inverted", 24)
    preds = site / "preds_inverted.csv"
    assert main(["predict", str(bundle), str(shifted), "--out", str(preds), "--workers", "0", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    rows = list(csv.DictReader(open(preds)))
    assert list(rows[0])[-3:] == ["ood_distance", "ood_p", "fingerprint"]
    assert all(0 < float(r["ood_p"]) <= 1 and float(r["ood_distance"]) > 0 for r in rows)
    summary = json.loads(preds.with_name("preds_inverted.summary.json").read_text())
    assert summary["predicted"] == 24 and summary["shift"]["test"] == "mmd" and summary["shift"]["n_scans"] == 24
    assert summary["shift"]["shifted"] and summary["shift"]["pvalue"] < 0.05 and "shift alarm" in out
    # the bundle's own kind of scans: no alarm on the training data's site
    local = site / "preds_local.csv"
    assert main(["predict", str(bundle), str(site / "local.csv"), "--out", str(local), "--workers", "0", "--no-shift-check"]) == 0
    assert "ood_p" not in next(csv.DictReader(open(local))) and "no shift alarm" in capsys.readouterr().out


def test_predict_without_a_reference_says_so(site, tmp_path, capsys):
    import shutil

    old = tmp_path / "old_bundle"
    shutil.copytree(site / "run" / "bundle", old)
    (old / REFERENCE_FILE).unlink()
    preds = tmp_path / "p.csv"
    assert main(["predict", str(old), str(site / "local.csv"), "--out", str(preds), "--workers", "0"]) == 0
    assert "no feature reference" in capsys.readouterr().out
    assert "ood_p" not in next(csv.DictReader(open(preds)))
    assert json.loads((tmp_path / "p.summary.json").read_text())["shift"]["shifted"] is None


def test_adapt_renormalises_keeps_calibration_and_estimates_prevalence(site, capsys):
    parent, out = site / "run" / "bundle", site / "adapted"
    shifted = site / "inverted" if (site / "inverted").is_dir() else _inverted_folder(site / "inverted", 24)
    assert main(["adapt", str(parent), str(shifted), "--method", "adabn", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "estimated prevalence" in printed
    meta, old = json.loads((out / "bundle.json").read_text()), json.loads((parent / "bundle.json").read_text())
    assert meta["calibration"] == old["calibration"] and meta["operating_point"] == old["operating_point"]
    assert meta["provenance"][-1]["step"] == "adapt" and meta["provenance"][-1]["unlabelled_set"]["scans"] == 24
    from safetensors.torch import load_file

    a, b = load_file(parent / "model.safetensors"), load_file(out / "model.safetensors")
    assert not torch.equal(a["backbone.bn1.running_mean"], b["backbone.bn1.running_mean"])
    assert torch.equal(a["backbone.conv1.weight"], b["backbone.conv1.weight"])  # AdaBN changes no weight
    report = json.loads((out / "adaptation.json").read_text())
    prevalence = report["label_shift"]["prevalence"]
    assert 0 <= prevalence["ci"][0] <= prevalence["value"] <= prevalence["ci"][1] <= 1
    assert report["shift_test"]["before"]["shifted"]  # inverted scans are unlike the training data
    assert any("few" in w for w in report["warnings"])  # 24 scans


def test_adapt_failure_leaves_no_half_made_bundle(site, monkeypatch, capsys):
    from medtl.bundle import site as site_module

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(site_module, "save_file", broken)
    out = site / "adapted_broken"
    assert main(["adapt", str(site / "run" / "bundle"), str(site / "local.csv"), "--out", str(out)]) == 2
    assert "disk full" in capsys.readouterr().err
    assert not out.exists() and not list(site.glob(".adapted_broken.*"))


def test_python_api_tent_then_predict_with_the_alarm(site):
    from medtl.bundle import adapt
    from medtl.infer import predict_scans

    shifted = site / "inverted" if (site / "inverted").is_dir() else _inverted_folder(site / "inverted", 24)
    result = adapt(site / "run" / "bundle", shifted, site / "tented", method="tent", tent_steps=2)
    assert result.report["method"] == "tent" and json.loads((result.bundle / "bundle.json").read_text())["provenance"][-1]["tent_steps"] == 2
    summary = predict_scans(load(result.bundle), shifted, site / "tent_preds.csv", num_workers=0, batch_size=8, progress=False)
    assert summary.predicted == 24 and summary.shift["test"] == "mmd" and 0 < summary.shift["pvalue"] <= 1
    assert json.loads(summary.summary_file.read_text())["shift"] == summary.shift
