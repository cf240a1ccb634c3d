"""MONAI preprocessing: from a scan file to the tensor the backbone expects."""

from medtl.transforms.pipeline import IMAGE, build_transforms, deterministic_transforms, make_preprocessing
from medtl.transforms.presets import (
    INTENSITY_PRESETS,
    IntensityPresetd,
    NameFileErrors,
    ToSpatialDimsd,
    WeightsNormalized,
)

__all__ = [
    "IMAGE",
    "INTENSITY_PRESETS",
    "IntensityPresetd",
    "NameFileErrors",
    "ToSpatialDimsd",
    "WeightsNormalized",
    "build_transforms",
    "deterministic_transforms",
    "make_preprocessing",
]
