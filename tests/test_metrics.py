"""medtl.metrics pinned against pROC (aSAH data), scikit-learn, closed forms and hand calculations."""

import csv
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from scipy.special import expit, logit
from sklearn.metrics import brier_score_loss, roc_auc_score

from medtl.metrics import (
    auroc_point,
    bootstrap_ci,
    brier_score,
    calibration_slope_intercept,
    choose_operating_point,
    decision_curve,
    delong_test,
    expected_calibration_error,
    maximum_calibration_error,
    proportion_ci,
    roc_auc,
)

ASAH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "asah" / "aSAH.csv"
needs_asah = pytest.mark.skipif(not ASAH.is_file(), reason=f"pROC's aSAH data is not present at {ASAH}")
REL = 1e-10


@pytest.fixture(scope="module")
def asah() -> dict[str, np.ndarray]:
    """Outcome (Poor = 1) and the three markers of pROC's aSAH data set."""
    with ASAH.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    data = {name: np.array([float(r[name]) for r in rows]) for name in ("s100b", "ndka", "wfns")}
    data["y"] = np.array([r["outcome"] == "Poor" for r in rows], dtype=int)
    return data


# --- (a) pROC reference values on aSAH -------------------------------------------------------


@needs_asah
def test_asah_has_the_expected_cases(asah):
    assert len(asah["y"]) == 113 and asah["y"].sum() == 41


@needs_asah
@pytest.mark.parametrize(
    "marker, auc, variance",
    [("s100b", 0.731368563685637, 0.00266868245717244), ("wfns", 0.823678861788618, 0.00146991470882363)],
)
def test_auc_and_delong_variance_match_proc(asah, marker, auc, variance):
    result = roc_auc(asah["y"], asah[marker])
    assert result.auc == pytest.approx(auc, rel=REL)
    assert result.variance == pytest.approx(variance, rel=REL)
    assert (result.n_positive, result.n_negative) == (41, 72)


@needs_asah
def test_ndka_delong_ci_matches_proc(asah):
    result = roc_auc(asah["y"], asah["ndka"])
    assert result.auc == pytest.approx(0.611957994579946, rel=REL)
    assert result.ci == pytest.approx((0.501244999271703, 0.722670989888189), rel=REL)


@needs_asah
def test_youden_threshold_matches_proc(asah):
    point = choose_operating_point(asah["y"], asah["s100b"], "youden")
    assert point.threshold == pytest.approx(0.205, abs=1e-12)
    assert point.sensitivity == pytest.approx(26 / 41, rel=REL)
    assert point.specificity == pytest.approx(58 / 72, rel=REL)


@needs_asah
@pytest.mark.parametrize(
    "target, specificity",
    [
        # pROC coords(input = "sensitivity", ret = "specificity") on roc(outcome, s100b)
        (0.8, 0.447222222222222),
        # by hand with pROC's rule: between the ROC points (34/41, 28/72) and (32/41, 35/72)
        # the first gives 0.8 at share 0.4 -> (35 - 0.4 * 7) / 72; at 0.9 between (37/41, 16/72)
        # and (36/41, 22/72) at share 0.1 -> (16 + 0.1 * 6) / 72
        (0.9, 16.6 / 72),
    ],
)
def test_interpolated_specificity_at_sensitivity_matches_proc(asah, target, specificity):
    point = choose_operating_point(asah["y"], asah["s100b"], "sensitivity", target)
    assert point.interpolated_specificity == pytest.approx(specificity, rel=REL)
    assert point.sensitivity >= target


@needs_asah
def test_delong_test_is_antisymmetric(asah):
    forward = delong_test(asah["y"], asah["s100b"], asah["ndka"])
    backward = delong_test(asah["y"], asah["ndka"], asah["s100b"])
    assert forward.difference == pytest.approx(0.731368563685637 - 0.611957994579946, rel=REL)
    assert backward.statistic == pytest.approx(-forward.statistic, rel=1e-12)
    assert backward.pvalue == pytest.approx(forward.pvalue, rel=1e-12)
    assert backward.ci == pytest.approx((-forward.ci[1], -forward.ci[0]), rel=1e-12)
    assert 0 < forward.pvalue < 1 and forward.se > 0


