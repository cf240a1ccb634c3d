"""Weight files: safe reading (safetensors or ``weights_only``), sha256 checks, the local weights folder."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file as load_safetensors

StateDict = dict[str, torch.Tensor]

# Containers some checkpoints wrap their state dict in.
_WRAPPERS = ("state_dict", "model_state_dict", "model")
MANIFEST = "sha256.json"


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights that are neither on disk nor downloadable; the message says where to put them."""


class WeightsFormatError(ValueError):
    """A weights file that is not a plain state dict (or not the layout its source should have)."""


class ChecksumError(ValueError):
    """A weights file whose sha256 differs from the known one."""


def weights_dir() -> Path:
    """The local weights folder: ``$MEDTL_WEIGHTS_DIR``, else ``~/.cache/medtl/weights``."""
    configured = os.environ.get("MEDTL_WEIGHTS_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "medtl" / "weights"


def offline() -> bool:
    """True when ``MEDTL_OFFLINE`` forbids download attempts (a firewalled server may hang on them)."""
    return os.environ.get("MEDTL_OFFLINE", "").lower() in ("1", "true", "yes")


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
        raise ChecksumError(
            f"{path}: sha256 {actual} does not match the expected {expected}; the file is corrupt or not the published one"
        )
    return actual


def _manifest() -> dict[str, str]:
    path = weights_dir() / MANIFEST
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: not a valid sha256 manifest ({err})") from None


def recorded_sha256(path: str | Path) -> str | None:
    """The sha256 recorded when ``path`` was imported into the local weights folder, if it was."""
    try:
        relative = Path(path).resolve().relative_to(weights_dir().resolve())
    except ValueError:
        return None
    return _manifest().get(relative.as_posix())


def record_sha256(path: Path, digest: str) -> None:
    """Remember ``digest`` for ``path`` (inside the weights folder), so later loads are checked."""
    manifest = _manifest()
    manifest[path.resolve().relative_to(weights_dir().resolve()).as_posix()] = digest
    target = weights_dir() / MANIFEST
    target.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def load_state_file(path: str | Path, sha256: str | None = None) -> StateDict:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only=True``: no pickled code).

    A checkpoint wrapping its state dict under ``state_dict``, ``model_state_dict`` or ``model``
    is unwrapped.  The file is checked against ``sha256`` (digest or prefix) when given, else
    against the digest recorded when it was imported into the weights folder.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"{path}: weights file not found")
    expected = sha256 or recorded_sha256(path)
    if expected:
        verify_sha256(path, expected)
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
