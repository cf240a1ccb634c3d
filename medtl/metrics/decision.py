"""Decision curve analysis (Vickers & Elkin 2006): net benefit over a range of threshold probabilities.

At threshold probability ``pt`` a case is treated when ``prob >= pt``; with ``N`` cases,
``net benefit = TP/N - FP/N * pt / (1 - pt)``.  The references are *treat all*
(``prevalence - (1 - prevalence) * pt / (1 - pt)``) and *treat none* (0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medtl.metrics._checks import binary_outcome, probabilities


@dataclass(frozen=True)
class DecisionCurve:
    """Net benefit of the model and of the two default strategies at each threshold probability."""

    thresholds: np.ndarray
    net_benefit: np.ndarray
    treat_all: np.ndarray
    treat_none: np.ndarray
    prevalence: float
    n: int

    def to_dict(self) -> dict:
        return {
            "thresholds": self.thresholds.tolist(),
            "net_benefit": self.net_benefit.tolist(),
            "treat_all": self.treat_all.tolist(),
            "treat_none": self.treat_none.tolist(),
            "prevalence": self.prevalence,
            "n": self.n,
            "rule": "treat when prob >= threshold; net benefit = TP/N - FP/N * pt/(1-pt)",
        }


def decision_curve(y_true, prob, thresholds=None, *, positive=1) -> DecisionCurve:
    """Net benefit of treating cases with positive-class probability ``prob >= pt`` for each
    ``pt`` in ``thresholds`` (default 0.01, 0.02, ..., 0.99)."""
    p = probabilities(prob)
    if p.ndim != 1:
        raise ValueError("decision curves take the positive-class probabilities, shape (N,)")
    y = binary_outcome(y_true, positive, len(p), need_both=False)
    if len(p) == 0:
        raise ValueError("decision curve of an empty sample")
    pts = np.round(np.arange(1, 100) / 100, 2) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    if pts.ndim != 1 or np.any((pts <= 0) | (pts >= 1)):
        raise ValueError("threshold probabilities must be a vector of values in (0, 1)")
    n = len(p)
    treated = p[None, :] >= pts[:, None]
    tp = (treated & y[None, :]).sum(axis=1)
    fp = (treated & ~y[None, :]).sum(axis=1)
    odds = pts / (1 - pts)
    prevalence = float(y.mean())
    return DecisionCurve(
        thresholds=pts,
        net_benefit=tp / n - fp / n * odds,
        treat_all=prevalence - (1 - prevalence) * odds,
        treat_none=np.zeros_like(pts),
        prevalence=prevalence,
        n=n,
    )
