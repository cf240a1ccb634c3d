"""Weight sources: where each one's files live and how its key layout maps onto a registry backbone.

Each reader returns a :class:`SourceWeights` in the backbone's own key names, with the source's
head named in ``dropped`` and any exact, source-specific conversion named in ``adapted``;
:func:`medtl.backbones.weights.transfer` does the rest.  Every source works offline from files:
without a PATH, ``medicalnet`` / ``radimagenet`` / ``torchxrayvision`` read the expected file
from the local weights folder, and ``imagenet`` reads torchvision's own cache.
"""

from __future__ import annotations

import re
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
from medtl.backbones.registry import REGISTRY, BackboneSpec, read_bundle_meta, source_of, torchvision_name

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
    meta = read_bundle_meta(folder)
    model = meta.get("model", {})
    if model.get("backbone") not in (spec.name, torchvision_name(spec.name)):
        raise ValueError(f"{folder}: the bundle's backbone is {model.get('backbone')!r}, not {spec.name!r}; build {model.get('backbone')!r}")
    path = folder / "model.safetensors"
    state = load_state_file(path)
    if not any(k.startswith("backbone.") for k in state):
        raise WeightsFormatError(f"{path}: no backbone.* tensors (not a medtl classifier)")
    return SourceWeights(strip_prefix(state, "backbone."), str(path))


def _read_file(spec: BackboneSpec, arg: str) -> SourceWeights:
    # DataParallel's prefix, and a medtl classifier's (whose head.* is then dropped like any head).
    state = strip_prefix(strip_prefix(load_state_file(arg), "module."), "backbone.")
    return SourceWeights(state, arg)


def _read_imagenet(spec: BackboneSpec, arg: str) -> SourceWeights:
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
    for (name, dims), spec in REGISTRY.items():
        if "imagenet" in spec.sources:
            imagenet_dims.setdefault(name, []).append(dims)
    for name, dims in imagenet_dims.items():
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