# --- (b) agreement with scikit-learn ----------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 500)
    scores = np.round(rng.normal(size=500) + 0.7 * y, 1)  # rounding makes many ties
    assert len(np.unique(scores)) < 100
    assert roc_auc(y, scores).auc == pytest.approx(roc_auc_score(y, scores), rel=1e-12)


def test_brier_matches_sklearn():
    rng = np.random.default_rng(3)
    prob = rng.random(1000)
    y = (rng.random(1000) < prob).astype(int)
    assert brier_score(y, prob) == pytest.approx(brier_score_loss(y, prob), rel=1e-12)
    labels = np.where(y == 1, "sick", "well")
    assert brier_score(labels, prob, positive="sick") == pytest.approx(brier_score_loss(y, prob), rel=1e-12)


# --- (c) calibration slope properties ---------------------------------------------------------


@pytest.fixture(scope="module")
def logistic_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(4)
    z = rng.normal(scale=1.5, size=5000)
    y = (rng.random(5000) < expit(z)).astype(int)
    return z, y


def test_recalibrated_probabilities_have_slope_one_and_intercept_zero(logistic_data):
    z, y = logistic_data
    fit = calibration_slope_intercept(y, expit(z))
    z_hat = fit.cox_intercept.value + fit.slope.value * z
    refit = calibration_slope_intercept(y, expit(z_hat))
    assert refit.slope.value == pytest.approx(1.0, abs=1e-6)
    assert refit.cox_intercept.value == pytest.approx(0.0, abs=1e-6)
    assert refit.intercept.value == pytest.approx(0.0, abs=1e-6)
    assert refit.slope.ci[0] < 1 < refit.slope.ci[1]


def test_doubled_logits_halve_the_slope(logistic_data):
    z, y = logistic_data
    fit = calibration_slope_intercept(y, expit(z))
    z_hat = fit.cox_intercept.value + fit.slope.value * z
    doubled = calibration_slope_intercept(y, expit(2 * z_hat))
    assert doubled.slope.value == pytest.approx(0.5, abs=1e-6)
    assert doubled.cox_intercept.value == pytest.approx(0.0, abs=1e-6)


def test_slope_matches_the_logistic_score_equations(logistic_data):
    z, y = logistic_data
    fit = calibration_slope_intercept(y, expit(0.6 * z + 0.3))
    lp = logit(expit(0.6 * z + 0.3))
    residual = y - expit(fit.cox_intercept.value + fit.slope.value * lp)
    assert abs(residual.sum()) < 1e-8 and abs((residual * lp).sum()) < 1e-8
    assert fit.slope.value == pytest.approx(1 / 0.6, rel=0.1)


# --- (d) small examples by hand ---------------------------------------------------------------


def test_auc_by_hand():
    # pairs (positive, negative): (0.35, 0.1) yes, (0.35, 0.4) no, (0.8, 0.1) yes, (0.8, 0.4) yes
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]).auc == 0.75
    # a tie counts one half
    assert roc_auc([0, 1], [0.5, 0.5]).auc == 0.5


def test_ece_and_mce_by_hand_with_15_bins():
    # bins [1/15, 2/15): 0.1, 0.1 with outcomes 0, 1 -> gap |0.5 - 0.1| = 0.4 (weight 2/5);
    # [13/15, 14/15): 0.9, 0.9, both 1 -> gap 0.1 (weight 2/5); the closed last bin: 1.0 -> gap 0
    y, prob = [0, 1, 1, 1, 1], [0.1, 0.1, 0.9, 0.9, 1.0]
    assert expected_calibration_error(y, prob, n_bins=15) == pytest.approx(0.4 * 2 / 5 + 0.1 * 2 / 5, rel=1e-12)
    assert maximum_calibration_error(y, prob, n_bins=15) == pytest.approx(0.4, rel=1e-12)
    # top-label form: confidences 0.7, 0.6, 0.8; correct, wrong, correct; bins 10, 9, 12
    probs = np.array([[0.7, 0.3], [0.4, 0.6], [0.2, 0.8]])
    expected = (abs(1 - 0.7) + abs(0 - 0.6) + abs(1 - 0.8)) / 3
    assert expected_calibration_error([0, 0, 1], probs, n_bins=15) == pytest.approx(expected, rel=1e-12)


