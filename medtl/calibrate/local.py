"""Updating a fitted calibrator on a small labelled sample from a new site (Steyerberg, *Clinical
Prediction Models*, ch. 20): the existing calibrator stays, and a logistic map of its log-odds
``eta = logit P(y = 1)`` is fitted on top.

- ``intercept`` (calibration-in-the-large): ``logit P'(y = 1) = eta + b``.  One parameter: it
  corrects a change of prevalence or a uniform bias, and needs the fewest events.
- ``logistic`` (slope and intercept): ``logit P'(y = 1) = a * eta + b`` with ``a >= 0``; also
  corrects over- or under-confidence.

Both are binary only (class index 1 positive, like Platt scaling) and serialise with their base
calibrator inside (``"base"``).  They are fitted by maximum a posteriori from the identity map,
with a weak Gaussian prior centred on it (sd 1 for the slope, 2 for the intercept, in log-odds):
worth about one scan, it keeps the fit finite when a small local sample is perfectly separated
(maximum likelihood would send the slope to infinity) and hardly moves it otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy.special import expit, log_expit

from medtl.calibrate.base import Calibrator, lbfgs, param_array, register_local_update
from medtl.calibrate.binary import _two_columns

PRIOR_SD = {"slope": 1.0, "intercept": 2.0}


class _LogOddsUpdate(Calibrator):
    """A logistic map of a base calibrator's log-odds; subclasses fix which parameters are free."""

    binary_only = True
    free_slope = True

    def __init__(self, base: Calibrator | None = None) -> None:
        super().__init__()
        self.base = base
        self.slope_: float = 1.0
        self.intercept_: float | None = None

    def _log_odds(self, logits: np.ndarray) -> np.ndarray:
        p = np.clip(self.base.transform(logits)[:, 1], 1e-12, 1 - 1e-12)
        return np.log(p) - np.log1p(-p)

    def _fit(self, logits: np.ndarray, labels: np.ndarray) -> None:
        if self.base is None:
            raise ValueError(f"'{self.method}' recalibration needs the fitted calibrator it updates (base)")
        eta, positive, n = self._log_odds(logits), labels == 1, len(labels)
        a_var, b_var = PRIOR_SD["slope"] ** 2, PRIOR_SD["intercept"] ** 2

        def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
            slope, intercept = (w[0], w[1]) if self.free_slope else (1.0, w[0])
            z = slope * eta + intercept
            nll = -np.mean(np.where(positive, log_expit(z), log_expit(-z)))
            nll += ((slope - 1) ** 2 / a_var + intercept**2 / b_var) / (2 * n)
            residual = expit(z) - positive
            d_intercept = np.mean(residual) + intercept / (b_var * n)
            if not self.free_slope:
                return float(nll), np.array([d_intercept])
            return float(nll), np.array([np.mean(residual * eta) + (slope - 1) / (a_var * n), d_intercept])

        if self.free_slope:
            self.slope_, self.intercept_ = map(float, lbfgs(objective, np.array([1.0, 0.0]), [(0.0, None), (None, None)]))
        else:
            self.intercept_ = float(lbfgs(objective, np.array([0.0]))[0])

    def _transform(self, logits: np.ndarray) -> np.ndarray:
        return _two_columns(self.slope_ * self._log_odds(logits) + self.intercept_)

    def _params(self) -> dict[str, Any]:
        return {"slope": self.slope_, "intercept": self.intercept_, "base": self.base.to_dict()}

    def _load(self, d: Mapping[str, Any], n_classes: int) -> None:
        from medtl.calibrate import calibrator_from_dict  # the registry imports this module

        self.slope_ = float(param_array(d, "slope", ()))
        self.intercept_ = float(param_array(d, "intercept", ()))
        if self.slope_ < 0 or (not self.free_slope and self.slope_ != 1.0):
            raise ValueError(f"{self.method} recalibration has an invalid slope {self.slope_}")
        if "base" not in d:
            raise ValueError(f"{self.method} calibrator dict lacks 'base'")
        self.base = calibrator_from_dict(d["base"])


@register_local_update
class InterceptUpdate(_LogOddsUpdate):
    """Calibration-in-the-large: shift the base calibrator's log-odds by one fitted intercept."""

    method = "intercept"
    free_slope = False


@register_local_update
class LogisticRecalibration(_LogOddsUpdate):
    """Logistic recalibration: a slope (``>= 0``) and an intercept on the base calibrator's log-odds."""

    method = "logistic"
