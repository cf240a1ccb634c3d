"""Discrimination: AUROC with DeLong's variance, DeLong's tests, one-vs-rest and multi-label AUROC.

Conventions (as pROC with ``direction = "<"``): a higher score means "more likely positive";
the AUROC is the Mann-Whitney probability that a positive case scores higher than a negative
one, ties counting 1/2.  DeLong et al. (1988) variance from the placement values
``V10_i`` (share of negatives below positive ``i``, ties 1/2) and ``V01_j`` (share of positives
above negative ``j``): ``var = s2(V10)/m + s2(V01)/n`` with sample variances (denominator ``k - 1``).
The CI is normal, ``auc +/- z * sqrt(var)``, clipped to [0, 1] (pROC's ``ci.auc(method="delong")``).
All arithmetic is float64.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from medtl.metrics._checks import binary_outcome, class_labels, conf_level_ok, scores_1d
from medtl.metrics.bootstrap import BootstrapResult, bootstrap_weighted


@dataclass(frozen=True)
class AucResult:
    """AUROC with DeLong's variance and normal CI."""

    auc: float
    variance: float | None
    ci: tuple[float, float] | None
    conf_level: float
    n_positive: int
    n_negative: int
    method: str = "DeLong"

    @property
    def se(self) -> float | None:
        return None if self.variance is None else float(np.sqrt(self.variance))

    def to_dict(self) -> dict:
        return {**asdict(self), "se": self.se}


@dataclass(frozen=True)
class DelongTestResult:
    """DeLong's test of two AUROCs: statistic, two-sided p-value and CI of ``auc_a - auc_b``."""

    auc_a: float
    auc_b: float
    difference: float
    se: float
    statistic: float
    pvalue: float
    ci: tuple[float, float]
    conf_level: float
    paired: bool
    df: float | None = None
    method: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MultiAucResult:
    """Per-class (one-vs-rest) or per-label AUROCs with DeLong CIs, and their macro average with
    a bootstrap CI."""

    per_class: dict[str, AucResult]
    macro: BootstrapResult
    method: str

    @property
    def auc(self) -> float:
        return self.macro.estimate

    @property
    def ci(self) -> tuple[float, float] | None:
        return self.macro.ci

    def to_dict(self) -> dict:
        return {
            "auc": self.auc,
            "ci": self.ci,
            "conf_level": self.macro.conf_level,
            "method": self.method,
            "bootstrap": self.macro.to_dict(),
            "per_class": {name: r.to_dict() for name, r in self.per_class.items()},
        }


