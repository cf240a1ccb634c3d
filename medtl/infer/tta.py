"""Test-time augmentation: the scan as given and shifted by a few pixels along each spatial
axis (edges replicated).  No flips: laterality matters in radiology, and the training
augmentation never flips either.  Deterministic, so re-runs give the same numbers."""

from __future__ import annotations

import numpy as np
import torch

from medtl.bundle import Predictor

SHIFT_FRACTION = 0.04


def _shift(images: torch.Tensor, axis: int, step: int) -> torch.Tensor:
    """Move the content ``step`` pixels along ``axis``, repeating the edge it moves away from."""
    n = images.shape[axis]
    if step > 0:
        edge = images.narrow(axis, 0, 1).repeat_interleave(step, dim=axis)
        return torch.cat([edge, images.narrow(axis, 0, n - step)], dim=axis)
    edge = images.narrow(axis, n - 1, 1).repeat_interleave(-step, dim=axis)
    return torch.cat([images.narrow(axis, -step, n + step), edge], dim=axis)


def views(images: torch.Tensor, fraction: float = SHIFT_FRACTION) -> list[torch.Tensor]:
    """The batch ``(B, C, *spatial)`` itself, then shifted by +/- ``fraction`` of its size
    along each spatial axis: 1 + 2 * spatial_dims views."""
    out = [images]
    for axis in range(2, images.ndim):
        step = max(1, round(fraction * images.shape[axis]))
        out += [_shift(images, axis, step), _shift(images, axis, -step)]
    return out


def tta_logits(predictor: Predictor, images: torch.Tensor) -> np.ndarray:
    """Logits of every view, ``(B, views, classes)``."""
    return np.stack([predictor.logits(view) for view in views(images)], axis=1)


def tta_probabilities(predictor: Predictor, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean calibrated probabilities over the views ``(B, classes)`` and, per scan, the standard
    deviation across views of the probability that decides: the positive class (binary), the
    most probable class (multi-class), or the largest over the outputs (each finding or head
    decides on its own)."""
    batch, n_views, n_classes = logits.shape
    probs = predictor.calibrate(logits.reshape(-1, n_classes)).reshape(batch, n_views, n_classes)
    mean = probs.mean(axis=1)
    if predictor.task.report_layout != "single":
        return mean, probs.std(axis=1).max(axis=1)
    column = (
        np.full(batch, predictor.positive_index) if predictor.positive_index is not None else mean.argmax(axis=1)
    )
    spread = probs[np.arange(batch), :, column].std(axis=1)
    return mean, spread
