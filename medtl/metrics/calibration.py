"""Calibration metrics: ECE, adaptive ECE, MCE, Brier, calibration slope and intercept, reliability data.

Forms.  A 1-D ``prob`` is the positive-class probability of a binary task (outcome:
``y_true == positive``).  A 2-D ``prob`` ``(N, C)`` gives the *top-label* form for ECE/MCE
(confidence = max probability, outcome = "the argmax class is right", Guo et al. 2017) and the
multi-class Brier score ``mean(sum_c (p_c - 1[y = c])^2)`` (range 0-2; for C = 2 it is twice the
binary Brier of either class).

Bins.  ``uniform``: ``n_bins`` equal-width bins with edges ``k / n_bins``; bin ``k`` is
``[e_k, e_(k+1))`` and the last bin is closed, ``[e_(n-1), 1]``.  ``quantile`` (adaptive ECE,
Nixon et al. 2019): cases sorted by confidence (ties in input order) and split into ``n_bins``
groups of equal count (sizes differ by at most one, larger groups first, as ``numpy.array_split``).
ECE = sum over bins of (bin count / N) * |observed frequency - mean confidence|;
MCE = the largest such gap over non-empty bins.

Slope and intercept (logistic recalibration, Cox 1958): ``logit P(y) = a + b * logit(p)``
fitted by maximum likelihood (Newton-Raphson, float64); ``slope = b``.  ``intercept`` is the
calibration-in-the-large ``a`` with the slope fixed at 1 (``logit P(y) = a + offset(logit p)``,
Van Calster et al. 2016); ``cox_intercept`` is ``a`` of the joint fit.  CIs are Wald intervals
from the observed information.  ``p`` is clipped to ``[eps, 1 - eps]`` before the logit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats
from scipy.special import expit, logit

from medtl.metrics._checks import binary_outcome, class_labels, conf_level_ok, probabilities
from medtl.metrics.bootstrap import bootstrap_weighted
from medtl.metrics.threshold import Estimate

STRATEGIES = ("uniform", "quantile")


def confidence_and_outcome(y_true, prob, *, positive=1) -> tuple[np.ndarray, np.ndarray, str]:
    """``(confidence, outcome, form)``: the positive-class form for 1-D ``prob``, top-label for 2-D."""
    p = probabilities(prob)
    if p.ndim == 1:
        return p, binary_outcome(y_true, positive, len(p), need_both=False).astype(np.float64), "positive-class probability"
    y = class_labels(y_true, len(p), p.shape[1])
    return p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64), "top-label (max probability vs argmax correct)"


def _uniform_bin_index(conf: np.ndarray, n_bins: int) -> np.ndarray:
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.minimum(np.searchsorted(edges, conf, side="right") - 1, n_bins - 1)


def _quantile_positions(n: int, n_bins: int) -> np.ndarray:
    sizes = [len(part) for part in np.array_split(np.arange(n), n_bins)]
    return np.r_[0, np.cumsum(sizes)]


def binned_sums(conf: np.ndarray, outcome: np.ndarray, weights: np.ndarray, n_bins: int, strategy: str):
    """Per-bin ``(count, sum of confidence, sum of outcome)``, each ``(rows, n_bins)``, for case
    multiplicities ``weights`` ``(rows, N)`` (one row of ones: the data itself)."""
    if strategy == "uniform":
        onehot = np.eye(n_bins)[_uniform_bin_index(conf, n_bins)]
        return weights @ onehot, weights @ (onehot * conf[:, None]), weights @ (onehot * outcome[:, None])
    if strategy != "quantile":
        raise ValueError(f"unknown binning strategy {strategy!r}; choose one of {STRATEGIES}")
    order = np.argsort(conf, kind="stable")
    c, o, w = conf[order], outcome[order], weights[:, order]
    zeros = np.zeros((len(w), 1))
    cum_w = np.concatenate([zeros, np.cumsum(w, axis=1)], axis=1)
    cum_c = np.concatenate([zeros, np.cumsum(w * c, axis=1)], axis=1)
    cum_o = np.concatenate([zeros, np.cumsum(w * o, axis=1)], axis=1)
    rows = np.arange(len(w))
    c_pad, o_pad = np.r_[c, 0.0], np.r_[o, 0.0]

    def at(position: float) -> tuple[np.ndarray, np.ndarray]:
        # sums over the first `position` sorted copies: whole cases, then part of the next one
        j = (cum_w[:, 1:] <= position).sum(axis=1)
        rest = position - cum_w[rows, j]
        return cum_c[rows, j] + rest * c_pad[j], cum_o[rows, j] + rest * o_pad[j]

    n_total = int(round(weights[0].sum()))
    positions = _quantile_positions(n_total, n_bins)
    sums = [at(t) for t in positions]
    counts = np.tile(np.diff(positions).astype(np.float64), (len(w), 1))
    sum_c = np.stack([b[0] - a[0] for a, b in zip(sums[:-1], sums[1:])], axis=1)
    sum_o = np.stack([b[1] - a[1] for a, b in zip(sums[:-1], sums[1:])], axis=1)
    return counts, sum_c, sum_o


def ece_from_sums(counts: np.ndarray, sum_c: np.ndarray, sum_o: np.ndarray) -> np.ndarray:
    return np.abs(sum_o - sum_c).sum(axis=1) / counts.sum(axis=1)


def mce_from_sums(counts: np.ndarray, sum_c: np.ndarray, sum_o: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        gaps = np.where(counts > 0, np.abs(sum_o - sum_c) / counts, -np.inf)
    return gaps.max(axis=1)


def _check_bins(n_bins: int) -> int:
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins}")
    return int(n_bins)


def _calibration_error(y_true, prob, n_bins: int, positive, strategy: str, reduce) -> float:
    conf, outcome, _ = confidence_and_outcome(y_true, prob, positive=positive)
    if len(conf) == 0:
        raise ValueError("calibration error of an empty sample")
    return float(reduce(*binned_sums(conf, outcome, np.ones((1, len(conf))), _check_bins(n_bins), strategy))[0])


def expected_calibration_error(y_true, prob, n_bins: int = 15, *, positive=1) -> float:
    """ECE with ``n_bins`` equal-width bins (binary: positive-class prob; 2-D prob: top-label)."""
    return _calibration_error(y_true, prob, n_bins, positive, "uniform", ece_from_sums)


def adaptive_calibration_error(y_true, prob, n_bins: int = 15, *, positive=1) -> float:
    """Adaptive ECE: ``n_bins`` equal-count bins."""
    return _calibration_error(y_true, prob, n_bins, positive, "quantile", ece_from_sums)


def maximum_calibration_error(y_true, prob, n_bins: int = 15, *, positive=1) -> float:
    """MCE: the largest |observed - mean confidence| over non-empty equal-width bins."""
    return _calibration_error(y_true, prob, n_bins, positive, "uniform", mce_from_sums)


@dataclass(frozen=True)
class ReliabilityCurve:
    """Reliability diagram data: per bin its range, count, mean confidence and observed frequency
    (``None`` for empty bins)."""

    strategy: str
    form: str
    n_bins: int
    bin_ranges: list[tuple[float, float]]
    counts: list[int]
    mean_confidence: list[float | None]
    observed: list[float | None]
    convention: str

    def to_dict(self) -> dict:
        return asdict(self)


def reliability_curve(y_true, prob, n_bins: int = 15, *, strategy: str = "uniform", positive=1) -> ReliabilityCurve:
    """Binned mean confidence vs observed frequency (see the module docstring for bins)."""
    n_bins = _check_bins(n_bins)
    conf, outcome, form = confidence_and_outcome(y_true, prob, positive=positive)
    counts, sum_c, sum_o = (a[0] for a in binned_sums(conf, outcome, np.ones((1, len(conf))), n_bins, strategy))
    if strategy == "uniform":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
        ranges = [(float(edges[k]), float(edges[k + 1])) for k in range(n_bins)]
        convention = f"{n_bins} equal-width bins [k/{n_bins}, (k+1)/{n_bins}), the last closed at 1"
    else:
        order = np.sort(conf)
        positions = _quantile_positions(len(conf), n_bins)
        ranges = [
            (float(order[a]), float(order[b - 1])) if b > a else (float("nan"), float("nan"))
            for a, b in zip(positions[:-1], positions[1:])
        ]
        convention = f"{n_bins} equal-count bins of the sorted confidences; ranges are the min and max in each bin"
    nonempty = counts > 0
    return ReliabilityCurve(
        strategy=strategy,
        form=form,
        n_bins=n_bins,
        bin_ranges=ranges,
        counts=[int(c) for c in counts],
        mean_confidence=[float(s / c) if ok else None for s, c, ok in zip(sum_c, counts, nonempty)],
        observed=[float(s / c) if ok else None for s, c, ok in zip(sum_o, counts, nonempty)],
        convention=convention,
    )


def brier_losses(y_true, prob, *, positive=1) -> np.ndarray:
    """Per-case squared error whose mean is the Brier score (forms as in the module docstring)."""
    p = probabilities(prob)
    if p.ndim == 1:
        return (p - binary_outcome(y_true, positive, len(p), need_both=False)) ** 2
    y = class_labels(y_true, len(p), p.shape[1])
    return ((p - np.eye(p.shape[1])[y]) ** 2).sum(axis=1)


def brier_score(y_true, prob, *, positive=1) -> float:
    """Brier score: binary for 1-D ``prob``, the multi-class sum form for ``(N, C)``."""
    losses = brier_losses(y_true, prob, positive=positive)
    if len(losses) == 0:
        raise ValueError("Brier score of an empty sample")
    return float(losses.mean())


def _logistic_mle(design: np.ndarray, y: np.ndarray, offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpenalised logistic regression by Newton-Raphson with step halving; ``(beta, covariance)``."""

    def loglik(b: np.ndarray) -> float:
        eta = design @ b + offset
        return float(np.sum(y * eta - np.logaddexp(0.0, eta)))

    beta = np.zeros(design.shape[1])
    current = loglik(beta)
    for _ in range(100):
        p = expit(design @ beta + offset)
        info = design.T @ (design * (p * (1 - p))[:, None])
        step = np.linalg.solve(info, design.T @ (y - p))
        scale = 1.0
        while loglik(beta + scale * step) < current - 1e-12 and scale > 1e-10:
            scale /= 2
        beta = beta + scale * step
        current = loglik(beta)
        if np.max(np.abs(scale * step)) < 1e-12 * (1 + np.max(np.abs(beta))):
            break
        if np.max(np.abs(beta)) > 1e6:
            break
    else:
        raise ValueError("calibration slope is not estimable: the logistic fit did not converge")
    if not np.all(np.isfinite(beta)) or np.max(np.abs(beta)) > 1e6:
        raise ValueError("calibration slope is not estimable: the predictions separate the outcomes perfectly")
    p = expit(design @ beta + offset)
    info = design.T @ (design * (p * (1 - p))[:, None])
    return beta, np.linalg.inv(info)


