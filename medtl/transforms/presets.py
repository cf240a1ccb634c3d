"""Dictionary transforms that turn any loaded scan into the tensor a backbone expects.

Each transform does one job and composes with MONAI's own; they are built from a JSON-able
*preprocessing recipe* (see :func:`medtl.transforms.pipeline.make_preprocessing`) so that a bundle
re-creates exactly the preprocessing the model was trained with.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    MapTransform,
    NormalizeIntensity,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
    Transform,
)

from medtl.io import ScanReadError

INTENSITY_PRESETS = ("auto", "cxr", "ct", "mr", "none")


class ToSpatialDimsd(MapTransform):
    """Bring a channel-first image to ``spatial_dims`` spatial axes and ``channels`` channels.

    2D images stored as one-slice volumes (NIfTI ``(X, Y, 1)``) lose the singleton axis; colour
    images become grey by averaging RGB when the model takes one channel, and grey images are
    repeated when it takes several.  A volume given to a 2D model is an error, not a silent slice.
    """

    def __init__(self, keys: KeysCollection, spatial_dims: int, channels: int) -> None:
        super().__init__(keys)
        self.spatial_dims = spatial_dims
        self.channels = channels

    def _convert(self, img: torch.Tensor) -> torch.Tensor:
        while img.ndim > self.spatial_dims + 1 and img.shape[-1] == 1:
            img = img[..., 0]
        if img.ndim != self.spatial_dims + 1:
            raise ValueError(
                f"expected a {self.spatial_dims}D image, got spatial shape {tuple(img.shape[1:])} "
                f"(set data.spatial_dims to match the scans)"
            )
        if img.shape[0] == self.channels:
            return img
        if self.channels == 1 and img.shape[0] in (3, 4):
            return img[:3].float().mean(dim=0, keepdim=True)
        if img.shape[0] == 1:
            return img.repeat(self.channels, *([1] * self.spatial_dims))
        raise ValueError(
            f"cannot map {img.shape[0]} image channels onto a {self.channels}-channel model "
            "(a 4D file's fourth axis, e.g. time, counts as channels: split it into 3D volumes)"
        )

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self._convert(d[key])
        return d


class IntensityPresetd(MapTransform):
    """Map raw intensities to [0, 1] by modality.

    ``cxr`` and ``mr`` scale the 0.5-99.5 percentile range per image (robust to burnt-in text and
    to each site's detector response); ``ct`` applies a fixed Hounsfield window so that tissue
    contrast means the same at every site; ``auto`` chooses CT for DICOM Modality CT, MR for
    Modality MR and for NIfTI volumes, and the radiograph preset otherwise.
    """

    def __init__(
        self, keys: KeysCollection, preset: str = "auto", ct_window: Sequence[float] = (40.0, 400.0)
    ) -> None:
        super().__init__(keys)
        if preset not in INTENSITY_PRESETS:
            raise ValueError(f"unknown intensity preset '{preset}', choose one of {INTENSITY_PRESETS}")
        self.preset = preset
        centre, width = ct_window
        self._ct = ScaleIntensityRange(centre - width / 2, centre + width / 2, 0.0, 1.0, clip=True)
        self._percentile = ScaleIntensityRangePercentiles(0.5, 99.5, 0.0, 1.0, clip=True)

    def resolve(self, img: torch.Tensor) -> str:
        """The preset actually applied to ``img``."""
        if self.preset != "auto":
            return self.preset
        modality = str(getattr(img, "meta", {}).get("Modality", "")).upper()
        if modality == "CT":
            return "ct"
        if modality == "MR" or (not modality and img.ndim == 4):
            return "mr"
        return "cxr"

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key].float()
            preset = self.resolve(d[key])
            if preset == "ct":
                d[key] = self._ct(img)
            elif preset in ("cxr", "mr"):
                d[key] = self._percentile(img)
            else:
                d[key] = img
        return d


class WeightsNormalized(MapTransform):
    """Apply the normalisation the pretrained weights expect, from [0, 1] images.

    ``normalization`` is the backbone registry's recipe (:func:`medtl.backbones.preprocessing_for`):
    ``kind`` ``mean_std`` ((x - mean) / std, scalars or one per channel), ``range`` ([0, 1] mapped
    onto e.g. [-1024, 1024]) or ``zscore`` (each image over its non-zero voxels, as MedicalNet).
    """

    def __init__(self, keys: KeysCollection, normalization: Mapping) -> None:
        super().__init__(keys)
        kind = normalization.get("kind", "range" if "range" in normalization else "mean_std")
        if kind == "range":
            lo, hi = normalization["range"]
            self._op = ScaleIntensityRange(0.0, 1.0, lo, hi)
        elif kind == "zscore":
            self._op = NormalizeIntensity(nonzero=True)
        elif kind == "mean_std":
            mean, std = normalization["mean"], normalization["std"]
            per_channel = isinstance(mean, Sequence)
            self._op = NormalizeIntensity(subtrahend=mean, divisor=std, channel_wise=per_channel)
        else:
            raise ValueError(f"unknown normalisation kind '{kind}' in {dict(normalization)}")

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self._op(d[key])
        return d


def scan_error(err: BaseException) -> ScanReadError | None:
    """The :class:`ScanReadError` in an exception's cause chain (MONAI wraps each transform's
    failure in ``RuntimeError("applying transform ...")``), or None."""
    while err is not None and not isinstance(err, ScanReadError):
        err = err.__cause__
    return err


class NameFileErrors(Transform):
    """Run a chain of transforms on one item and, if it fails, raise :class:`ScanReadError`
    naming the scan, so no error from deep inside a reader reaches the user without its file."""

    def __init__(self, chain: Compose, key: str = "image") -> None:
        self.chain = chain
        self.key = key

    def __call__(self, data: Mapping[Hashable, Any]) -> Any:
        try:
            return self.chain(data)
        except Exception as err:  # any reader or transform failure becomes a named, reasoned error
            named = scan_error(err)
            if named is not None:
                raise named from None
            cause = err.__cause__ or err
            raise ScanReadError(data.get(self.key), f"{type(cause).__name__}: {cause}") from err
