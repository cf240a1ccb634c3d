"""Post-hoc calibration of classifier logits, fitted on a validation split.

Every calibrator has ``fit(logits, labels) -> self``, ``transform(logits) -> probabilities``,
``to_dict()`` and ``from_dict(d)``.  Methods: ``temperature`` (one parameter, keeps the
ranking), ``vector``, ``matrix``, ``isotonic`` (any number of classes), ``platt`` and ``beta``
(binary only, class index 1 positive), and ``none`` (plain softmax), each registered by
``@register_calibrator`` in its module; ``auto`` (the config
default) is Platt scaling for two classes and temperature scaling otherwise.  ``intercept`` and
``logistic`` update an already fitted calibrator on a few scans from a new site (``local.py``).
"""

from collections.abc import Mapping
from typing import Any

from sklearn.exceptions import NotFittedError

from medtl.calibrate.base import Calibrator, multiclass_methods, register_calibrator, register_local_update
from medtl.calibrate.binary import BetaCalibration, PlattScaling
from medtl.calibrate.isotonic import IsotonicCalibration
from medtl.calibrate.local import InterceptUpdate, LogisticRecalibration
from medtl.calibrate.scaling import MatrixScaling, NoCalibration, TemperatureScaling, VectorScaling
from medtl.registry import CALIBRATORS, LOCAL_UPDATES  # filled by the decorators of the modules above


def recalibration_methods() -> list[str]:
    """What ``medtl recalibrate --method`` accepts: ``auto``, the local updates, every calibrator."""
    return ["auto", *LOCAL_UPDATES, *CALIBRATORS]


def make_calibrator(method: str, n_classes: int | None = None) -> Calibrator:
    """An unfitted calibrator for ``method`` (a name in :data:`CALIBRATORS`, or ``auto``).

    ``auto`` is Platt scaling for two classes (slope and intercept: it also corrects a model
    that is biased towards one class, which temperature alone cannot) and temperature scaling
    otherwise (one parameter, safe on small validation sets)."""
    if method == "auto":
        if n_classes is None:
            raise ValueError("calibration 'auto' needs the number of classes")
        method = "platt" if n_classes == 2 else "temperature"
    return CALIBRATORS[method]()


def calibrator_from_dict(d: Mapping[str, Any]) -> Calibrator:
    """Rebuild a fitted calibrator from its ``to_dict()`` output (e.g. a bundle's ``bundle.json``)."""
    if not isinstance(d, Mapping):
        raise ValueError(f"a calibrator dict must be a mapping, got {type(d).__name__}")
    method = d.get("method")
    cls = LOCAL_UPDATES[method] if method in LOCAL_UPDATES else CALIBRATORS[method]
    return cls.from_dict(d)


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
    "multiclass_methods",
    "register_calibrator",
    "recalibration_methods",
    "register_local_update",
]
