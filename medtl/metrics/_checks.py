"""Input validation shared by the metric functions: one clear error per kind of bad input."""

from __future__ import annotations

import numpy as np

from medtl.checks import class_indices


def scores_1d(y_score, name: str = "y_score") -> np.ndarray:
    """A finite float64 vector."""
    scores = np.asarray(y_score, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return scores


def probabilities(prob, name: str = "prob") -> np.ndarray:
    """Finite float64 probabilities in [0, 1], shape (N,) or (N, C)."""
    p = np.asarray(prob, dtype=np.float64)
    if p.ndim not in (1, 2):
        raise ValueError(f"{name} must have shape (N,) or (N, C), got {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{name} contains NaN or infinite values")
    if p.size and (p.min() < 0 or p.max() > 1):
        raise ValueError(f"{name} must lie in [0, 1] (got range {p.min():.4g} to {p.max():.4g})")
    return p


def binary_outcome(y_true, positive=1, n: int | None = None, *, need_both: bool = True) -> np.ndarray:
    """Boolean vector: True where ``y_true == positive``; checks length and, if asked, both classes."""
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"y_true must be one-dimensional, got shape {y.shape}")
    if n is not None and len(y) != n:
        raise ValueError(f"y_true has {len(y)} entries but the scores have {n}")
    is_pos = y == positive
    if need_both:
        n_pos = int(is_pos.sum())
        if n_pos == 0 or n_pos == len(y):
            raise ValueError(
                f"needs at least one positive (y_true == {positive!r}) and one negative case; "
                f"got {n_pos} positive of {len(y)}"
            )
    return is_pos


def class_labels(y_true, n: int, n_classes: int) -> np.ndarray:
    """Integer class indices in [0, n_classes)."""
    return class_indices(y_true, n, n_classes, "y_true")


def conf_level_ok(conf_level: float) -> float:
    if not 0 < conf_level < 1:
        raise ValueError(f"conf_level must be in (0, 1), got {conf_level}")
    return float(conf_level)
