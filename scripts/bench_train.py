"""medtl's training loop against a plain PyTorch loop, and data time with and without caching.

In one run, on the synthetic two-site chest X-rays of ``medtl synth``:

- data: one epoch of the evaluation transform chain through ``make_loader`` without a cache
  (every scan decoded and preprocessed) and from the memory cache (second epoch);
- training: the memory-cached tensors, the same ResNet-18, batch size, AdamW rates and warm-up +
  cosine schedule, the same number of steps, once in a plain loop written below and once in
  ``medtl.train.Trainer``; only the training epochs are timed (the Trainer's ``images_per_s``
  covers the same span), the first epoch of each is warm-up, and the two alternate so that load
  from other jobs falls on both.

    .venv/bin/python scripts/bench_train.py [--patients 60] [--size 64] [--epochs 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from medtl.adapt import make_strategy
from medtl.backbones import create, preprocessing_for
from medtl.config import TrainConfig
from medtl.io import write_synthetic
from medtl.train import Trainer, resolve_device
from medtl.train.data import make_loader
from medtl.train.trainer import _warmup_cosine
from medtl.transforms import build_transforms, make_preprocessing


def data_epoch_seconds(items: list[dict], pre: dict, cache: str) -> tuple[float, DataLoader]:
    """Seconds of the second pass over ``items`` (the first fills a memory cache)."""
    loader = make_loader(items, build_transforms(pre, train=False), batch_size=32, shuffle=False, num_workers=0, cache=cache)
    for _ in loader:
        pass
    started = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - started, loader


def plain_epochs(model: nn.Module, loader: DataLoader, cfg: TrainConfig, device: torch.device) -> list[float]:
    """The hand-written baseline: images/s of each epoch."""
    model.to(device).train()
    head = list(model.head.parameters())
    head_ids = {id(p) for p in head}
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in model.parameters() if id(p) not in head_ids], "lr": cfg.lr},
         {"params": head, "lr": cfg.head_lr}], weight_decay=cfg.weight_decay)
    steps = cfg.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(steps, min(len(loader), steps // 10 + 1)))
    loss_fn = nn.CrossEntropyLoss()
    rates = []
    for _ in range(cfg.epochs):
        started, seen = time.perf_counter(), 0
        for batch in loader:
            images, labels = batch["image"].to(device), batch["label"].to(device)
            loss = loss_fn(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            seen += len(labels)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(seen / (time.perf_counter() - started))
    return rates


def medtl_epochs(model: nn.Module, loader: DataLoader, val: DataLoader, cfg: TrainConfig) -> list[float]:
    trainer = Trainer(model, make_strategy("full"), cfg)
    return [row["images_per_s"] for row in trainer.fit(loader, val).history]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=60, help="patients per site of the synthetic set")
    parser.add_argument("--size", type=int, default=64, help="network input size (pixels)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of plain loop and Trainer")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps per epoch (the cached tensors repeated)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device("auto")
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_synthetic(Path(tmp), patients_per_site=args.patients, test_per_site=1)
        rows = [r for r in csv.DictReader(open(paths["manifest"])) if r["label"]]
        classes = sorted({r["label"] for r in rows})
        items = [{"image": str(Path(tmp) / r["image"]), "label": classes.index(r["label"])} for r in rows]
        pre = make_preprocessing(spatial_dims=2, image_size=args.size, channels=1, intensity="auto", ct_window=(40, 400),
                                 normalization=preprocessing_for("resnet18", "none", in_channels=1))
        uncached, _ = data_epoch_seconds(items, pre, "none")
        cached, loader = data_epoch_seconds(items, pre, "memory")
    cached_items = [loader.dataset[i] for i in range(len(loader.dataset))]
    tensors = [cached_items[i % len(cached_items)] for i in range(args.steps * args.batch_size)]
    print(f"{len(items)} scans -> {args.size}x{args.size}, {args.steps} steps of batch {args.batch_size} per epoch, device {device}, "
          f"{args.threads} thread(s), load average {os.getloadavg()[0]:.1f} at start")
    print(f"data epoch: no cache {uncached:.2f} s, memory cache {1000 * cached:.1f} ms ({uncached / cached:.0f}x)")

    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=3e-4, head_lr=3e-3, amp="none", device=str(device),
                      patience=args.epochs)
    val = DataLoader(cached_items[:32], batch_size=args.batch_size)
    plain, ours = [], []
    for round_ in range(args.rounds):
        runs = (("plain", plain), ("medtl", ours))
        for name, rates in runs if round_ % 2 == 0 else runs[::-1]:
            torch.manual_seed(round_)
            model = create("resnet18", weights="none", in_channels=1, spatial_dims=2, num_classes=len(classes))
            train = DataLoader(tensors, batch_size=args.batch_size, shuffle=True, drop_last=True,
                               generator=torch.Generator().manual_seed(round_))
            got = plain_epochs(model, train, cfg, device) if name == "plain" else medtl_epochs(model, train, val, cfg)
            rates += got[1:]  # epoch 1 is warm-up
            print(f"round {round_ + 1} {name}: " + ", ".join(f"{r:.1f}" for r in got) + " images/s per epoch")
    a, b = statistics.median(plain), statistics.median(ours)
    print(f"plain loop {a:.1f} images/s, medtl Trainer {b:.1f} images/s (medians of {len(plain)} epochs); "
          f"medtl step overhead {100 * (a / b - 1):+.1f} %")
    print(f"load average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
