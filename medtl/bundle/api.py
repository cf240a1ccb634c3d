"""The research-code side of a :class:`~medtl.bundle.Predictor`: scans given as one path or
any iterable of paths, in-memory arrays run through the bundle's own preprocessing, and class
names (or, multi-label, the findings present) at the operating point.

``Predictor.logits`` is the entry point for batches that are already preprocessed; it refuses a
batch of the wrong shape or far outside the value range the preprocessing produces, so a raw
image never gets a confident answer by mistake (:func:`check_preprocessed`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from medtl.backbones.inputs import expected_interval
from medtl.io.readers import check_finite
from medtl.transforms import IMAGE, build_transforms

ScanPaths = str | os.PathLike | Iterable[str | os.PathLike]


def as_paths(scans: ScanPaths) -> list[str]:
    """One path (``str`` or ``Path``) or any iterable of them (lists, generators) as a list of
    strings; a string is one path, never its characters."""
    items = [scans] if isinstance(scans, (str, os.PathLike)) else list(scans)
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"expected scan paths (str or Path), got {type(item).__name__}: {item!r}")
    return [os.fspath(item) for item in items]


def check_preprocessed(images: torch.Tensor, preprocessing: Mapping[str, Any]) -> None:
    """``ValueError`` unless ``images`` look like a batch the bundle's preprocessing made:
    ``(B, channels, *image_size)`` with values near where [0, 1] images land after the weights'
    normalisation (more than half that span beyond it means raw intensities).  Without an
    intensity preset (``intensity: none``) or with z-scoring, inputs have no fixed range: the
    shape is all that is checked."""
    shape = (preprocessing["channels"], *preprocessing["image_size"])
    if images.ndim != len(shape) + 1 or tuple(images.shape[1:]) != shape:
        raise ValueError(f"logits() takes preprocessed batches of shape (B, {', '.join(map(str, shape))}), got "
                         f"{tuple(images.shape)}; use predict_array() or predict_proba() for raw images or files")
    if preprocessing.get("intensity") == "none" or preprocessing["normalization"].get("kind") == "zscore":
        return
    lo, hi = expected_interval(preprocessing["normalization"])
    span = hi - lo
    found_lo, found_hi = (float(v) for v in torch.aminmax(images.detach().float()))
    if found_lo < lo - span / 2 or found_hi > hi + span / 2:
        raise ValueError(f"logits() takes preprocessed batches: this one spans [{found_lo:.4g}, {found_hi:.4g}], the "
                         f"bundle's preprocessing gives about [{lo:.4g}, {hi:.4g}]; use predict_array() for raw images")


class ScanAPI:
    """Convenience methods of :class:`~medtl.bundle.Predictor` built on its ``transforms``,
    ``logits``, ``calibrate``, ``decide``, ``task`` and ``preprocessing``."""

    def predict_proba(self, scans: ScanPaths, *, batch_size: int = 16) -> np.ndarray:
        """Calibrated probabilities ``(N, classes)`` (multi-label: ``(N, findings)``) for one scan path or many (errors raise)."""
        chain = self.transforms()
        paths = as_paths(scans)
        rows = []
        for start in range(0, len(paths), batch_size):
            batch = torch.stack([chain({IMAGE: p})[IMAGE] for p in paths[start : start + batch_size]])
            rows.append(self.calibrate(self.logits(batch)))
        return np.concatenate(rows) if rows else np.empty((0, len(self.classes)))

    def predict(self, scans: ScanPaths, *, batch_size: int = 16) -> list:
        """Class names at the bundle's operating point (argmax for multi-class bundles); for
        multi-label bundles, the list of findings present in each scan."""
        return self.task.named(self.decide(self.predict_proba(scans, batch_size=batch_size)))

    def predict_array(self, images: np.ndarray | torch.Tensor | Sequence[np.ndarray | torch.Tensor],
                      spacing: Sequence[float] | None = None, *, modality: str | None = None) -> np.ndarray:
        """Calibrated probabilities ``(N, classes)`` for in-memory images, through the bundle's
        own preprocessing (intensity preset, resampling, resizing, normalisation).

        One image or a list of them.  2D: ``(rows, columns)`` as displayed (pydicom's
        ``pixel_array``, a PIL image as an array), optionally with a leading channel axis; 3D:
        ``(x, y, z)`` in RAS order, optionally with a leading channel axis.  ``spacing``: pixel or
        voxel size in mm along those axes (needed when the bundle resamples); ``modality`` (e.g.
        ``"CT"``) picks the intensity preset as a DICOM header would.  Values must be finite."""
        single = isinstance(images, (np.ndarray, torch.Tensor))
        chain = build_transforms(self.preprocessing, loaded=True)
        batch = torch.stack([chain({IMAGE: self._as_scan(image, spacing, modality)})[IMAGE]
                             for image in ([images] if single else images)])
        return self.calibrate(self.logits(batch))

    def _as_scan(self, image, spacing: Sequence[float] | None, modality: str | None) -> MetaTensor:
        """A channel-first MetaTensor laid out as the scan reader returns it (2D: columns first)."""
        dims = self.preprocessing["spatial_dims"]
        array = image.float() if isinstance(image, torch.Tensor) else torch.from_numpy(np.array(image, dtype=np.float32))
        if array.ndim == dims:
            array = array[None]
        if array.ndim != dims + 1:
            raise ValueError(f"expected a {dims}D image, optionally with a leading channel axis; got shape {tuple(array.shape)}")
        check_finite(array, "the array")
        if dims == 2:
            array = array.transpose(1, 2)  # (rows, columns) -> the reader's (columns, rows)
        pixdim = [1.0] * dims if spacing is None else [float(s) for s in spacing]
        if len(pixdim) != dims:
            raise ValueError(f"spacing {list(spacing)} needs {dims} values, one per spatial axis")
        affine = torch.diag(torch.tensor([*pixdim, *([1.0] * (4 - dims))], dtype=torch.float64))
        meta = {"spacing": np.asarray(pixdim), "Modality": modality or ""}
        return MetaTensor(array, affine=affine, meta=meta)
