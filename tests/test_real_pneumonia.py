"""Real chest X-rays (PneumoniaMNIST, ../shared/data): train briefly from files on disk."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medtl.cli import main

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "pneumoniamnist" / "pneumoniamnist_trainval_28.npz"

pytestmark = [pytest.mark.slow, pytest.mark.shared_data]


def _write_split(root: Path, images: np.ndarray, labels: np.ndarray, split: str, rows: list[str]) -> None:
    for i, (image, label) in enumerate(zip(images, labels)):
        name = f"{split}/{i:05d}.png"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / name)
        rows.append(f"{name},{'pneumonia' if label else 'normal'},{split}")


@pytest.mark.skipif(not DATA.is_file(), reason="../shared/data/pneumoniamnist is not present on this machine")
def test_pneumoniamnist_trains_to_high_validation_auroc(tmp_path):
    arrays = np.load(DATA)
    rng = np.random.default_rng(0)
    train_idx = rng.choice(len(arrays["train_images"]), 1000, replace=False)
    rows = ["image,label,split"]
    _write_split(tmp_path, arrays["train_images"][train_idx], arrays["train_labels"][train_idx, 0], "train", rows)
    _write_split(tmp_path, arrays["val_images"], arrays["val_labels"][:, 0], "val", rows)
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    config = tmp_path / "pneumonia.yaml"
    config.write_text(
        "data:\n  manifest: manifest.csv\n  image_size: [48, 48]\n  num_workers: 0\n"
        "model:\n  backbone: resnet18\n  weights: none\n"
        "train:\n  epochs: 5\n  batch_size: 64\n  lr: 0.001\n  head_lr: 0.001\n  folds: 1\n"
    )
    assert main(["train", str(config), "--out", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "report" / "metrics.json").read_text())
    print(f"PneumoniaMNIST validation AUROC {metrics['calibrated']['auroc']['auc']:.4f}")
    assert metrics["calibrated"]["auroc"]["auc"] > 0.9
