"""From manifest records to DataLoaders: class indexing, caching (memory or disk) and batching."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset

from medtl.io import ScanRecord
from medtl.transforms import recipe_key


def resolve_classes(records: Sequence[ScanRecord], configured: Sequence[str] | None = None) -> list[str]:
    """The class order: the configured list, else the sorted label names found."""
    found = sorted({r.label for r in records if r.label})
    if configured:
        unknown = sorted(set(found) - set(configured))
        if unknown:
            raise ValueError(f"labels {unknown} are not in data.classes {list(configured)}")
        return list(configured)
    if len(found) < 2:
        raise ValueError(f"need at least two classes to train, found {found}")
    return found


def labelled_items(records: Sequence[ScanRecord], classes: Sequence[str]) -> list[dict]:
    """MONAI-style item dicts ``{"image": path, "label": index}`` for labelled records."""
    index = {name: i for i, name in enumerate(classes)}
    return [{"image": str(r.image), "label": index[r.label]} for r in records if r.label]


def class_weights(items: Sequence[dict], num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights, normalised to mean 1 over the classes present."""
    counts = Counter(item["label"] for item in items)
    weights = torch.tensor([len(items) / (num_classes * counts[c]) if counts[c] else 0.0 for c in range(num_classes)])
    return weights


def default_cache_dir() -> Path:
    """Where disk caches live: ``$MEDTL_CACHE_DIR``, else ``~/.cache/medtl/preprocessed``."""
    configured = os.environ.get("MEDTL_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "medtl" / "preprocessed"


def _item_hash(item: dict) -> bytes:
    """Disk-cache key of one item: its path, size and modification time (a replaced scan is
    decoded again), and its label."""
    path = Path(item["image"])
    try:
        stat = path.stat()
        stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
    except OSError:
        stamp = "missing"
    return hashlib.blake2b(f"{path.resolve()}|{stamp}|{item.get('label')}".encode(), digest_size=16).hexdigest().encode()


def make_dataset(items: Sequence[dict], transform, *, cache: str = "none", cache_dir: str | Path | None = None,
                 recipe: Mapping[str, Any] | None = None, num_workers: int = 0) -> Dataset:
    """A MONAI dataset whose deterministic transforms run once per scan: ``memory`` caches them up
    front in RAM (``CacheDataset``), ``disk`` on first use under ``cache_dir/<recipe hash>``
    (``PersistentDataset``: a new recipe gets a new folder, so a change of transforms rebuilds
    the cache), ``none`` re-decodes every epoch."""
    items = list(items)
    if cache == "memory":
        return CacheDataset(items, transform=transform, num_workers=max(1, num_workers), progress=True)
    if cache == "disk":
        if recipe is None:
            raise ValueError("cache='disk' needs the preprocessing recipe to key the cache")
        folder = Path(cache_dir or default_cache_dir()) / recipe_key(recipe)
        folder.mkdir(parents=True, exist_ok=True)
        return PersistentDataset(items, transform=transform, cache_dir=folder, hash_func=_item_hash)
    if cache == "none":
        return Dataset(items, transform=transform)
    raise ValueError(f"unknown cache '{cache}': choose memory, disk or none")


def make_loader(
    items: Sequence[dict],
    transform,
    *,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    cache: str = "memory",
    cache_dir: str | Path | None = None,
    recipe: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader over ``items`` with the caching of :func:`make_dataset`.  MONAI's DataLoader
    seeds each worker's random transforms differently."""
    dataset = make_dataset(items, transform, cache=cache, cache_dir=cache_dir, recipe=recipe, num_workers=num_workers)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=generator,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        drop_last=shuffle and len(items) > batch_size,
    )
