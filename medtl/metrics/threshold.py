"""Metrics of a yes/no decision, each with a confidence interval.

- Proportions (sensitivity, specificity, PPV, NPV, accuracy): Wilson score interval (default)
  or Clopper-Pearson exact interval, from ``scipy.stats.binomtest``.
- Likelihood ratios: log method (Simel, Samsa & Matchar 1991),
  ``var(ln LR+) = 1/TP - 1/(TP+FN) + 1/FP - 1/(FP+TN)`` and likewise for LR-.
- PPV / NPV at a stated prevalence ``pi`` (Bayes): ``PPV = pi*Se / (pi*Se + (1-pi)*(1-Sp))``;
  the CI maps the LR CI through the same monotone formula (``PPV = 1 / (1 + (1-pi)/(pi*LR+))``).
- F1: stratified percentile bootstrap of the decisions (no closed form).
A metric whose denominator is zero is ``None`` (undefined), as is a CI that cannot be formed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from medtl.metrics._checks import binary_outcome, conf_level_ok, scores_1d
from medtl.metrics.bootstrap import bootstrap_weighted
from medtl.metrics.operating import DECISION_RULE

INTERVALS = {"wilson": "wilson", "clopper-pearson": "exact"}


@dataclass(frozen=True)
class Estimate:
    """A value with its CI and how the CI was made; ``numerator/denominator`` for proportions."""

    value: float | None
    ci: tuple[float, float] | None
    method: str
    numerator: int | None = None
    denominator: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def proportion_ci(successes: int, total: int, conf_level: float = 0.95, interval: str = "wilson") -> Estimate:
    """``successes / total`` with a Wilson or Clopper-Pearson interval."""
    if interval not in INTERVALS:
        raise ValueError(f"unknown interval {interval!r}; choose one of {sorted(INTERVALS)}")
    conf_level = conf_level_ok(conf_level)
    name = {"wilson": "Wilson score", "clopper-pearson": "Clopper-Pearson exact"}[interval]
    if total == 0:
        return Estimate(None, None, name, int(successes), 0)
    ci = stats.binomtest(int(successes), int(total)).proportion_ci(conf_level, method=INTERVALS[interval])
    return Estimate(successes / total, (float(ci.low), float(ci.high)), name, int(successes), int(total))


def _likelihood_ratio(hit: int, hit_total: int, false: int, false_total: int, conf_level: float) -> Estimate:
    """``(hit/hit_total) / (false/false_total)`` with the log-method CI."""
    method = "log method (Simel 1991)"
    if hit_total == 0 or false_total == 0 or false == 0:
        return Estimate(None, None, method)
    ratio = (hit / hit_total) / (false / false_total)
    if hit == 0:
        return Estimate(0.0, None, method)
    se = np.sqrt(1 / hit - 1 / hit_total + 1 / false - 1 / false_total)
    z = stats.norm.ppf(0.5 + conf_level / 2)
    return Estimate(float(ratio), (float(ratio * np.exp(-z * se)), float(ratio * np.exp(z * se))), method)


def _predictive_value(lr: Estimate, odds: float, positive: bool) -> Estimate:
    """PPV (from LR+ and prior odds) or NPV (from LR- and prior odds), CI through the same map."""

    def value(ratio: float) -> float:
        if positive:
            return 1.0 / (1.0 + 1.0 / (odds * ratio)) if ratio > 0 else 0.0
        return 1.0 / (1.0 + odds * ratio)

    method = "Bayes at the stated prevalence; CI from the likelihood-ratio CI"
    if lr.value is None:
        return Estimate(None, None, method)
    ci = None
    if lr.ci is not None:
        a, b = value(lr.ci[0]), value(lr.ci[1])
        ci = (min(a, b), max(a, b))
    return Estimate(value(lr.value), ci, method)


@dataclass(frozen=True)
class ThresholdMetrics:
    """Decision metrics at one threshold (or for given decisions), each an :class:`Estimate`."""

    threshold: float | None
    tp: int
    fp: int
    tn: int
    fn: int
    sensitivity: Estimate
    specificity: Estimate
    ppv: Estimate
    npv: Estimate
    lr_positive: Estimate
    lr_negative: Estimate
    accuracy: Estimate
    f1: Estimate
    conf_level: float
    interval: str
    prevalence: float | None = None
    ppv_at_prevalence: Estimate | None = None
    npv_at_prevalence: Estimate | None = None
    rule: str = DECISION_RULE

    def to_dict(self) -> dict:
        return asdict(self)


def decision_metrics(
    actual,
    predicted,
    *,
    conf_level: float = 0.95,
    interval: str = "wilson",
    prevalence: float | None = None,
    n_resamples: int = 2000,
    seed: int = 0,
    threshold: float | None = None,
) -> ThresholdMetrics:
    """Metrics of boolean decisions ``predicted`` against boolean truth ``actual``."""
    conf_level = conf_level_ok(conf_level)
    a = np.asarray(actual, dtype=bool)
    p = np.asarray(predicted, dtype=bool)
    if a.ndim != 1 or a.shape != p.shape:
        raise ValueError(f"actual and predicted must be vectors of one length, got {a.shape} and {p.shape}")
    if prevalence is not None and not 0 < prevalence < 1:
        raise ValueError(f"prevalence must be in (0, 1), got {prevalence}")
    tp, fp = int(np.sum(a & p)), int(np.sum(~a & p))
    fn, tn = int(np.sum(a & ~p)), int(np.sum(~a & ~p))

    def f1_of(w: np.ndarray) -> np.ndarray:
        wtp, wfp, wfn = w @ (a & p), w @ (~a & p), w @ (a & ~p)
        with np.errstate(invalid="ignore", divide="ignore"):
            return 2 * wtp / (2 * wtp + wfp + wfn)

    f1 = None
    f1_ci = None
    if 2 * tp + fp + fn > 0:
        f1 = 2 * tp / (2 * tp + fp + fn)
        f1_ci = bootstrap_weighted(
            f1_of, a, f1, n_resamples=n_resamples, seed=seed, stratified=True, conf_level=conf_level
        ).ci
    lr_pos = _likelihood_ratio(tp, tp + fn, fp, fp + tn, conf_level)
    lr_neg = _likelihood_ratio(fn, tp + fn, tn, fp + tn, conf_level)
    extra = {}
    if prevalence is not None:
        odds = prevalence / (1 - prevalence)
        extra = dict(
            prevalence=prevalence,
            ppv_at_prevalence=_predictive_value(lr_pos, odds, positive=True),
            npv_at_prevalence=_predictive_value(lr_neg, odds, positive=False),
        )
    return ThresholdMetrics(
        threshold=threshold,
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
        sensitivity=proportion_ci(tp, tp + fn, conf_level, interval),
        specificity=proportion_ci(tn, tn + fp, conf_level, interval),
        ppv=proportion_ci(tp, tp + fp, conf_level, interval),
        npv=proportion_ci(tn, tn + fn, conf_level, interval),
        lr_positive=lr_pos,
        lr_negative=lr_neg,
        accuracy=proportion_ci(tp + tn, len(a), conf_level, interval),
        f1=Estimate(f1, f1_ci, f"stratified percentile bootstrap ({n_resamples} resamples, seed {seed})"),
        conf_level=conf_level,
        interval=interval,
        **extra,
    )


def threshold_metrics(
    y_true,
    y_score,
    threshold: float,
    *,
    positive=1,
    conf_level: float = 0.95,
    interval: str = "wilson",
    prevalence: float | None = None,
    n_resamples: int = 2000,
    seed: int = 0,
) -> ThresholdMetrics:
    """Sensitivity, specificity, PPV, NPV, LR+, LR-, accuracy and F1 with CIs when cases with
    ``y_score >= threshold`` are called positive; PPV/NPV also at ``prevalence`` if given."""
    scores = scores_1d(y_score)
    actual = binary_outcome(y_true, positive, len(scores), need_both=False)
    return decision_metrics(
        actual,
        scores >= threshold,
        conf_level=conf_level,
        interval=interval,
        prevalence=prevalence,
        n_resamples=n_resamples,
        seed=seed,
        threshold=float(threshold),
    )
