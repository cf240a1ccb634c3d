"""Pretrained backbones: one registry of 2D and 3D networks and their weight sources.

``create(name, weights=..., in_channels=..., spatial_dims=..., num_classes=...)`` builds a
:class:`Classifier` and loads its weights offline-first, adapting the stem and inflating 2D
kernels where needed, and reports on every tensor (:class:`LoadReport`).
"""

from medtl.backbones.adapt import adapt_input_channels, inflate_to_3d
from medtl.backbones.files import (
    ChecksumError,
    WeightsFormatError,
    WeightsNotFoundError,
    load_state_file,
    sha256_file,
    weights_dir,
)
from medtl.backbones.inputs import check_batch, normalize
from medtl.backbones.model import Classifier, Ensemble, create, extract_features, pool_members
from medtl.backbones.rank import BackboneScore, logme, parse_candidates, rank_backbones
from medtl.backbones.registry import (
    BackboneSpec,
    Preprocessing,
    backbone_entries,
    get_spec,
    list_backbones,
    preprocessing_for,
    register_backbone,
)
from medtl.backbones.sources import ExpectedFile, expected_files, imagenet_checkpoint
from medtl.backbones.weights import LoadReport, WeightsMismatchError
from medtl.registry import BACKBONES  # filled by medtl.backbones.registry

__all__ = [
    "BACKBONES",
    "BackboneScore",
    "BackboneSpec",
    "ChecksumError",
    "Classifier",
    "Ensemble",
    "ExpectedFile",
    "LoadReport",
    "Preprocessing",
    "WeightsFormatError",
    "WeightsMismatchError",
    "WeightsNotFoundError",
    "adapt_input_channels",
    "backbone_entries",
    "check_batch",
    "create",
    "expected_files",
    "extract_features",
    "get_spec",
    "imagenet_checkpoint",
    "inflate_to_3d",
    "list_backbones",
    "load_state_file",
    "logme",
    "normalize",
    "parse_candidates",
    "pool_members",
    "preprocessing_for",
    "rank_backbones",
    "register_backbone",
    "sha256_file",
    "weights_dir",
]
