"""The training stages on their own: prepare_data's partitions, classes and target scans, and
calibrate's choice of calibration scans (pooled out-of-fold, pooled seed ensemble, or validation)."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medtl.config import Config
from medtl.io import ScanRecord
from medtl.pipeline import FittedMember, calibrate, prepare_data
from medtl.train import FitResult, Member


def _records() -> list[ScanRecord]:
    rows = [("train", "a"), ("train", "b"), ("val", "a"), ("val", "b"), ("test", "b"), (None, None)]
    return [ScanRecord(image=Path(f"s{i}.png"), label=label, split=split, site="B" if label is None else "A", patient_id=f"p{i}")
            for i, (split, label) in enumerate(rows)]


def test_prepare_data_gives_partitions_classes_and_target_scans():
    config = Config.model_validate({"data": {"manifest": "m.csv", "positive_class": "a"}, "adapt": {"domain": "adabn"}})
    data = prepare_data(config, _records())
    assert data.classes == ["a", "b"] and data.positive == 0
    assert {k: [r.image.name for r in v] for k, v in data.parts.items()} == {
        "train": ["s0.png", "s1.png"], "val": ["s2.png", "s3.png"], "test": ["s4.png"]}
    assert [r.image.name for r in data.targets] == ["s5.png"]
    without_test = prepare_data(config, [r for r in _records() if r.split != "test"])
    assert "test" not in without_test.parts
    with pytest.raises(ValueError, match="the 'val' split is empty"):
        prepare_data(config, [r for r in _records() if r.split != "val"])


def _member(name: str, logits: np.ndarray, labels: np.ndarray, model: torch.nn.Module) -> FittedMember:
    return FittedMember(Member(name, [], [], 0), model, FitResult(), logits, labels)


def test_calibrate_fits_on_pooled_out_of_fold_or_ensemble_predictions():
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 2
    logits = [rng.normal(size=(40, 2)) + 2 * np.eye(2)[labels] for _ in range(2)]
    models = [torch.nn.Linear(2, 2) for _ in range(2)]
    fitted = [_member(f"m{i}", logits[i], labels, models[i]) for i in range(2)]
    ensemble = SimpleNamespace(combine="log_prob_mean")  # all calibrate reads of an Ensemble

    folds = Config.model_validate({"train": {"folds": 2}, "calibration": {"method": "temperature"}})
    cv = calibrate(folds, fitted, ensemble, ["a", "b"], positive=1)
    log_probs = np.concatenate([torch.log_softmax(torch.as_tensor(z, dtype=torch.float64), 1).numpy() for z in logits])
    np.testing.assert_allclose(cv.logits, log_probs)
    assert cv.labels.tolist() == labels.tolist() * 2 and cv.fitted_on == "the pooled out-of-fold predictions (80 scans)"
    assert cv.operating_point is not None and cv.calibrator.method == "temperature"

    seeds = calibrate(Config.model_validate({"train": {"seeds": 2}}), fitted, ensemble, ["a", "b"], positive=1)
    pooled = torch.as_tensor(log_probs).reshape(2, 40, 2).mean(0).log_softmax(1)  # the Ensemble's own rule
    np.testing.assert_allclose(seeds.logits, pooled.numpy())
    assert seeds.fitted_on == "the validation split (40 scans)" and seeds.calibrator.method == "platt"  # auto, two classes

    single = calibrate(Config(), fitted[:1], models[0], ["a", "b"], positive=None)
    assert single.logits is logits[0] and single.operating_point is None
