"""Build the MONAI transform chain from a preprocessing recipe.

The recipe is a plain dict stored in every bundle, so training, evaluation and batch inference
share one definition of "what the model sees":

    {"spatial_dims": 2, "image_size": [224, 224], "channels": 1, "intensity": "auto",
     "ct_window": [40, 400], "normalization": {"source": "imagenet", "mean": 0.449, "std": 0.226}}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from monai.transforms import (
    Compose,
    EnsureTyped,
    RandAdjustContrastd,
    RandAffined,
    RandGaussianNoised,
    Resized,
)

from medtl.io import LoadScand
from medtl.transforms.presets import IntensityPresetd, NameFileErrors, ToSpatialDimsd, WeightsNormalized

IMAGE = "image"


def make_preprocessing(
    *,
    spatial_dims: int,
    image_size: Sequence[int] | int,
    channels: int,
    intensity: str,
    ct_window: Sequence[float],
    normalization: Mapping[str, Any],
) -> dict[str, Any]:
    """Assemble (and validate) a preprocessing recipe."""
    size = [int(image_size)] * spatial_dims if isinstance(image_size, (int, np.integer)) else [int(s) for s in image_size]
    if len(size) == 1:
        size = size * spatial_dims
    if len(size) != spatial_dims:
        raise ValueError(f"image_size {size} does not have {spatial_dims} entries")
    return {
        "spatial_dims": spatial_dims,
        "image_size": size,
        "channels": channels,
        "intensity": intensity,
        "ct_window": [float(v) for v in ct_window],
        "normalization": dict(normalization),
    }


def deterministic_transforms(pre: Mapping[str, Any]) -> list:
    """Load (ScanReader) -> spatial dims/channels -> intensity preset -> resize: the part worth caching."""
    return [
        LoadScand(IMAGE),
        ToSpatialDimsd(IMAGE, pre["spatial_dims"], pre["channels"]),
        IntensityPresetd(IMAGE, pre["intensity"], pre["ct_window"]),
        Resized(IMAGE, spatial_size=pre["image_size"], mode="area" if pre["spatial_dims"] == 2 else "trilinear"),
    ]


def augmentations(pre: Mapping[str, Any]) -> list:
    """Mild, anatomy-preserving augmentation: small affine jitter, contrast and noise (no flips:
    laterality matters in radiology)."""
    dims = pre["spatial_dims"]
    return [
        RandAffined(
            IMAGE,
            prob=0.7,
            rotate_range=[0.12] if dims == 2 else [0.08] * 3,
            scale_range=[0.1] * dims,
            translate_range=[0.05 * s for s in pre["image_size"]],
            padding_mode="zeros",
        ),
        RandAdjustContrastd(IMAGE, prob=0.3, gamma=(0.7, 1.4)),
        RandGaussianNoised(IMAGE, prob=0.2, std=0.02),
    ]


def build_transforms(pre: Mapping[str, Any], *, train: bool = False) -> Compose:
    """The full chain for one split; ``train`` adds augmentation after the cacheable part.

    The deterministic part is one guarded step (failures name the scan) that MONAI's caching
    datasets cache as a whole."""
    chain = [NameFileErrors(Compose(deterministic_transforms(pre)))]
    if train:
        chain += augmentations(pre)
    chain += [WeightsNormalized(IMAGE, pre["normalization"]), EnsureTyped(IMAGE, dtype=np.float32, track_meta=False)]
    return Compose(chain)
