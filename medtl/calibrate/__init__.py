"""Post-hoc calibration of classifier logits, fitted on a validation split.

Every calibrator has ``fit(logits, labels) -> self``, ``transform(logits) -> probabilities``,
``to_dict()`` and ``from_dict(d)``.  Methods: ``temperature`` (one parameter, keeps the
ranking), ``vector``, ``matrix``, ``isotonic`` (any number of classes), ``platt`` and ``beta``
(binary only, class index 1 positive), and ``none`` (plain softmax); ``auto`` (the config
default) is Platt scaling for two classes and temperature scaling otherwise.  ``intercept`` and
``logistic`` update an already fitted calibrator on a few scans from a new site (``local.py``).
"""

from collections.abc import Mapping
from typing import Any

from sklearn.exceptions import NotFittedError

from medtl.calibrate.base import Calibrator
from medtl.calibrate.binary import BetaCalibration, PlattScaling
from medtl.calibrate.isotonic import IsotonicCalibration
from medtl.calibrate.local import InterceptUpdate, LogisticRecalibration
from medtl.calibrate.scaling import MatrixScaling, NoCalibration, TemperatureScaling, VectorScaling

CALIBRATORS: dict[str, type[Calibrator]] = {
    cls.method: cls
    for cls in (
        TemperatureScaling,
        VectorScaling,
        MatrixScaling,
        PlattScaling,
        IsotonicCalibration,
        BetaCalibration,
        NoCalibration,
    )
}
# Updates of a fitted calibrator (they wrap it): made by medtl.bundle.recalibrate, not by training.
LOCAL_UPDATES: dict[str, type[Calibrator]] = {cls.method: cls for cls in (InterceptUpdate, LogisticRecalibration)}


def _lookup(method: Any, registry: Mapping[str, type[Calibrator]] = CALIBRATORS) -> type[Calibrator]:
    if not isinstance(method, str) or method not in registry:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {sorted(registry)}")
    return registry[method]


def make_calibrator(method: str, n_classes: int | None = None) -> Calibrator:
    """An unfitted calibrator for ``method`` (a key of :data:`CALIBRATORS`, or ``auto``).

    ``auto`` is Platt scaling for two classes (slope and intercept: it also corrects a model
    that is biased towards one class, which temperature alone cannot) and temperature scaling
    otherwise (one parameter, safe on small validation sets)."""
    if method == "auto":
        if n_classes is None:
            raise ValueError("calibration 'auto' needs the number of classes")
        method = "platt" if n_classes == 2 else "temperature"
    return _lookup(method)()


def calibrator_from_dict(d: Mapping[str, Any]) -> Calibrator:
    """Rebuild a fitted calibrator from its ``to_dict()`` output (e.g. a bundle's ``bundle.json``)."""
    if not isinstance(d, Mapping):
        raise ValueError(f"a calibrator dict must be a mapping, got {type(d).__name__}")
    return _lookup(d.get("method"), {**CALIBRATORS, **LOCAL_UPDATES}).from_dict(d)


__all__ = [
    "CALIBRATORS",
    "BetaCalibration",
    "Calibrator",
    "InterceptUpdate",
    "IsotonicCalibration",
    "LOCAL_UPDATES",
    "LogisticRecalibration",
    "MatrixScaling",
    "NoCalibration",
    "NotFittedError",
    "PlattScaling",
    "TemperatureScaling",
    "VectorScaling",
    "calibrator_from_dict",
    "make_calibrator",
]
