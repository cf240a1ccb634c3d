"""MONAI preprocessing: from a scan file to the tensor the backbone expects."""

from medtl.transforms.pipeline import (
    DISPLAY_LAYOUT,
    FITS,
    IMAGE,
    ScanCompose,
    build_transforms,
    deterministic_transforms,
    make_preprocessing,
    recipe_key,
)
from medtl.transforms.presets import (
    INTENSITY_PRESETS,
    IntensityPresetd,
    NameFileErrors,
    ToSpatialDimsd,
    WeightsNormalized,
)

__all__ = [
    "DISPLAY_LAYOUT",
    "FITS",
    "IMAGE",
    "INTENSITY_PRESETS",
    "IntensityPresetd",
    "NameFileErrors",
    "ScanCompose",
    "ToSpatialDimsd",
    "WeightsNormalized",
    "build_transforms",
    "deterministic_transforms",
    "make_preprocessing",
    "recipe_key",
]
