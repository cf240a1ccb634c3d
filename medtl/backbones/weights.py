"""Weight sources, safe file loading, and the tensor-by-tensor transfer with its load report.

Every source is turned into a state dict in the backbone's own key names; :func:`transfer`
then matches it against the backbone tensor by tensor, adapts what can be adapted exactly (the
stem's input channels, 2D -> 3D inflation) and reports every other difference.  Nothing is
skipped silently: a missing, unexpected or shape-mismatched tensor is an error unless the caller
allows mismatches, and even then it is in the report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.error import URLError

import torch
from safetensors.torch import load_file as load_safetensors
from torch import nn

from medtl.backbones.adapt import adapt_input_channels, inflate_to_3d
from medtl.backbones.registry import BackboneSpec, source_of

log = logging.getLogger("medtl.backbones")

StateDict = dict[str, torch.Tensor]

# torchvision's checkpoint names carry the first hex digits of the file's sha256.
_NAME_HASH = re.compile(r"-([a-f0-9]{8,})\.")
# Containers some checkpoints wrap their state dict in.
_WRAPPERS = ("state_dict", "model_state_dict", "model")


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights that are neither on disk nor downloadable; the message says where to put them."""


class WeightsFormatError(ValueError):
    """A weights file that is not a plain state dict (or not the layout its source should have)."""


class ChecksumError(ValueError):
    """A weights file whose sha256 differs from the known one."""


class WeightsMismatchError(ValueError):
    """Weights that do not fit the backbone; the message carries the load report."""


@dataclass
class LoadReport:
    """What happened to every tensor when pretrained weights were loaded.

    ``loaded``: copied unchanged.  ``adapted``: copied through an exact adaptation (key -> how).
    ``missing``: backbone tensors the weights lack (left at random initialisation).
    ``unexpected``: tensors in the weights with no place in the backbone.  ``mismatched``: same
    key, incompatible shape (key -> shapes).  ``dropped``: the source's own classifier, replaced
    by the medtl head.
    """

    source: str
    file: str | None = None
    loaded: list[str] = field(default_factory=list)
    adapted: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every backbone tensor was loaded or adapted and nothing was left over."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 10) -> str:
        """Counts on one line, then every adaptation and (up to ``limit`` of) each problem."""
        if self.source == "none":
            return "weights none: random initialisation"
        where = f" ({self.file})" if self.file else ""
        lines = [
            f"weights {self.source}{where}: {len(self.loaded)} loaded, {len(self.adapted)} adapted, "
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, "
            f"{len(self.mismatched)} shape-mismatched, {len(self.dropped)} dropped (source classifier)"
        ]
        lines += [f"  adapted {key}: {how}" for key, how in self.adapted.items()]
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            lines += [f"  {label} {key}" for key in keys[:limit]]
            if len(keys) > limit:
                lines.append(f"  ... and {len(keys) - limit} more {label}")
        items = list(self.mismatched.items())
        lines += [f"  shape-mismatched {key}: {shapes}" for key, shapes in items[:limit]]
        if len(items) > limit:
            lines.append(f"  ... and {len(items) - limit} more shape-mismatched")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, for run reports and bundles."""
        return asdict(self)


# ---------------------------------------------------------------- files


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: str | Path, expected: str) -> str:
    """Check a file against a full sha256 or a prefix of one (torchvision's file names); return the digest."""
    actual = sha256_file(path)
    if not actual.startswith(expected.lower()):
        raise ChecksumError(f"{path}: sha256 {actual} does not match the expected {expected}; the file is corrupt or not the published one")
    return actual


def load_state_file(path: str | Path, sha256: str | None = None) -> StateDict:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only=True``: no pickled code).

    A checkpoint wrapping its state dict under ``state_dict``, ``model_state_dict`` or ``model``
    is unwrapped.  ``sha256`` (full digest or prefix) is checked first when given.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"{path}: weights file not found")
    if sha256:
        verify_sha256(path, sha256)
    if path.suffix == ".safetensors":
        try:
            return load_safetensors(str(path))
        except Exception as err:  # safetensors raises its own error types for bad headers
            raise WeightsFormatError(f"{path}: not a readable safetensors file ({err})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightsFormatError(
            f"{path}: cannot be read as a state dict with weights_only=True ({reason}). medtl never "
            "unpickles code from weight files; re-save the file as a state dict "
            "(torch.save(model.state_dict(), ...)) or as .safetensors in an environment you trust"
        ) from None
    return _unwrap(obj, path)


