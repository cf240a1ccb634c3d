"""Calibrators on logits: known-parameter recovery, NLL/ECE improvement, serialisation, errors."""

import json

import numpy as np
import pytest
from scipy.special import log_softmax, softmax
from sklearn.isotonic import IsotonicRegression

from medtl.calibrate import (
    CALIBRATORS,
    BetaCalibration,
    Calibrator,
    IsotonicCalibration,
    NotFittedError,
    PlattScaling,
    TemperatureScaling,
    calibrator_from_dict,
    make_calibrator,
)
from medtl.config import CalibrationConfig
from medtl.metrics import expected_calibration_error

MULTICLASS = ["temperature", "vector", "matrix", "isotonic"]
CASES = [(m, 2) for m in CALIBRATORS if m != "none"] + [(m, 4) for m in MULTICLASS]


def _sample(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One class index per row of ``probs``."""
    return (rng.random((len(probs), 1)) > probs.cumsum(axis=1)).sum(axis=1)


def _overconfident(n: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits three times too large (with a class bias) for the labels they were drawn from."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(scale=1.5, size=(n, n_classes))
    labels = _sample(softmax(true_logits, axis=1), rng)
    return 3.0 * true_logits + np.linspace(0.0, 1.0, n_classes), labels


def _nll(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.mean(np.log(probs[np.arange(len(labels)), labels])))


def test_config_accepts_every_registered_calibrator():
    for name in [*CALIBRATORS, "auto"]:
        assert CalibrationConfig(method=name).method == name
    with pytest.raises(ValueError, match="unknown calibration method 'histogram'"):
        CalibrationConfig(method="histogram")
    for name, cls in CALIBRATORS.items():
        calibrator = make_calibrator(name)
        assert isinstance(calibrator, cls) and isinstance(calibrator, Calibrator) and calibrator.method == name


def test_auto_is_platt_for_two_classes_and_temperature_otherwise():
    assert make_calibrator("auto", 2).method == "platt"
    assert make_calibrator("auto", 5).method == "temperature"
    with pytest.raises(ValueError, match="number of classes"):
        make_calibrator("auto")


def test_platt_never_reverses_the_ranking():
    rng = np.random.default_rng(0)
    margin = rng.normal(size=400)
    labels = (rng.random(400) < 1 / (1 + np.exp(3 * margin))).astype(int)  # anti-correlated scores
    logits = np.column_stack([np.zeros(400), margin])
    calibrator = make_calibrator("platt").fit(logits, labels)
    assert calibrator.slope_ == 0.0
    np.testing.assert_allclose(calibrator.transform(logits)[:, 1], labels.mean(), atol=1e-6)


def test_temperature_recovers_known_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(20000, 10))
    labels = _sample(softmax(logits / 2.5, axis=1), rng)
    calibrator = TemperatureScaling().fit(logits, labels)
    assert calibrator.temperature_ == pytest.approx(2.5, rel=0.03)
    # a stationary point of the NLL, and the ranking of every case is kept
    nll = lambda t: -log_softmax(logits / t, axis=1)[np.arange(len(labels)), labels].mean()  # noqa: E731
    assert nll(calibrator.temperature_) <= min(nll(calibrator.temperature_ * 1.001), nll(calibrator.temperature_ / 1.001))
    probs = calibrator.transform(logits)
    np.testing.assert_array_equal(probs.argmax(axis=1), logits.argmax(axis=1))


@pytest.mark.parametrize("method, n_classes", CASES)
def test_nll_does_not_increase_on_the_fitting_data(method, n_classes):
    logits, labels = _overconfident(4000, n_classes, seed=1)
    probs = make_calibrator(method).fit(logits, labels).transform(logits)
    assert probs.shape == logits.shape and probs.dtype == np.float64
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    before = _nll(softmax(logits, axis=1), labels)
    assert _nll(probs, labels) < before - 0.1


@pytest.mark.parametrize("method, n_classes", CASES)
def test_ece_drops_on_held_out_overconfident_data(method, n_classes):
    logits, labels = _overconfident(8000, n_classes, seed=2)
    fit, test = slice(0, 4000), slice(4000, None)
    calibrator = make_calibrator(method).fit(logits[fit], labels[fit])
    before = expected_calibration_error(labels[test], softmax(logits[test], axis=1))
    after = expected_calibration_error(labels[test], calibrator.transform(logits[test]))
    assert before > 0.1
    assert after < 0.3 * before


def test_none_is_the_plain_softmax():
    logits, labels = _overconfident(100, 3, seed=3)
    probs = make_calibrator("none").fit(logits, labels).transform(logits)
    np.testing.assert_array_equal(probs, softmax(logits, axis=1))


@pytest.mark.parametrize("method, n_classes", CASES + [("none", 3)])
def test_dict_round_trip_gives_identical_output(method, n_classes):
    logits, labels = _overconfident(3000, n_classes, seed=4)
    calibrator = make_calibrator(method).fit(logits, labels)
    stored = json.loads(json.dumps(calibrator.to_dict()))
    assert stored["method"] == method and stored["n_classes"] == n_classes
    rebuilt = calibrator_from_dict(stored)
    assert type(rebuilt) is type(calibrator)
    new = np.r_[_overconfident(500, n_classes, seed=5)[0], np.full((1, n_classes), 80.0) * np.arange(n_classes)]
    np.testing.assert_array_equal(rebuilt.transform(new), calibrator.transform(new))


def test_isotonic_binary_matches_sklearn_exactly():
    logits, labels = _overconfident(3000, 2, seed=6)
    calibrator = IsotonicCalibration().fit(logits, labels)
    reference = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(softmax(logits, axis=1)[:, 1], labels)
    new = np.r_[_overconfident(2000, 2, seed=7)[0], [[40.0, -40.0], [-40.0, 40.0]]]
    probs = calibrator.transform(new)
    np.testing.assert_array_equal(probs[:, 1], reference.predict(softmax(new, axis=1)[:, 1]))
    np.testing.assert_array_equal(probs[:, 0], 1.0 - probs[:, 1])


def test_isotonic_multiclass_is_one_vs_rest_renormalised():
    logits, labels = _overconfident(3000, 3, seed=8)
    calibrator = IsotonicCalibration().fit(logits, labels)
    p = softmax(logits, axis=1)
    new = _overconfident(1000, 3, seed=9)[0]
    q = softmax(new, axis=1)
    per_class = np.column_stack(
        [
            IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(p[:, k], labels == k).predict(q[:, k])
            for k in range(3)
        ]
    )
    np.testing.assert_allclose(calibrator.transform(new), per_class / per_class.sum(axis=1, keepdims=True), rtol=1e-15)


def test_platt_solves_the_logistic_score_equations():
    logits, labels = _overconfident(5000, 2, seed=10)
    calibrator = PlattScaling().fit(logits, labels)
    residual = labels - calibrator.transform(logits)[:, 1]
    margin = logits[:, 1] - logits[:, 0]
    assert abs(residual.mean()) < 1e-7 and abs((residual * margin).mean()) < 1e-7
    assert 0.2 < calibrator.slope_ < 0.5  # the logits are three times too large


def test_beta_keeps_its_coefficients_non_negative():
    rng = np.random.default_rng(11)
    logits = rng.normal(scale=2.0, size=(3000, 2))
    labels = _sample(softmax(-logits, axis=1), rng)  # the scores point the wrong way
    calibrator = BetaCalibration().fit(logits, labels)
    assert calibrator.a_ >= 0 and calibrator.b_ >= 0
    margins = np.column_stack([np.zeros(200), np.linspace(-6, 6, 200)])  # the model's score, increasing
    probs = calibrator.transform(margins)[:, 1]
    assert np.all(np.diff(probs) >= -1e-12)  # never reverses the model's ranking, even fitted on reversed labels
    right_way = BetaCalibration().fit(logits, _sample(softmax(logits, axis=1), rng))
    rising = right_way.transform(margins)[:, 1]
    assert np.all(np.diff(rising) >= -1e-12) and rising[-1] - rising[0] > 0.9


def test_platt_and_beta_refuse_multiclass():
    logits, labels = _overconfident(100, 3, seed=12)
    for method in ("platt", "beta"):
        with pytest.raises(ValueError, match="binary"):
            make_calibrator(method).fit(logits, labels)


@pytest.mark.parametrize("method", list(CALIBRATORS))
def test_transform_before_fit_is_refused(method):
    calibrator = make_calibrator(method)
    with pytest.raises(NotFittedError, match="fit"):
        calibrator.transform(np.zeros((2, 2)))
    with pytest.raises(NotFittedError):
        calibrator.to_dict()


def test_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match="registered: .*temperature"):
        make_calibrator("histogram")
    with pytest.raises(ValueError, match="unknown calibration method"):
        calibrator_from_dict({"method": "histogram"})


@pytest.mark.parametrize(
    "logits, labels, fragment",
    [
        (np.array([[0.0, np.nan], [1.0, 0.0]]), [0, 1], "NaN or infinite"),
        (np.array([[0.0, np.inf], [1.0, 0.0]]), [0, 1], "NaN or infinite"),
        (np.zeros(4), [0, 1, 0, 1], "shape"),
        (np.zeros((4, 1)), [0, 0, 0, 0], "C >= 2"),
        (np.zeros((4, 2)), [0, 1, 0], "shape"),
        (np.zeros((4, 2)), [0, 1, 2, 1], r"\[0, 2\)"),
        (np.zeros((4, 2)), [0.0, 0.5, 1.0, 1.0], "integer"),
    ],
)
def test_bad_inputs_are_value_errors(logits, labels, fragment):
    with pytest.raises(ValueError, match=fragment):
        TemperatureScaling().fit(logits, labels)


def test_transform_checks_class_count_and_finiteness():
    logits, labels = _overconfident(200, 3, seed=13)
    calibrator = make_calibrator("vector").fit(logits, labels)
    with pytest.raises(ValueError, match="fitted on 3 classes"):
        calibrator.transform(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="NaN or infinite"):
        calibrator.transform(np.array([[0.0, 1.0, np.nan]]))


def test_from_dict_rejects_damaged_parameters():
    logits, labels = _overconfident(200, 3, seed=14)
    stored = make_calibrator("vector").fit(logits, labels).to_dict()
    with pytest.raises(ValueError, match="scale"):
        calibrator_from_dict({**stored, "scale": [1.0, 1.0]})
    with pytest.raises(ValueError, match="lacks 'bias'"):
        calibrator_from_dict({k: v for k, v in stored.items() if k != "bias"})
    with pytest.raises(ValueError, match="temperature must be > 0"):
        calibrator_from_dict({"method": "temperature", "n_classes": 2, "temperature": -1.0})
    with pytest.raises(ValueError, match="n_classes"):
        calibrator_from_dict({"method": "platt", "n_classes": 3, "slope": 1.0, "intercept": 0.0})
