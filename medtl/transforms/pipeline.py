"""Build the MONAI transform chain from a preprocessing recipe.

The recipe is a plain dict stored in every bundle, so training, evaluation and batch inference
share one definition of "what the model sees":

    {"spatial_dims": 2, "image_size": [224, 224], "channels": 1, "intensity": "auto",
     "ct_window": [40, 400], "target_spacing": null, "orientation": null, "layout": "rows_columns",
     "fit": "resize", "normalization": {"source": "imagenet", "mean": 0.449, "std": 0.226}}

2D images enter the network as displayed, ``(rows, columns)`` (``layout``; ``image_size`` is
then rows x columns); bundles from before ``layout`` keep the reader's ``(columns, rows)``.

Volumes (``spatial_dims`` 3) are turned to RAS.  ``fit`` says how a scan meets ``image_size``:
``resize`` scales the whole field of view (the default when no ``target_spacing`` is given, since
voxel sizes then differ between scans anyway); ``crop_pad`` centre-crops or pads (the default with
a ``target_spacing``, so every voxel keeps the physical size the resampling gave it).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from monai.transforms import (
    Compose,
    EnsureTyped,
    Orientationd,
    RandAdjustContrastd,
    RandAffined,
    RandGaussianNoised,
    Resized,
    ResizeWithPadOrCropd,
    Spacingd,
    Transposed,
)

from medtl import __version__
from medtl.io import LoadScand
from medtl.transforms.presets import IntensityPresetd, NameFileErrors, ToSpatialDimsd, WeightsNormalized, scan_error

IMAGE = "image"
FITS = ("resize", "crop_pad")
# 2D images reach the network as displayed, (rows, columns): pydicom's pixel_array, a PNG's
# rows.  Recipes without "layout" (bundles from before it) keep the reader's (columns, rows).
DISPLAY_LAYOUT = "rows_columns"


def make_preprocessing(
    *,
    spatial_dims: int,
    image_size: Sequence[int] | int,
    channels: int,
    intensity: str,
    ct_window: Sequence[float],
    normalization: Mapping[str, Any],
    target_spacing: Sequence[float] | float | None = None,
    fit: str | None = None,
) -> dict[str, Any]:
    """Assemble (and validate) a preprocessing recipe; ``fit`` None picks by ``target_spacing``."""

    def per_axis(value, name: str, cast) -> list:
        values = [cast(value)] * spatial_dims if np.isscalar(value) else [cast(v) for v in value]
        values = values * spatial_dims if len(values) == 1 else values
        if len(values) != spatial_dims:
            raise ValueError(f"{name} {values} does not have {spatial_dims} entries")
        return values

    spacing = None if target_spacing is None else per_axis(target_spacing, "target_spacing", float)
    if spacing is not None and min(spacing) <= 0:
        raise ValueError(f"target_spacing {spacing} must be positive")
    fit = fit or ("crop_pad" if spacing is not None else "resize")
    if fit not in FITS:
        raise ValueError(f"fit '{fit}' is not one of {FITS}")
    return {
        "spatial_dims": spatial_dims,
        "image_size": per_axis(image_size, "image_size", int),
        "channels": channels,
        "intensity": intensity,
        "ct_window": [float(v) for v in ct_window],
        "target_spacing": spacing,
        "orientation": "RAS" if spatial_dims == 3 else None,
        "layout": DISPLAY_LAYOUT if spatial_dims == 2 else None,
        "fit": fit,
        "normalization": dict(normalization),
    }


def deterministic_transforms(pre: Mapping[str, Any], *, load: bool = True) -> list:
    """Load (ScanReader) -> spatial dims/channels -> [orientation] -> [spacing] -> intensity
    preset -> resize or crop/pad -> plain float32 tensor: the part worth caching.  Recipes from before ``orientation``,
    ``target_spacing`` and ``fit`` existed rebuild the chain they were trained with.  ``load=False``
    starts from an image already loaded (a channel-first MetaTensor laid out as the reader's)."""
    dims = pre["spatial_dims"]
    chain = [LoadScand(IMAGE)] if load else []
    chain.append(ToSpatialDimsd(IMAGE, dims, pre["channels"]))
    if pre.get("orientation"):
        chain.append(Orientationd(IMAGE, axcodes=pre["orientation"], labels=None))
    if pre.get("target_spacing"):
        chain.append(Spacingd(IMAGE, pixdim=pre["target_spacing"], mode="bilinear"))
    chain.append(IntensityPresetd(IMAGE, pre["intensity"], pre["ct_window"]))
    if pre.get("layout") == DISPLAY_LAYOUT:  # the reader's (columns, rows) -> (rows, columns), as displayed
        chain.append(Transposed(IMAGE, indices=(0, 2, 1)))
    if pre.get("fit", "resize") == "crop_pad":
        chain.append(ResizeWithPadOrCropd(IMAGE, spatial_size=pre["image_size"]))
    else:
        chain.append(Resized(IMAGE, spatial_size=pre["image_size"], mode="area" if dims == 2 else "trilinear"))
    # geometry and modality are used up: a plain tensor caches smaller and copies faster
    chain.append(EnsureTyped(IMAGE, dtype=np.float32, track_meta=False))
    return chain


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


class ScanCompose(Compose):
    """``Compose`` that lets a :class:`~medtl.io.ScanReadError` out as itself, not wrapped in MONAI's
    ``RuntimeError("applying transform ...")``, so callers see the scan and the reason."""

    def __call__(self, input_, start=0, end=None, threading=False, lazy=None):
        try:
            return super().__call__(input_, start=start, end=end, threading=threading, lazy=lazy)
        except RuntimeError as err:
            named = scan_error(err)
            if named is None:
                raise
            raise named from None


def build_transforms(pre: Mapping[str, Any], *, train: bool = False, loaded: bool = False) -> Compose:
    """The full chain for one split; ``train`` adds augmentation after the cacheable part.

    The deterministic part is one guarded step (failures name the scan) that MONAI's caching
    datasets cache as a whole.  ``loaded``: items hold in-memory images, not paths."""
    if loaded:
        chain = [Compose(deterministic_transforms(pre, load=False))]
    else:
        chain = [NameFileErrors(Compose(deterministic_transforms(pre)))]
    if train:
        chain += augmentations(pre)
    chain += [WeightsNormalized(IMAGE, pre["normalization"]), EnsureTyped(IMAGE, dtype=np.float32, track_meta=False)]
    return ScanCompose(chain)


def recipe_key(pre: Mapping[str, Any]) -> str:
    """A short hash of a recipe: the name of its disk cache, so a change of transforms starts a new one."""
    text = json.dumps(pre, sort_keys=True, default=str)
    return hashlib.blake2b(f"{__version__}:{text}".encode(), digest_size=8).hexdigest()
