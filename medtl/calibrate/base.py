"""The calibrator contract shared by every method.

A calibrator is fitted on held-out logits ``(N, C)`` and integer labels ``(N,)``, maps logits to
class probabilities ``(N, C)`` (float64, rows summing to 1), and serialises to a JSON-able dict
(``"method"``, ``"n_classes"`` and the fitted parameters) so that a bundle applies exactly the
mapping fitted at training time.  Binary methods take class index 1 as the positive class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax
from sklearn.exceptions import NotFittedError

from medtl.checks import class_indices
from medtl.registry import CALIBRATORS, LOCAL_UPDATES

_Self = TypeVar("_Self", bound="Calibrator")
_C = TypeVar("_C", bound="type[Calibrator]")


def check_logits(logits: Any, n_classes: int | None = None) -> np.ndarray:
    """Finite float64 logits of shape ``(N, C)`` with ``C >= 2`` (and ``C == n_classes`` if given)."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"logits must have shape (N, C) with C >= 2, got {z.shape}")
    if n_classes is not None and z.shape[1] != n_classes:
        raise ValueError(f"the calibrator was fitted on {n_classes} classes but the logits have {z.shape[1]}")
    if not np.all(np.isfinite(z)):
        raise ValueError("logits contain NaN or infinite values")
    return z


def mean_nll(log_probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes."""
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def softmax_nll_and_grad(u: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean NLL of ``softmax(u)`` and its gradient with respect to ``u``."""
    log_p = log_softmax(u, axis=1)
    grad = np.exp(log_p)
    grad[np.arange(len(labels)), labels] -= 1.0
    return mean_nll(log_p, labels), grad / len(labels)


def lbfgs(objective: Callable[[np.ndarray], tuple[float, np.ndarray]], x0: np.ndarray, bounds=None) -> np.ndarray:
    """Minimise a smooth objective (value, gradient) in float64 from ``x0``; L-BFGS-B never ends
    above its start, so a fit started at the identity map cannot worsen the training loss."""
    result = minimize(
        objective, x0, jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-10}
    )
    if not np.all(np.isfinite(result.x)):
        raise ValueError(f"calibration fit diverged: {result.message}")
    return result.x


def param_array(d: Mapping[str, Any], key: str, shape: tuple[int, ...]) -> np.ndarray:
    """A stored parameter as a finite float64 array of the expected shape."""
    if key not in d:
        raise ValueError(f"{d.get('method')} calibrator dict lacks '{key}'")
    value = np.asarray(d[key], dtype=np.float64)
    if value.shape != shape or not np.all(np.isfinite(value)):
        raise ValueError(f"{d.get('method')} calibrator '{key}' must be finite with shape {shape}, got {value.shape}")
    return value


class Calibrator(ABC):
    """Base class: validation, the fitted check and (de)serialisation; subclasses implement
    ``_fit``, ``_transform``, ``_params`` and ``_load``."""

    method: ClassVar[str]
    binary_only: ClassVar[bool] = False

    def __init__(self) -> None:
        self.n_classes_: int | None = None

    def fit(self: _Self, logits: Any, labels: Any) -> _Self:
        """Fit on held-out logits ``(N, C)`` and class indices ``(N,)``; returns ``self``."""
        z = check_logits(logits)
        if len(z) == 0:
            raise ValueError("cannot fit a calibrator on zero cases")
        y = class_indices(labels, len(z), z.shape[1])
        if self.binary_only:
            if z.shape[1] != 2:
                raise ValueError(
                    f"'{self.method}' calibration is for binary tasks only, got {z.shape[1]} classes; "
                    f"use {' or '.join(multiclass_methods())} for multi-class"
                )
            if np.unique(y).size < 2:
                raise ValueError(f"'{self.method}' calibration needs cases of both classes")
        self._fit(z, y)
        self.n_classes_ = z.shape[1]
        return self

    def transform(self, logits: Any) -> np.ndarray:
        """Calibrated probabilities ``(N, C)`` in float64, rows summing to 1."""
        self._check_fitted()
        return self._transform(check_logits(logits, self.n_classes_))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able ``{"method", "n_classes", **fitted parameters}``."""
        self._check_fitted()
        return {"method": self.method, "n_classes": self.n_classes_, **self._params()}

    @classmethod
    def from_dict(cls: type[_Self], d: Mapping[str, Any]) -> _Self:
        """Rebuild a fitted calibrator from :meth:`to_dict` output."""
        if d.get("method") != cls.method:
            raise ValueError(f"expected a '{cls.method}' calibrator dict, got method {d.get('method')!r}")
        n_classes = d.get("n_classes")
        if not isinstance(n_classes, int) or n_classes < 2 or (cls.binary_only and n_classes != 2):
            raise ValueError(f"{cls.method} calibrator dict has an invalid 'n_classes': {n_classes!r}")
        calibrator = cls()
        calibrator._load(d, n_classes)
        calibrator.n_classes_ = n_classes
        return calibrator

    def _check_fitted(self) -> None:
        if self.n_classes_ is None:
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet: call fit(logits, labels) first")

    def __repr__(self) -> str:
        state = f"n_classes={self.n_classes_}" if self.n_classes_ is not None else "unfitted"
        return f"{type(self).__name__}({state})"

    @abstractmethod
    def _fit(self, logits: np.ndarray, labels: np.ndarray) -> None: ...

    @abstractmethod
    def _transform(self, logits: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def _params(self) -> dict[str, Any]: ...

    @abstractmethod
    def _load(self, d: Mapping[str, Any], n_classes: int) -> None: ...



def multiclass_methods() -> list[str]:
    """The registered calibration methods that fit more than two classes (for messages)."""
    return [name for name, cls in CALIBRATORS.items() if not cls.binary_only]


def register_calibrator(cls: _C) -> _C:
    """Class decorator: make a :class:`Calibrator` subclass a ``calibration.method`` under its ``method`` name."""
    return CALIBRATORS.register(cls.method)(cls)


def register_local_update(cls: _C) -> _C:
    """Class decorator: an update of a fitted calibrator for a new site (``medtl recalibrate``), not a training method."""
    return LOCAL_UPDATES.register(cls.method)(cls)
