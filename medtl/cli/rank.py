"""``medtl rank CONFIG --backbones a,b,c``: rank candidate backbones by LogME before fine-tuning."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rank",
        help="Rank backbones and weight sources by transferability (LogME).",
        description="Extract frozen features of the config's training split with each candidate backbone and score "
        "them with LogME (higher is better), so a few candidates can be fine-tuned instead of all. Minutes, not hours.",
    )
    p.add_argument("config", type=Path, help="Training config (its data section and model.in_channels are used).")
    p.add_argument(
        "--backbones",
        required=True,
        help="Comma-separated candidates, each NAME or NAME@WEIGHTS, e.g. resnet18,densenet121@torchxrayvision "
        "(default weights: the config's model.weights).",
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="Override a config field.")
    p.add_argument("--limit", type=int, default=1000, help="Use at most this many training scans (stratified sample, default 1000).")
    p.add_argument("--batch-size", type=int, default=32, help="Images per forward pass (default 32).")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from monai.transforms import Compose
    from sklearn.model_selection import train_test_split
    from tqdm.auto import tqdm

    from medtl.backbones import parse_candidates, rank_backbones
    from medtl.config import load_config
    from medtl.pipeline import UNNORMALISED, prepare_data, preprocessing, read_records
    from medtl.tasks import SingleLabel
    from medtl.train import labelled_items, resolve_device
    from medtl.transforms import deterministic_transforms

    config = load_config(args.config, args.overrides)
    data = prepare_data(config, read_records(config))  # the run's classes and training split, as medtl train has them
    if not isinstance(data.task, SingleLabel):
        raise ValueError(f"medtl rank scores class labels (LogME); task.type={data.task.name} is not single-label")
    classes = data.classes
    items = labelled_items(data.parts["train"], classes)
    if len(items) > args.limit:
        items, _ = train_test_split(items, train_size=args.limit, stratify=[i["label"] for i in items], random_state=0)
    pre = preprocessing(config, image_size=config.data.image_size or 224, normalization=UNNORMALISED)  # candidates normalise
    load = Compose(deterministic_transforms(pre))
    images = torch.stack([torch.as_tensor(load(dict(item))["image"]).float() for item in tqdm(items, desc="loading", unit="scan")])
    labels = np.array([item["label"] for item in items])
    scores = rank_backbones(
        parse_candidates(args.backbones, config.model.weights),
        (images, labels),
        in_channels=config.model.in_channels,
        spatial_dims=config.data.spatial_dims,
        batch_size=args.batch_size,
        device=resolve_device(config.train.device),
        allow_mismatch=config.model.allow_mismatch,
        inflation=config.model.inflation,
    )
    print(f"LogME on {len(items)} training scans ({len(classes)} classes); higher transfers better:")
    for rank, score in enumerate(scores, 1):
        print(f"  {rank}. {score.backbone}@{score.weights}: LogME {score.logme:.4f} ({score.feature_dim} features, {score.seconds:.1f}s)")
    return 0
