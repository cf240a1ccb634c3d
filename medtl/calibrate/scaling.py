"""Affine maps of the logits fitted by NLL (Guo et al. 2017; Kull et al. 2019).

All three start from the identity map, so the fitted map never has a higher NLL on the fitting
data than the uncalibrated softmax.  Temperature scaling keeps the ranking (and the argmax) of
every case; vector and matrix scaling have more freedom and need more validation data.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from medtl.calibrate.base import Calibrator, lbfgs, mean_nll, param_array, register_calibrator, softmax_nll_and_grad

_LOG_T_BOUNDS = (np.log(1e-2), np.log(1e2))


@register_calibrator
class NoCalibration(Calibrator):
    """The plain softmax of the logits (a calibrator that changes nothing)."""

    method = "none"

    def _fit(self, logits: np.ndarray, labels: np.ndarray) -> None:
        pass

    def _transform(self, logits: np.ndarray) -> np.ndarray:
        return softmax(logits, axis=1)

    def _params(self) -> dict[str, Any]:
        return {}

    def _load(self, d: Mapping[str, Any], n_classes: int) -> None:
        pass


@register_calibrator
class TemperatureScaling(Calibrator):
    """``softmax(z / T)`` with one temperature ``T > 0`` minimising the NLL; optimised over
    ``log T`` in ``[log 0.01, log 100]`` by bounded Brent (the NLL is unimodal in ``log T``)."""

    method = "temperature"

    def __init__(self) -> None:
        super().__init__()
        self.temperature_: float | None = None

    def _fit(self, logits: np.ndarray, labels: np.ndarray) -> None:
        result = minimize_scalar(
            lambda log_t: mean_nll(log_softmax(logits * np.exp(-log_t), axis=1), labels),
            bounds=_LOG_T_BOUNDS,
            method="bounded",
            options={"xatol": 1e-10},
        )
        self.temperature_ = float(np.exp(result.x))

    def _transform(self, logits: np.ndarray) -> np.ndarray:
        return softmax(logits / self.temperature_, axis=1)

    def _params(self) -> dict[str, Any]:
        return {"temperature": self.temperature_}

    def _load(self, d: Mapping[str, Any], n_classes: int) -> None:
        temperature = float(param_array(d, "temperature", ()))
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature_ = temperature


@register_calibrator
class VectorScaling(Calibrator):
    """``softmax(a * z + b)`` with a per-class scale ``a`` and bias ``b`` minimising the NLL (L-BFGS)."""

    method = "vector"

    def __init__(self) -> None:
        super().__init__()
        self.scale_: np.ndarray | None = None
        self.bias_: np.ndarray | None = None

    def _fit(self, logits: np.ndarray, labels: np.ndarray) -> None:
        c = logits.shape[1]

        def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
            nll, grad = softmax_nll_and_grad(logits * theta[:c] + theta[c:], labels)
            return nll, np.concatenate([(grad * logits).sum(axis=0), grad.sum(axis=0)])

        theta = lbfgs(objective, np.r_[np.ones(c), np.zeros(c)])
        self.scale_, self.bias_ = theta[:c], theta[c:]

    def _transform(self, logits: np.ndarray) -> np.ndarray:
        return softmax(logits * self.scale_ + self.bias_, axis=1)

    def _params(self) -> dict[str, Any]:
        return {"scale": self.scale_.tolist(), "bias": self.bias_.tolist()}

    def _load(self, d: Mapping[str, Any], n_classes: int) -> None:
        self.scale_ = param_array(d, "scale", (n_classes,))
        self.bias_ = param_array(d, "bias", (n_classes,))


@register_calibrator
class MatrixScaling(Calibrator):
    """``softmax(W z + b)`` minimising NLL + ``off_diagonal_l2 * sum(offdiag(W)^2)`` (L-BFGS).

    The off-diagonal penalty (Kull et al. 2019's ODIR without the bias term) keeps the C^2
    weights from overfitting small validation sets while leaving per-class scales free.
    """

    method = "matrix"

    def __init__(self, off_diagonal_l2: float = 1e-3) -> None:
        super().__init__()
        if not off_diagonal_l2 >= 0:
            raise ValueError(f"off_diagonal_l2 must be >= 0, got {off_diagonal_l2}")
        self.off_diagonal_l2 = float(off_diagonal_l2)
        self.weight_: np.ndarray | None = None
        self.bias_: np.ndarray | None = None

    def _fit(self, logits: np.ndarray, labels: np.ndarray) -> None:
        c = logits.shape[1]
        off = 1.0 - np.eye(c)

        def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
            weight, bias = theta[: c * c].reshape(c, c), theta[c * c :]
            nll, grad = softmax_nll_and_grad(logits @ weight.T + bias, labels)
            penalty = self.off_diagonal_l2 * np.sum((weight * off) ** 2)
            grad_w = grad.T @ logits + 2 * self.off_diagonal_l2 * weight * off
            return nll + penalty, np.concatenate([grad_w.ravel(), grad.sum(axis=0)])

        theta = lbfgs(objective, np.r_[np.eye(c).ravel(), np.zeros(c)])
        self.weight_, self.bias_ = theta[: c * c].reshape(c, c), theta[c * c :]

    def _transform(self, logits: np.ndarray) -> np.ndarray:
        return softmax(logits @ self.weight_.T + self.bias_, axis=1)

    def _params(self) -> dict[str, Any]:
        return {"weight": self.weight_.tolist(), "bias": self.bias_.tolist(), "off_diagonal_l2": self.off_diagonal_l2}

    def _load(self, d: Mapping[str, Any], n_classes: int) -> None:
        self.weight_ = param_array(d, "weight", (n_classes, n_classes))
        self.bias_ = param_array(d, "bias", (n_classes,))
        self.off_diagonal_l2 = float(d.get("off_diagonal_l2", self.off_diagonal_l2))
