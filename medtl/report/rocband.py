"""A pointwise bootstrap confidence band for the ROC curve.

At each false-positive rate (1 - specificity) of a fixed grid, the sensitivity of every
bootstrap resample's empirical ROC curve is read off: linearly between ROC points (ties give
diagonal segments), and the highest sensitivity where the curve rises vertically at that
false-positive rate.  The band is the percentile interval of those sensitivities, grid point by
grid point.  Resamples are those of :mod:`medtl.metrics.bootstrap` (class-stratified, seeded).
"""

from __future__ import annotations

import numpy as np

from medtl.metrics.bootstrap import resample_counts

METHOD = (
    "pointwise class-stratified percentile bootstrap of the sensitivity at fixed 1 - specificity "
    "(linear between ROC points, highest sensitivity on vertical steps)"
)


def _sensitivity_at(fpr: np.ndarray, tpr: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Sensitivity of each row's ROC curve ``(fpr, tpr)`` (rows, K; fpr non-decreasing from 0 to 1)
    at the false-positive rates ``grid``; returns (rows, len(grid))."""
    rows, k = fpr.shape
    # Shift row r by 2r: all rows become one sorted array, so one searchsorted serves every row.
    offset = 2.0 * np.arange(rows)[:, None]
    last = np.searchsorted((fpr + offset).ravel(), (grid[None, :] + offset).ravel(), side="right") - 1
    last = last.reshape(rows, len(grid))
    nxt = np.minimum(last + 1, (np.arange(rows)[:, None] + 1) * k - 1)
    f0, f1 = fpr.ravel()[last], fpr.ravel()[nxt]
    t0, t1 = tpr.ravel()[last], tpr.ravel()[nxt]
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(f1 > f0, (grid[None, :] - f0) / (f1 - f0), 0.0)
    return t0 + share * (t1 - t0)


def roc_band(
    y_true,
    y_score,
    *,
    positive=1,
    fpr_grid: np.ndarray | None = None,
    n_resamples: int = 2000,
    seed: int = 0,
    conf_level: float = 0.95,
) -> dict:
    """Bootstrap band of sensitivity over ``fpr_grid`` (default 0, 0.01, ..., 1) for ``y_true == positive``.

    Returns ``fpr``, ``sensitivity_low``, ``sensitivity_high`` (lists) and the settings.
    """
    if not 0 < conf_level < 1:
        raise ValueError(f"conf_level must be in (0, 1), got {conf_level}")
    scores = np.asarray(y_score, dtype=np.float64)
    is_pos = np.asarray(y_true) == positive
    if scores.ndim != 1 or is_pos.shape != scores.shape:
        raise ValueError(f"y_true and y_score must be vectors of one length, got {is_pos.shape} and {scores.shape}")
    if is_pos.all() or not is_pos.any():
        raise ValueError("an ROC band needs positive and negative cases")
    grid = np.linspace(0.0, 1.0, 101) if fpr_grid is None else np.asarray(fpr_grid, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    s, pos = scores[order], is_pos[order]
    group_ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True])  # last case of each run of tied scores
    values = []
    for weights in resample_counts(is_pos, n_resamples, seed, stratified=True):
        w = weights[:, order]
        tp = np.cumsum(w * pos, axis=1)[:, group_ends]
        fp = np.cumsum(w * ~pos, axis=1)[:, group_ends]
        zeros = np.zeros((len(w), 1))
        tpr = np.concatenate([zeros, tp / tp[:, -1:]], axis=1)
        fpr = np.concatenate([zeros, fp / fp[:, -1:]], axis=1)
        values.append(_sensitivity_at(fpr, tpr, grid))
    alpha = 1 - conf_level
    low, high = np.quantile(np.concatenate(values), [alpha / 2, 1 - alpha / 2], axis=0)
    return {
        "fpr": grid.tolist(),
        "sensitivity_low": low.tolist(),
        "sensitivity_high": high.tolist(),
        "conf_level": conf_level,
        "n_resamples": n_resamples,
        "seed": seed,
        "method": METHOD,
    }
