"""Isotonic calibration (Zadrozny & Elkan 2002): a non-decreasing step-linear map of softmax
probabilities, fitted by scikit-learn's pool-adjacent-violators.

Binary: one map on the class-1 probability.  Multi-class: one-vs-rest, one map per class, then
each row is renormalised (a row that every map sends to 0 keeps its softmax probabilities).
The fitted knots (``X_thresholds_``, ``y_thresholds_``) are stored and applied with ``np.interp``,
clipped at the ends, so a bundle needs no pickled estimator.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy.special import softmax
from sklearn.isotonic import IsotonicRegression

from medtl.calibrate.base import Calibrator, register_calibrator


@register_calibrator
class IsotonicCalibration(Calibrator):
    """Isotonic regression of the outcome on the softmax probability (see the module docstring)."""

    method = "isotonic"

    def __init__(self) -> None:
        super().__init__()
        self.x_thresholds_: list[np.ndarray] | None = None
        self.y_thresholds_: list[np.ndarray] | None = None

    @staticmethod
    def _columns(n_classes: int) -> list[int]:
        return [1] if n_classes == 2 else list(range(n_classes))

    def _fit(self, logits: np.ndarray, labels: np.ndarray) -> None:
        probs = softmax(logits, axis=1)
        fits = [
            IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(probs[:, k], (labels == k).astype(np.float64))
            for k in self._columns(logits.shape[1])
        ]
        self.x_thresholds_ = [f.X_thresholds_.astype(np.float64) for f in fits]
        self.y_thresholds_ = [f.y_thresholds_.astype(np.float64) for f in fits]

    def _transform(self, logits: np.ndarray) -> np.ndarray:
        probs = softmax(logits, axis=1)
        columns = self._columns(logits.shape[1])
        mapped = np.column_stack(
            [np.interp(probs[:, k], x, y) for k, x, y in zip(columns, self.x_thresholds_, self.y_thresholds_)]
        )
        if logits.shape[1] == 2:
            return np.column_stack([1.0 - mapped[:, 0], mapped[:, 0]])
        total = mapped.sum(axis=1, keepdims=True)
        return np.where(total > 0, mapped / np.where(total > 0, total, 1.0), probs)

    def _params(self) -> dict[str, Any]:
        return {
            "x_thresholds": [x.tolist() for x in self.x_thresholds_],
            "y_thresholds": [y.tolist() for y in self.y_thresholds_],
        }

    def _load(self, d: Mapping[str, Any], n_classes: int) -> None:
        xs, ys = d.get("x_thresholds"), d.get("y_thresholds")
        n_maps = len(self._columns(n_classes))
        if not isinstance(xs, list) or not isinstance(ys, list) or len(xs) != n_maps or len(ys) != n_maps:
            raise ValueError(f"isotonic calibrator dict needs {n_maps} 'x_thresholds' and 'y_thresholds' lists")
        self.x_thresholds_, self.y_thresholds_ = [], []
        for x, y in zip(xs, ys):
            x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
            if x.ndim != 1 or x.shape != y.shape or x.size == 0 or np.any(np.diff(x) < 0) or np.any(np.diff(y) < 0):
                raise ValueError("isotonic knots must be non-empty, equally long and non-decreasing")
            self.x_thresholds_.append(x)
            self.y_thresholds_.append(y)