@dataclass(frozen=True)
class CalibrationSlope:
    """Calibration slope (Cox), calibration-in-the-large intercept, and the joint-fit intercept."""

    slope: Estimate
    intercept: Estimate
    cox_intercept: Estimate
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


def calibration_slope_intercept(
    y_true, prob, *, positive=1, conf_level: float = 0.95, eps: float = 1e-15
) -> CalibrationSlope:
    """Logistic recalibration of positive-class probabilities ``prob`` (see the module docstring)."""
    conf_level = conf_level_ok(conf_level)
    p = probabilities(prob)
    if p.ndim != 1:
        raise ValueError("calibration slope takes the positive-class probabilities, shape (N,)")
    y = binary_outcome(y_true, positive, len(p)).astype(np.float64)
    lp = logit(np.clip(p, eps, 1 - eps))
    if np.ptp(lp) == 0:
        raise ValueError("calibration slope is not estimable: all predictions are equal")
    z = stats.norm.ppf(0.5 + conf_level / 2)
    method = "logistic recalibration (maximum likelihood), Wald CI"

    def estimate(value: float, variance: float) -> Estimate:
        se = np.sqrt(variance)
        return Estimate(float(value), (float(value - z * se), float(value + z * se)), method)

    joint, joint_cov = _logistic_mle(np.column_stack([np.ones_like(lp), lp]), y, np.zeros_like(lp))
    large, large_cov = _logistic_mle(np.ones((len(lp), 1)), y, lp)
    return CalibrationSlope(
        slope=estimate(joint[1], joint_cov[1, 1]),
        intercept=estimate(large[0], large_cov[0, 0]),
        cox_intercept=estimate(joint[0], joint_cov[0, 0]),
        n=len(p),
    )


