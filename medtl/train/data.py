"""From manifest records to DataLoaders: class indexing, caching and batching."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from monai.data import CacheDataset, DataLoader, Dataset

from medtl.io import ScanRecord


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


def make_loader(
    items: Sequence[dict],
    transform,
    *,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    cache: bool,
    seed: int = 0,
    desc: str = "caching",
) -> DataLoader:
    """A DataLoader over ``items``; with ``cache`` the deterministic transforms run once, up
    front, in memory (MONAI ``CacheDataset``), so later epochs do no decoding.  MONAI's
    DataLoader seeds each worker's random transforms differently."""
    if cache:
        dataset = CacheDataset(list(items), transform=transform, num_workers=max(1, num_workers), progress=True)
    else:
        dataset = Dataset(list(items), transform=transform)
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