def test_wilson_interval_closed_form():
    k, n = 8, 10
    z = stats.norm.ppf(0.975)
    p = k / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    estimate = proportion_ci(k, n, interval="wilson")
    assert estimate.value == 0.8 and (estimate.numerator, estimate.denominator) == (8, 10)
    assert estimate.ci == pytest.approx((centre - half, centre + half), rel=1e-12)


def test_clopper_pearson_matches_beta_quantiles():
    k, n = 8, 10
    estimate = proportion_ci(k, n, interval="clopper-pearson")
    low, high = stats.beta.ppf(0.025, k, n - k + 1), stats.beta.ppf(0.975, k + 1, n - k)
    assert estimate.ci == pytest.approx((low, high), rel=1e-9)
    assert proportion_ci(0, 5, interval="clopper-pearson").ci[0] == 0.0
    assert proportion_ci(5, 5, interval="clopper-pearson").ci[1] == 1.0


def test_net_benefit_by_hand_at_one_half():
    y = [1, 1, 1, 0, 0, 0, 0, 1]
    prob = [0.9, 0.8, 0.3, 0.7, 0.1, 0.2, 0.5, 0.6]
    # treated (prob >= 0.5): cases 0, 1, 3, 6, 7 -> TP 3 (0, 1, 7), FP 2 (3, 6); odds 0.5/0.5 = 1
    curve = decision_curve(y, prob, thresholds=[0.5])
    assert curve.net_benefit[0] == pytest.approx(3 / 8 - 2 / 8 * 1.0, rel=1e-12)
    assert curve.treat_all[0] == pytest.approx(0.5 - 0.5 * 1.0, abs=1e-15)
    assert curve.treat_none[0] == 0 and curve.prevalence == 0.5


def test_bootstrap_ci_is_deterministic_for_a_seed():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 200)
    s = rng.normal(size=200) + y

    def auc(yy, ss):
        return roc_auc(yy, ss).auc

    first = bootstrap_ci(auc, y, s, n_resamples=300, seed=7)
    again = bootstrap_ci(auc, y, s, n_resamples=300, seed=7)
    other = bootstrap_ci(auc, y, s, n_resamples=300, seed=8)
    assert first == again
    assert first.ci != other.ci
    assert first.estimate == auc(y, s) and first.ci[0] < first.estimate < first.ci[1]
    assert first.n_valid == 300 and first.stratified


def test_most_probable_is_half_on_the_probability_with_its_own_rates():
    y = np.array([0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.45, 0.62, 0.48, 0.5, 0.7, 0.9])
    point = choose_operating_point(y, p, "most_probable")
    assert point.threshold == 0.5
    assert point.sensitivity == pytest.approx(3 / 4) and point.specificity == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="takes no target"):
        choose_operating_point(y, p, "most_probable", 0.9)


def test_auroc_point_matches_scikit_learn_binary_and_macro_one_vs_rest():
    rng = np.random.default_rng(3)
    y2 = rng.integers(0, 2, 80)
    s = rng.random(80).round(2)  # with ties
    p2 = np.c_[1 - s, s]
    assert auroc_point(y2, p2) == pytest.approx(roc_auc_score(y2, p2[:, 1]), abs=1e-12)
    y4 = rng.integers(0, 4, 120)
    p4 = rng.dirichlet(np.ones(4), 120)
    assert auroc_point(y4, p4) == pytest.approx(roc_auc_score(y4, p4, multi_class="ovr", average="macro"), abs=1e-12)