def _unwrap(obj: Any, path: Path) -> StateDict:
    if isinstance(obj, dict):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        for key in _WRAPPERS:
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
        keys = ", ".join(map(str, list(obj)[:8]))
        raise WeightsFormatError(f"{path}: a dict but not a state dict of tensors (top-level keys: {keys})")
    raise WeightsFormatError(f"{path}: holds a {type(obj).__name__}, not a state dict")


def strip_prefix(state: StateDict, prefix: str) -> StateDict:
    """Keys without a leading ``prefix`` (e.g. DataParallel's ``module.``) where they have it."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


# ---------------------------------------------------------------- sources


def _offline() -> bool:
    return os.environ.get("MEDTL_OFFLINE", "").lower() in ("1", "true", "yes")


def imagenet_checkpoint(name: str, variant: str | None = None) -> tuple[Path, str, str]:
    """Where torchvision keeps the ImageNet weights of ``name``: (cache file, URL, sha256 prefix).

    ``variant`` names one of the weights enum's members (e.g. ``IMAGENET1K_V1``); default: the
    enum's ``DEFAULT``.
    """
    from torchvision.models import get_model_weights

    enum = get_model_weights(name)
    try:
        entry = enum[variant] if variant else enum.DEFAULT
    except KeyError:
        raise KeyError(f"{name} has no ImageNet weights '{variant}'; choose one of {[m.name for m in enum]}") from None
    file_name = entry.url.rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name, entry.url, _torchvision_hash_prefix(file_name)


def _torchvision_hash_prefix(file_name: str) -> str:
    match = _NAME_HASH.search(file_name)
    if match is None:
        raise ValueError(f"{file_name}: torchvision file name without a sha256 prefix")
    return match.group(1)


def imagenet_state_dict(name: str, variant: str | None = None) -> tuple[StateDict, Path]:
    """torchvision's ImageNet state dict for ``name`` from the torch hub cache, downloading it
    there if the machine is online (and ``MEDTL_OFFLINE`` is not set); sha256-checked."""
    path, url, prefix = imagenet_checkpoint(name, variant)
    if not path.is_file():
        reason = "MEDTL_OFFLINE is set"
        if not _offline():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(url, str(path), hash_prefix=prefix, progress=False)
            except (URLError, OSError, RuntimeError) as err:
                reason = f"download failed: {err}"
        if not path.is_file():
            raise WeightsNotFoundError(
                f"ImageNet weights for {name} not found: {path} does not exist and {reason}. "
                f"For offline use, fetch {url} on a machine with internet access and put it, named "
                f"{path.name}, in {path.parent} (or run: medtl weights import imagenet:{name} FILE)"
            )
    return load_state_file(path, sha256=prefix), path


def _densenet_legacy_keys(state: StateDict) -> StateDict:
    """torchvision's DenseNet checkpoints predate dot-free module names: ``norm.1`` -> ``norm1``."""
    legacy = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.")
    return {legacy.sub(r"\1\2.", k): v for k, v in state.items()}


def _to_monai_densenet(state: StateDict) -> StateDict:
    """torchvision DenseNet key names -> MONAI's (each dense layer's modules sit under ``layers``)."""
    return {re.sub(r"(denselayer\d+)\.", r"\1.layers.", k): v for k, v in state.items()}


