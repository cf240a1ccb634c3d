"""Helpers shared by the training tests (imported by name: pytest puts tests/ on sys.path)."""

import csv
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from medtl.backbones import create, preprocessing_for
from medtl.bundle import save
from medtl.calibrate import TemperatureScaling
from medtl.config import Config, dump_config
from medtl.io import write_synthetic
from medtl.metrics import choose_operating_point
from medtl.transforms import make_preprocessing


def write_small_split(root: Path, *, patients_per_site: int, n_train: int, n_val: int) -> Path:
    """A synthetic data set under ``root/data`` and ``root/small.csv`` with its first
    ``n_train`` labelled rows as train and the next ``n_val`` as val."""
    write_synthetic(root / "data", patients_per_site=patients_per_site, test_per_site=1)
    rows = [r for r in csv.DictReader(open(root / "data" / "manifest.csv")) if r["label"]][: n_train + n_val]
    for i, row in enumerate(rows):
        row.update(image=f"data/{row['image']}", split="train" if i < n_train else "val")
    with open(root / "small.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root / "small.csv"


def write_tiny_bundle(folder: Path, *, image_size: int | list[int] = 32, config: Config | None = None,
                      training: dict | None = None, **recipe) -> Path:
    """A ResNet-18 bundle with random weights at ``image_size`` px: temperature and threshold
    fitted on random logits; ``config`` and ``training`` as a run would record them; ``recipe``
    overrides preprocessing recipe entries."""
    torch.manual_seed(0)
    model = create("resnet18", weights="none", in_channels=1, spatial_dims=2, num_classes=2)
    pre = make_preprocessing(spatial_dims=2, image_size=image_size, channels=1, intensity="auto", ct_window=(40, 400),
                             normalization=preprocessing_for("resnet18", "none", in_channels=1))
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(100, 2)), rng.integers(0, 2, 100)
    calibrator = TemperatureScaling().fit(logits, labels)
    op = choose_operating_point(labels, calibrator.transform(logits)[:, 1], "youden")
    spec = {"backbone": "resnet18", "in_channels": 1, "spatial_dims": 2, "num_classes": 2, "weights": "none"}
    return save(folder, model, model_spec=spec, classes=["normal", "opacity"], positive_index=1,
                preprocessing={**pre, **recipe}, calibrator=calibrator, operating_point=op,
                config_yaml=dump_config(config or Config()), training=training)


class TinyClassifier(nn.Module):
    """Stem, two blocks and pooling (BatchNorm unless ``norm=False``), ``feature_dim`` 8."""

    def __init__(self, dims: int = 2, num_classes: int = 2, norm: bool = True) -> None:
        super().__init__()
        conv, bn = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d)
        pool = nn.AdaptiveAvgPool2d(1) if dims == 2 else nn.AdaptiveAvgPool3d(1)

        def norm_layer(channels: int) -> nn.Module:
            return bn(channels) if norm else nn.Identity()

        self.backbone = nn.Sequential()
        self.backbone.add_module("conv1", conv(1, 4, 3, padding=1))
        self.backbone.add_module("bn1", norm_layer(4))
        self.backbone.add_module("layer1", nn.Sequential(conv(4, 4, 3, padding=1), norm_layer(4), nn.ReLU()))
        self.backbone.add_module("layer2", nn.Sequential(conv(4, 8, 3, padding=1), norm_layer(8), nn.ReLU()))
        self.backbone.add_module("pool", nn.Sequential(pool, nn.Flatten()))
        self.head = nn.Linear(8, num_classes)
        self.feature_dim = 8

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def tiny_loader(n: int, seed: int = 0, *, dims: int = 2, size: int = 8, shift: float = 0.0, batch_size: int = 8,
                shuffle: bool = True) -> DataLoader:
    """``n`` images of ``size`` px (label 1: brighter by one) plus ``shift``, in dicts like medtl's loaders."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    images = torch.randn(n, 1, *([size] * dims), generator=g) * 0.5 + labels.view(-1, *([1] * (dims + 1))).float() + shift
    items = [{"image": images[i], "label": labels[i]} for i in range(n)]
    return DataLoader(items, batch_size=batch_size, shuffle=shuffle, generator=g)
