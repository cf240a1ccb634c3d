"""Pretrained backbones: one registry of 2D and 3D networks and their weight sources.

``create(name, weights=..., in_channels=..., spatial_dims=..., num_classes=...)`` builds a
:class:`Classifier` and loads its weights offline-first, adapting the stem and inflating 2D
kernels where needed, and reports on every tensor (:class:`LoadReport`).
"""

from medtl.backbones.adapt import adapt_input_channels, inflate_to_3d
from medtl.backbones.model import Classifier, create
from medtl.backbones.registry import BackboneSpec, Preprocessing, get_spec, list_backbones, preprocessing_for
from medtl.backbones.weights import (
    ChecksumError,
    LoadReport,
    WeightsFormatError,
    WeightsMismatchError,
    WeightsNotFoundError,
    imagenet_checkpoint,
    load_state_file,
    sha256_file,
)

__all__ = [
    "BackboneSpec",
    "ChecksumError",
    "Classifier",
    "LoadReport",
    "Preprocessing",
    "WeightsFormatError",
    "WeightsMismatchError",
    "WeightsNotFoundError",
    "adapt_input_channels",
    "create",
    "get_spec",
    "imagenet_checkpoint",
    "inflate_to_3d",
    "list_backbones",
    "load_state_file",
    "preprocessing_for",
    "sha256_file",
]