def read_source(spec: BackboneSpec, weights: str) -> tuple[StateDict, str | None]:
    """The state dict ``weights`` names, in ``spec``'s backbone key names, and the file it came from."""
    source, arg = source_of(weights)
    if source not in ("file", "bundle") and source not in spec.sources:
        offered = ", ".join([*spec.sources, "bundle:PATH", "PATH"])
        raise ValueError(f"{spec.name} ({spec.dims}D) has no '{source}' weights; it loads: {offered}")
    if source == "imagenet":
        state, path = imagenet_state_dict(spec.name, arg or None)
        file = str(path)
    elif source == "file":
        # DataParallel's prefix, and a medtl classifier's (whose head.* is then dropped like any head).
        state, file = strip_prefix(strip_prefix(load_state_file(arg), "module."), "backbone."), arg
    else:
        raise ValueError(f"weights source '{source}' is not available yet")
    return _to_family_keys(spec, state), file


def _to_family_keys(spec: BackboneSpec, state: StateDict) -> StateDict:
    """Key-name conventions that differ between checkpoints of the same network."""
    if spec.name.startswith("densenet"):
        state = _densenet_legacy_keys(state)
        if spec.family == "monai_densenet" and not any(".layers." in k for k in state):
            state = _to_monai_densenet(state)
    return state


# ---------------------------------------------------------------- transfer


def _classifier_keys(spec: BackboneSpec, state: StateDict) -> list[str]:
    prefix = spec.classifier + "."
    return [k for k in state if k.startswith(prefix) or k.startswith("head.")]


def transfer(
    backbone: nn.Module,
    state: StateDict,
    spec: BackboneSpec,
    *,
    source: str,
    file: str | None = None,
    allow_mismatch: bool = False,
    inflation: str = "mean",
) -> LoadReport:
    """Load ``state`` into ``backbone`` tensor by tensor and report on every one.

    Exact adaptations: the stem kernel to another channel count (:func:`adapt_input_channels`)
    and any 2D kernel into its 3D twin (:func:`inflate_to_3d`).  BatchNorm step counters
    (``num_batches_tracked``) are bookkeeping, not learned, and old checkpoints lack them; they
    are not reported missing.  Raises :class:`WeightsMismatchError` unless the report is clean or
    ``allow_mismatch``.
    """
    dropped = _classifier_keys(spec, state)
    state = {k: v for k, v in state.items() if k not in dropped}
    report = LoadReport(source=source, file=file, dropped=dropped)
    target = backbone.state_dict()
    accepted: StateDict = {}
    stem_weight = spec.stem + ".weight"
    for key, want in target.items():
        if key not in state:
            if not key.endswith("num_batches_tracked"):
                report.missing.append(key)
            continue
        tensor, notes = state[key], []
        if tensor.dim() == 4 and want.dim() == 5 and tensor.shape[0] == want.shape[0] and tensor.shape[2:] == want.shape[3:]:
            tensor = inflate_to_3d(tensor, want.shape[2], inflation)
            notes.append(f"2D -> 3D ({inflation} over depth {want.shape[2]})")
        if key == stem_weight and tensor.dim() == want.dim() and tensor.shape[1] != want.shape[1] and tensor.shape[2:] == want.shape[2:]:
            rule = "summed" if want.shape[1] == 1 else f"tiled, x{tensor.shape[1]}/{want.shape[1]}"
            notes.append(f"{tensor.shape[1]} -> {want.shape[1]} input channels ({rule})")
            tensor = adapt_input_channels(tensor, want.shape[1])
        if tensor.shape != want.shape:
            report.mismatched[key] = f"weights {tuple(state[key].shape)} vs model {tuple(want.shape)}"
            continue
        accepted[key] = tensor
        if notes:
            report.adapted[key] = "; ".join(notes)
        else:
            report.loaded.append(key)
    report.unexpected = [k for k in state if k not in target]
    if not report.ok and not allow_mismatch:
        raise WeightsMismatchError(
            f"{source} weights do not fit {spec.name} ({spec.dims}D); to load them anyway pass "
            f"allow_mismatch=True (config: model.allow_mismatch: true):\n{report.summary()}"
        )
    backbone.load_state_dict(accepted, strict=False)
    log.info("%s", report.summary())
    if not report.ok:
        log.warning("%s weights loaded with mismatches (allowed): %d missing tensors stay random", source, len(report.missing))
    return report