def delong_placements(is_pos: np.ndarray, scores: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """``(auc, V10, V01)``: DeLong's placement values from mid-ranks, exact for ties."""
    cases, controls = scores[is_pos], scores[~is_pos]
    m, n = len(cases), len(controls)
    ranks = stats.rankdata(np.concatenate([cases, controls]))
    v10 = (ranks[:m] - stats.rankdata(cases)) / n
    v01 = 1.0 - (ranks[m:] - stats.rankdata(controls)) / m
    return float(v10.mean()), v10, v01


def auroc_point(y_true, probs) -> float:
    """The AUROC alone, cheap enough for every epoch: of column 1 for two classes, the unweighted
    mean of the one-vs-rest AUROCs otherwise.  NaN when ``y_true`` holds a single class."""
    p = np.asarray(probs, dtype=np.float64)
    y = class_labels(y_true, len(p), p.shape[1])
    if len(np.unique(y)) < 2:
        return float("nan")
    columns = [1] if p.shape[1] == 2 else range(p.shape[1])
    return float(np.mean([delong_placements(y == k, p[:, k])[0] for k in columns]))


def _normal_ci(estimate: float, se: float, conf_level: float, clip: bool) -> tuple[float, float]:
    z = stats.norm.ppf(0.5 + conf_level / 2)
    low, high = estimate - z * se, estimate + z * se
    if clip:
        low, high = max(low, 0.0), min(high, 1.0)
    return float(low), float(high)


def roc_auc(y_true, y_score, *, positive=1, conf_level: float = 0.95) -> AucResult:
    """AUROC of ``y_score`` for ``y_true == positive``, DeLong variance and CI.

    With a single positive or negative case the variance is undefined (``None``), as in pROC.
    """
    conf_level = conf_level_ok(conf_level)
    scores = scores_1d(y_score)
    is_pos = binary_outcome(y_true, positive, len(scores))
    auc, v10, v01 = delong_placements(is_pos, scores)
    m, n = len(v10), len(v01)
    if m < 2 or n < 2:
        return AucResult(auc, None, None, conf_level, m, n)
    variance = float(np.var(v10, ddof=1) / m + np.var(v01, ddof=1) / n)
    return AucResult(auc, variance, _normal_ci(auc, np.sqrt(variance), conf_level, clip=True), conf_level, m, n)


def delong_test(y_true, score_a, score_b, *, positive=1, conf_level: float = 0.95) -> DelongTestResult:
    """DeLong's paired test: two models scored on the same cases.

    ``Z = (A - B) / sqrt(var A + var B - 2 cov(A, B))`` with DeLong's covariance; two-sided normal
    p-value; CI of the difference ``(A - B) +/- z * se`` (pROC's ``roc.test(paired=TRUE)``).
    """
    conf_level = conf_level_ok(conf_level)
    a, b = scores_1d(score_a, "score_a"), scores_1d(score_b, "score_b")
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same cases: score_a has {len(a)}, score_b {len(b)}")
    is_pos = binary_outcome(y_true, positive, len(a))
    auc_a, v10_a, v01_a = delong_placements(is_pos, a)
    auc_b, v10_b, v01_b = delong_placements(is_pos, b)
    m, n = len(v10_a), len(v01_a)
    if m < 2 or n < 2:
        raise ValueError(f"DeLong's test needs at least 2 positive and 2 negative cases (got {m} and {n})")
    s10 = np.cov(np.vstack([v10_a, v10_b]))
    s01 = np.cov(np.vstack([v01_a, v01_b]))
    s = s10 / m + s01 / n
    se = float(np.sqrt(max(s[0, 0] + s[1, 1] - 2 * s[0, 1], 0.0)))
    diff = auc_a - auc_b
    z = 0.0 if diff == 0 and se == 0 else diff / se
    return DelongTestResult(
        auc_a=auc_a,
        auc_b=auc_b,
        difference=diff,
        se=se,
        statistic=float(z),
        pvalue=float(2 * stats.norm.sf(abs(z))),
        ci=_normal_ci(diff, se, conf_level, clip=False),
        conf_level=conf_level,
        paired=True,
        method="DeLong's test for two correlated ROC curves",
    )


def delong_test_unpaired(y_a, score_a, y_b, score_b, *, positive=1, conf_level: float = 0.95) -> DelongTestResult:
    """DeLong's unpaired test: two models on different cases.

    ``D = (A - B) / sqrt(var A + var B)`` with a t reference distribution and pROC's
    Welch-type degrees of freedom; the CI of the difference uses the same t quantile.
    """
    conf_level = conf_level_ok(conf_level)
    ra = roc_auc(y_a, score_a, positive=positive, conf_level=conf_level)
    rb = roc_auc(y_b, score_b, positive=positive, conf_level=conf_level)
    if ra.variance is None or rb.variance is None:
        raise ValueError("DeLong's test needs at least 2 positive and 2 negative cases in each sample")
    se = float(np.sqrt(ra.variance + rb.variance))
    diff = ra.auc - rb.auc
    total_a, total_b = ra.n_positive + ra.n_negative, rb.n_positive + rb.n_negative
    df = (ra.variance + rb.variance) ** 2 / (ra.variance**2 / (total_a - 1) + rb.variance**2 / (total_b - 1))
    t = 0.0 if diff == 0 and se == 0 else diff / se
    q = stats.t.ppf(0.5 + conf_level / 2, df)
    return DelongTestResult(
        auc_a=ra.auc,
        auc_b=rb.auc,
        difference=diff,
        se=se,
        statistic=float(t),
        pvalue=float(2 * stats.t.sf(abs(t), df)),
        ci=(float(diff - q * se), float(diff + q * se)),
        conf_level=conf_level,
        paired=False,
        df=float(df),
        method="DeLong's test for two unpaired ROC curves",
    )


def auc_weighted(is_pos: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of each row of case multiplicities ``weights`` (rows, N); NaN where a row lacks a class.

    Each positive case contributes (weighted negatives below + half the tied ones); one sort of
    the data serves every row.
    """
    order = np.argsort(scores, kind="stable")
    s, pos, w = scores[order], is_pos[order], weights[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    group = np.cumsum(np.r_[True, s[1:] != s[:-1]]) - 1
    w_neg = w * ~pos
    cum = np.concatenate([np.zeros((len(w), 1)), np.cumsum(w_neg, axis=1)], axis=1)
    below = cum[:, starts[group]]
    tied = cum[:, ends[group]] - below
    w_pos = w * pos
    n_pos, n_neg = w_pos.sum(axis=1), w_neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w_pos * (below + 0.5 * tied)).sum(axis=1) / (n_pos * n_neg)


def _macro(
    positives: np.ndarray,
    scores: np.ndarray,
    names: list[str],
    strata: np.ndarray,
    *,
    conf_level: float,
    n_resamples: int,
    seed: int,
    stratified: bool,
    known: np.ndarray | None = None,
) -> tuple[dict[str, AucResult], BootstrapResult]:
    """Per-column AUROCs (DeLong) and their macro mean (weighted bootstrap); ``known`` (N, K):
    the cells that count, each column's AUROC over its known cases only."""
    known = np.ones(positives.shape, dtype=bool) if known is None else known
    per_class = {
        name: roc_auc(positives[known[:, k], k], scores[known[:, k], k], positive=True, conf_level=conf_level)
        for k, name in enumerate(names)
    }
    estimate = float(np.mean([r.auc for r in per_class.values()]))

    def macro(w: np.ndarray) -> np.ndarray:
        return np.mean([auc_weighted(positives[:, k], scores[:, k], w * known[:, k]) for k in range(len(names))], axis=0)

    boot = bootstrap_weighted(
        macro, strata, estimate, n_resamples=n_resamples, seed=seed, stratified=stratified, conf_level=conf_level
    )
    return per_class, boot


def roc_auc_ovr(
    y_true,
    probs,
    class_names: list[str] | None = None,
    *,
    conf_level: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> MultiAucResult:
    """Multi-class AUROC: one-vs-rest per class (DeLong CI each) and their unweighted (macro)
    mean with a class-stratified bootstrap CI.  Every class needs cases and non-cases."""
    conf_level = conf_level_ok(conf_level)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probs must have shape (N, C) with C >= 2, got {p.shape}")
    y = class_labels(y_true, len(p), p.shape[1])
    names = class_names or [str(k) for k in range(p.shape[1])]
    if len(names) != p.shape[1]:
        raise ValueError(f"{len(names)} class names for {p.shape[1]} columns")
    positives = y[:, None] == np.arange(p.shape[1])[None, :]
    per_class, macro = _macro(
        positives, p, names, y, conf_level=conf_level, n_resamples=n_resamples, seed=seed, stratified=True
    )
    return MultiAucResult(
        per_class,
        macro,
        "macro average of one-vs-rest AUROCs (DeLong CI per class; class-stratified percentile bootstrap CI for the macro)",
    )


def roc_auc_multilabel(
    y_true,
    scores,
    label_names: list[str] | None = None,
    *,
    conf_level: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> MultiAucResult:
    """Multi-label AUROC: one AUROC per label column (DeLong CI each) and their macro mean with a
    bootstrap CI stratified on the label combination of each case.

    ``y_true`` holds 0/1 indicators, NaN where a label is unknown: each label's AUROC is over the
    cases where it is known, and a resample weighs each label's known cases only."""
    conf_level = conf_level_ok(conf_level)
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(y_true, dtype=np.float64)
    if s.ndim != 2 or y.shape != s.shape:
        raise ValueError(f"y_true and scores must both have shape (N, L); got {y.shape} and {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contains NaN or infinite values")
    known = ~np.isnan(y)
    if not np.isin(y[known], (0, 1)).all():
        raise ValueError("multi-label y_true must hold 0/1 indicators (NaN: unknown)")
    names = label_names or [str(k) for k in range(s.shape[1])]
    strata = np.where(known, y, -1).astype(np.int64)
    per_label, macro = _macro(
        y == 1, s, names, strata, conf_level=conf_level, n_resamples=n_resamples, seed=seed, stratified=True, known=known
    )
    return MultiAucResult(
        per_label,
        macro,
        "macro average of per-label AUROCs over the cases where each label is known (DeLong CI per label; percentile "
        "bootstrap CI stratified on label combinations)",
    )
