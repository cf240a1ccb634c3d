"""Per-epoch data time without a cache, with the memory cache and with the disk cache.

Writes synthetic 12-bit DICOM radiographs (128 x 128, site A of ``medtl synth``), then times
full passes of the evaluation transform chain (224 x 224, as a default 2D backbone takes)
through a DataLoader, in one run:

- none: every epoch decodes and preprocesses every scan (the baseline);
- memory: MONAI CacheDataset fills RAM up front (counted in epoch 1), later epochs read RAM;
- disk: MONAI PersistentDataset writes the first epoch under a folder keyed by the recipe;
  later epochs (and later runs) read those files.

    .venv/bin/python scripts/bench_cache.py [--scans 300] [--workers 0]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from medtl.io.synthetic import _site_image, write_dicom
from medtl.train.data import make_loader
from medtl.transforms import build_transforms, make_preprocessing


def epoch_seconds(make, epochs: int = 2) -> list[float]:
    """Seconds for each epoch, the loader's construction (a memory cache's fill) in the first."""
    started = time.perf_counter()
    loader = make()
    times = []
    for _ in range(epochs):
        for _batch in loader:
            pass
        times.append(time.perf_counter() - started)
        started = time.perf_counter()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=300)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        items = []
        for i in range(args.scans):
            path = tmp / "scans" / f"{i:05d}.dcm"
            write_dicom(path, _site_image(rng, "A", bool(i % 2)), patient=f"A{i:05d}", uid_seed=str(i))
            items.append({"image": str(path), "label": i % 2})
        pre = make_preprocessing(spatial_dims=2, image_size=224, channels=1, intensity="auto", ct_window=(40, 400),
                                 normalization={"kind": "mean_std", "mean": 0.449, "std": 0.226})
        transform = build_transforms(pre)
        print(f"{args.scans} DICOM scans 128x128 -> 224x224, batch 32, {args.workers} loader workers, {os.cpu_count()} CPU cores")
        results = {}
        for cache in ("none", "memory", "disk"):
            results[cache] = epoch_seconds(lambda cache=cache: make_loader(
                items, transform, batch_size=32, shuffle=True, num_workers=args.workers, cache=cache,
                cache_dir=tmp / "cache", recipe=pre))
        base = results["none"][1]
        for cache, (first, second) in results.items():
            print(f"{cache:6s}  epoch 1 {first:6.2f} s  epoch 2 {second:6.2f} s  "
                  f"({args.scans / second:7.0f} scans/s; epoch 2 is {base / second:5.1f}x faster than no cache)")


if __name__ == "__main__":
    main()