@dataclass(frozen=True)
class CalibrationMetrics:
    """All calibration figures of one set of probabilities, with CIs and conventions."""

    form: str
    ece: Estimate
    adaptive_ece: Estimate
    mce: Estimate
    brier: Estimate
    slope: CalibrationSlope | None
    reliability: ReliabilityCurve
    reliability_adaptive: ReliabilityCurve
    conventions: dict

    def to_dict(self) -> dict:
        return asdict(self)


def calibration_metrics(
    y_true,
    prob,
    *,
    positive=1,
    n_bins: int = 15,
    conf_level: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> CalibrationMetrics:
    """ECE, adaptive ECE, MCE and Brier with stratified bootstrap CIs; for binary (1-D) ``prob``
    also the calibration slope and intercepts with Wald CIs; reliability data for both binnings."""
    conf_level = conf_level_ok(conf_level)
    n_bins = _check_bins(n_bins)
    conf, outcome, form = confidence_and_outcome(y_true, prob, positive=positive)
    losses = brier_losses(y_true, prob, positive=positive)
    strata = np.asarray(y_true)
    boot = dict(n_resamples=n_resamples, seed=seed, stratified=True, conf_level=conf_level)
    boot_method = f"stratified percentile bootstrap ({n_resamples} resamples, seed {seed})"

    def binned(strategy: str, reduce) -> Estimate:
        def statistic(w: np.ndarray) -> np.ndarray:
            return reduce(*binned_sums(conf, outcome, w, n_bins, strategy))

        value = float(statistic(np.ones((1, len(conf))))[0])
        return Estimate(value, bootstrap_weighted(statistic, strata, value, **boot).ci, boot_method)

    brier_value = float(losses.mean())
    brier = Estimate(brier_value, bootstrap_weighted(lambda w: w @ losses / len(losses), strata, brier_value, **boot).ci, boot_method)
    slope = calibration_slope_intercept(y_true, prob, positive=positive, conf_level=conf_level) if np.ndim(prob) == 1 else None
    return CalibrationMetrics(
        form=form,
        ece=binned("uniform", ece_from_sums),
        adaptive_ece=binned("quantile", ece_from_sums),
        mce=binned("uniform", mce_from_sums),
        brier=brier,
        slope=slope,
        reliability=reliability_curve(y_true, prob, n_bins, strategy="uniform", positive=positive),
        reliability_adaptive=reliability_curve(y_true, prob, n_bins, strategy="quantile", positive=positive),
        conventions={
            "form": form,
            "ece_bins": f"{n_bins} equal-width bins [k/{n_bins}, (k+1)/{n_bins}), the last closed at 1",
            "adaptive_ece_bins": f"{n_bins} equal-count bins of the sorted confidences (ties in input order)",
            "brier": "mean squared error of the positive-class probability" if np.ndim(prob) == 1
            else "mean over cases of sum over classes of (p_c - 1[y = c])^2 (range 0-2)",
            "slope": "Cox logistic recalibration logit P(y) = a + b logit(p); intercept = calibration-in-the-large "
            "(slope fixed at 1); Wald CIs",
            "intervals": boot_method,
        },
    )
