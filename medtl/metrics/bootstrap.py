"""Bootstrap confidence intervals: seedable, stratified by class by default, percentile method.

Resamples are drawn per stratum (class) with replacement, so every resample keeps the class
counts of the data (pROC's ``boot.stratified = TRUE``).  Each stratum draws from its own child of
``numpy.random.SeedSequence(seed)``, so a seed gives the same resamples whatever the chunking.
The interval is the percentile interval: quantiles ``(1 - conf_level) / 2`` and
``(1 + conf_level) / 2`` of the resampled statistics (``numpy.quantile``, linear = R type 7).
Resamples where the statistic is undefined (NaN) are dropped and counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np

from medtl.metrics._checks import conf_level_ok

_CHUNK_CELLS = 2_000_000  # resample rows x cases held in memory at once


@dataclass(frozen=True)
class BootstrapResult:
    """A statistic on the full data with its bootstrap percentile interval."""

    estimate: float
    ci: tuple[float, float] | None
    conf_level: float
    n_resamples: int
    n_valid: int
    seed: int
    stratified: bool
    method: str = "percentile bootstrap"

    def to_dict(self) -> dict:
        return asdict(self)


def _strata_members(strata: np.ndarray, stratified: bool) -> list[np.ndarray]:
    if not stratified:
        return [np.arange(len(strata))]
    _, inverse = np.unique(strata, return_inverse=True, axis=0 if strata.ndim > 1 else None)
    inverse = inverse.reshape(-1)
    return [np.flatnonzero(inverse == k) for k in range(inverse.max() + 1)]


def resample_indices(strata, n_resamples: int = 2000, seed: int = 0, stratified: bool = True) -> Iterator[np.ndarray]:
    """Bootstrap resamples as chunks of row-index arrays, shape ``(rows, N)``.

    ``strata`` holds one label per case (the class for binary and multi-class data; rows of a
    multi-label matrix are strata as a whole).
    """
    strata = np.asarray(strata)
    n = len(strata)
    if n == 0:
        raise ValueError("cannot bootstrap an empty sample")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    members = _strata_members(strata, stratified)
    rngs = [np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(len(members))]
    rows_per_chunk = max(1, _CHUNK_CELLS // n)
    for start in range(0, n_resamples, rows_per_chunk):
        rows = min(rows_per_chunk, n_resamples - start)
        yield np.concatenate([idx[rng.integers(0, len(idx), size=(rows, len(idx)))] for idx, rng in zip(members, rngs)], axis=1)


def resample_counts(strata, n_resamples: int = 2000, seed: int = 0, stratified: bool = True) -> Iterator[np.ndarray]:
    """The same resamples as :func:`resample_indices`, as case multiplicities ``(rows, N)``."""
    n = len(strata)
    for idx in resample_indices(strata, n_resamples, seed, stratified):
        rows = idx.shape[0]
        flat = (idx + (np.arange(rows) * n)[:, None]).ravel()
        yield np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.float64)


def percentile_interval(values: np.ndarray, conf_level: float) -> tuple[float, float] | None:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    alpha = 1 - conf_level
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _result(estimate: float, values: np.ndarray, conf_level: float, seed: int, stratified: bool) -> BootstrapResult:
    return BootstrapResult(
        estimate=float(estimate),
        ci=percentile_interval(values, conf_level),
        conf_level=conf_level,
        n_resamples=len(values),
        n_valid=int(np.isfinite(values).sum()),
        seed=seed,
        stratified=stratified,
    )


def bootstrap_ci(
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    y_true,
    y_score,
    n_resamples: int = 2000,
    seed: int = 0,
    stratified: bool = True,
    *,
    conf_level: float = 0.95,
) -> BootstrapResult:
    """Percentile bootstrap CI of ``metric_fn(y_true, y_score)`` for any metric.

    Rows of ``y_true`` and ``y_score`` (``(N,)`` or ``(N, C)``) are resampled together;
    stratification is on ``y_true``.  A resample on which the metric raises ``ValueError``
    (e.g. AUROC of a resample with one class) counts as undefined.
    """
    conf_level = conf_level_ok(conf_level)
    y = np.asarray(y_true)
    scores = np.asarray(y_score)
    if len(y) != len(scores):
        raise ValueError(f"y_true has {len(y)} rows but y_score has {len(scores)}")
    estimate = metric_fn(y, scores)
    values = []
    for chunk in resample_indices(y, n_resamples, seed, stratified):
        for idx in chunk:
            try:
                values.append(float(metric_fn(y[idx], scores[idx])))
            except ValueError:
                values.append(np.nan)
    return _result(estimate, np.asarray(values), conf_level, seed, stratified)


def bootstrap_weighted(
    statistic: Callable[[np.ndarray], np.ndarray],
    strata,
    estimate: float,
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    stratified: bool = True,
    conf_level: float = 0.95,
) -> BootstrapResult:
    """Bootstrap a statistic written on case weights: ``statistic(W)`` maps multiplicities
    ``(rows, N)`` to ``(rows,)`` values.  Same resamples as :func:`bootstrap_ci`, vectorised."""
    conf_level = conf_level_ok(conf_level)
    values = np.concatenate([statistic(w) for w in resample_counts(strata, n_resamples, seed, stratified)])
    return _result(estimate, values, conf_level, seed, stratified)
