"""Input checks shared by stages that may not import one another (calibration, metrics, report)."""

from __future__ import annotations

from typing import Any

import numpy as np


def class_indices(labels: Any, n: int, n_classes: int, name: str = "labels") -> np.ndarray:
    """``labels`` as ``n`` integer class indices in ``[0, n_classes)`` (whole-valued floats accepted)."""
    y = np.asarray(labels)
    if y.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if not (np.issubdtype(y.dtype, np.number) and np.all(np.mod(y, 1) == 0)):
            raise ValueError(f"{name} must hold integer class indices, got dtype {y.dtype}")
        y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"{name} must hold class indices in [0, {n_classes}), got {y.min()} to {y.max()}")
    return y

