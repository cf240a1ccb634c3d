"""Binary logistic recalibration: Platt scaling and beta calibration (class index 1 is positive).

Both are maximum-likelihood logistic regressions in float64 (L-BFGS-B, analytic gradient,
unpenalised), started at the identity map so the fit never raises the training NLL.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy.special import expit, log_expit, log_softmax

from medtl.calibrate.base import Calibrator, lbfgs, param_array, register_calibrator


def _fit_logistic(features: np.ndarray, positive: np.ndarray, start: np.ndarray, bounds=None) -> np.ndarray:
    """Coefficients of ``logit P(y = 1) = features @ w[:-1] + w[-1]`` by maximum likelihood."""
    design = np.column_stack([features, np.ones(len(features))])

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        eta = design @ w
        nll = -np.mean(np.where(positive, log_expit(eta), log_expit(-eta)))
        return float(nll), design.T @ (expit(eta) - positive) / len(eta)

    return lbfgs(objective, start, bounds)


def _two_columns(eta: np.ndarray) -> np.ndarray:
    """``[P(class 0), P(class 1)]`` from the positive-class log-odds, accurate in both tails."""
    return np.column_stack([expit(-eta), expit(eta)])


@register_calibrator
class PlattScaling(Calibrator):
    """Platt (1999): ``P(y = 1) = sigmoid(A * (z1 - z0) + B)`` on the logit margin, ``A >= 0`` so
    the ranking (and the AUROC) of the model is never reversed."""

    method = "platt"
    binary_only = True

    def __init__(self) -> None:
        super().__init__()
        self.slope_: float | None = None
        self.intercept_: float | None = None

    def _fit(self, logits: np.ndarray, labels: np.ndarray) -> None:
        margin = (logits[:, 1] - logits[:, 0])[:, None]
        fit = _fit_logistic(margin, labels == 1, np.array([1.0, 0.0]), bounds=[(0.0, None), (None, None)])
        self.slope_, self.intercept_ = map(float, fit)

    def _transform(self, logits: np.ndarray) -> np.ndarray:
        return _two_columns(self.slope_ * (logits[:, 1] - logits[:, 0]) + self.intercept_)

    def _params(self) -> dict[str, Any]:
        return {"slope": self.slope_, "intercept": self.intercept_}

    def _load(self, d: Mapping[str, Any], n_classes: int) -> None:
        self.slope_ = float(param_array(d, "slope", ()))
        self.intercept_ = float(param_array(d, "intercept", ()))


@register_calibrator
class BetaCalibration(Calibrator):
    """Beta calibration (Kull, Silva Filho & Flach 2017) of the positive softmax probability ``p``:
    ``logit P(y = 1) = a ln p - b ln(1 - p) + c`` with ``a, b >= 0`` (so the map is monotone).

    The constrained maximum-likelihood fit uses bounds rather than betacal's "drop the negative
    feature and refit"; both give a non-decreasing map, the bounded fit is the exact constrained
    optimum.  ``ln p`` and ``ln(1 - p)`` come from ``log_softmax``, so no clipping is needed.
    """

    method = "beta"
    binary_only = True

    def __init__(self) -> None:
        super().__init__()
        self.a_: float | None = None
        self.b_: float | None = None
        self.c_: float | None = None

    @staticmethod
    def _features(logits: np.ndarray) -> np.ndarray:
        log_p = log_softmax(logits, axis=1)
        return np.column_stack([log_p[:, 1], -log_p[:, 0]])

    def _fit(self, logits: np.ndarray, labels: np.ndarray) -> None:
        bounds = [(0.0, None), (0.0, None), (None, None)]
        w = _fit_logistic(self._features(logits), labels == 1, np.array([1.0, 1.0, 0.0]), bounds)
        self.a_, self.b_, self.c_ = map(float, w)

    def _transform(self, logits: np.ndarray) -> np.ndarray:
        return _two_columns(self._features(logits) @ np.array([self.a_, self.b_]) + self.c_)

    def _params(self) -> dict[str, Any]:
        return {"a": self.a_, "b": self.b_, "c": self.c_}

    def _load(self, d: Mapping[str, Any], n_classes: int) -> None:
        self.a_, self.b_, self.c_ = (float(param_array(d, key, ())) for key in ("a", "b", "c"))
        if self.a_ < 0 or self.b_ < 0:
            raise ValueError(f"beta calibration needs a, b >= 0, got a={self.a_}, b={self.b_}")
