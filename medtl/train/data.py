"""From manifest records to DataLoaders: class indexing, caching (memory or disk) and batching."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset
from monai.data.utils import worker_init_fn as monai_worker_init
from torch.utils.data import DataLoader as TorchDataLoader
from torch.utils.data import DistributedSampler

from medtl.io import ScanRecord
from medtl.threads import worker_threads
from medtl.train.distributed import rank, world_size
from medtl.transforms import recipe_key


def labelled_items(records: Sequence[ScanRecord], classes: Sequence[str]) -> list[dict]:
    """MONAI-style item dicts ``{"image": path, "label": index}`` for labelled records."""
    index = {name: i for i, name in enumerate(classes)}
    return [{"image": str(r.image), "label": index[r.label]} for r in records if r.label]


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


def micro_batch_size(batch_size: int, accumulate: int = 1, processes: int = 1) -> int:
    """Images per forward pass in each process: ``train.batch_size`` is the images per optimizer
    step over all processes, split across ``processes`` and ``accumulate`` micro-batches."""
    parts = accumulate * processes
    if batch_size % parts:
        raise ValueError(f"train.batch_size={batch_size} must be divisible by train.accumulate x processes = "
                         f"{accumulate} x {processes}")
    return batch_size // parts


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
    """A DataLoader over ``items`` with the caching of :func:`make_dataset`.

    Shuffled loaders draw through a ``DistributedSampler`` over this process's share of the
    data (all of it without torchrun), so one process sees the same global batches as N
    processes together; call :func:`start_epoch` before each epoch.  Workers are started anew
    each epoch so that an epoch's augmentation depends on (seed, epoch) alone: resumable exactly."""
    dataset = make_dataset(items, transform, cache=cache, cache_dir=cache_dir, recipe=recipe, num_workers=num_workers)
    sampler = DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed) if shuffle else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_worker_init,
        pin_memory=torch.cuda.is_available(),
        drop_last=shuffle and len(sampler) > batch_size,
    )


def _worker_init(worker_id: int) -> None:
    """One thread per worker (the budget of :mod:`medtl.threads`), then MONAI's per-worker
    random state, which a ``worker_init_fn`` of our own would otherwise replace."""
    worker_threads(worker_id)
    monai_worker_init(worker_id)


def sharded(loader: DataLoader) -> DataLoader:
    """The same evaluation loader over this process's shard (``DistributedSampler`` without
    shuffling, padded to equal shards; :func:`medtl.train.distributed.gather_sharded` undoes it)."""
    sampler = DistributedSampler(loader.dataset, num_replicas=world_size(), rank=rank(), shuffle=False)
    return TorchDataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                           collate_fn=loader.collate_fn, worker_init_fn=loader.worker_init_fn, pin_memory=loader.pin_memory)


def start_epoch(loader: DataLoader, epoch: int, seed: int) -> None:
    """Make ``epoch``'s order and random augmentation a function of (seed, epoch, rank) alone:
    the sampler's epoch, the generator that seeds the workers, and (without workers) the
    transforms' own random state."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    epoch_seed = (seed * 1_000_003 + epoch * 1_009 + rank()) % 2**62
    if loader.generator is not None:
        loader.generator.manual_seed(epoch_seed)
    transform = getattr(loader.dataset, "transform", None)
    if loader.num_workers == 0 and hasattr(transform, "set_random_state"):
        transform.set_random_state(seed=epoch_seed % 2**32)
