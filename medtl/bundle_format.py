"""The bundle's file names and its ``bundle.json`` reader: the one place that knows the format,
shared by :mod:`medtl.bundle` (which writes and loads bundles) and :mod:`medtl.backbones` (which
initialises a backbone from one, ``weights: bundle:PATH``).  No torch here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FORMAT = "medtl-bundle/1"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "bundle.json"
CONFIG_FILE = "config.yaml"
REFERENCE_FILE = "reference.safetensors"


class BundleError(ValueError):
    """A folder that is not a readable medtl bundle."""


def read_meta(path: str | Path) -> dict[str, Any]:
    """The parsed ``bundle.json`` of a bundle folder, checked for the format marker."""
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        raise BundleError(f"{path} is not a medtl bundle: {META_FILE} not found")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise BundleError(f"{meta_path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise BundleError(f"{meta_path}: unknown bundle format {found!r} (expected {FORMAT})")
    return meta
