"""The trainer and the fine-tuning strategies on a tiny in-memory problem."""

import csv

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from medtl.adapt import LinearProbe, make_strategy
from medtl.config import TrainConfig
from medtl.train import Trainer, auroc, class_weights


class TinyClassifier(nn.Module):
    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.head(self.backbone(x))


def _loader(n: int, seed: int, shuffle: bool) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    images = torch.randn(n, 1, 8, 8, generator=g) * 0.5 + labels.view(-1, 1, 1, 1).float()
    items = [{"image": images[i], "label": labels[i]} for i in range(n)]
    return DataLoader(items, batch_size=16, shuffle=shuffle, generator=g)


def test_trainer_learns_restores_best_and_logs(tmp_path):
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=6, lr=3e-3, patience=6, device="cpu")
    trainer = Trainer(TinyClassifier(), make_strategy("full"), cfg)
    val = _loader(64, 1, False)
    result = trainer.fit(_loader(128, 0, True), val, log_path=tmp_path / "log.csv")
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert len(rows) == len(result.history) == 6
    best = max(result.history, key=lambda r: (r["val_auroc"], -r["val_loss"]))
    assert result.best_epoch == best["epoch"]
    logits, labels = trainer.predict_logits(val)
    assert auroc(labels, logits) == pytest.approx(best["val_auroc"], abs=1e-6)
    assert result.best_auroc > 0.9


def test_early_stopping_stops_after_patience():
    cfg = TrainConfig(epochs=20, lr=1e-9, head_lr=1e-9, patience=2, device="cpu")
    result = Trainer(TinyClassifier(), make_strategy("full"), cfg).fit(_loader(32, 0, True), _loader(32, 1, False))
    assert len(result.history) < 20


def test_linear_probe_leaves_backbone_bit_identical():
    model = TinyClassifier()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = model.head.weight.clone()
    trainer = Trainer(model, LinearProbe(), TrainConfig(epochs=2, device="cpu"))
    assert [g["name"] for g in trainer.optimizer.param_groups] == ["head"]
    trainer.fit(_loader(64, 0, True), _loader(32, 1, False))
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, before[key]), key  # weights and BatchNorm statistics
    assert not torch.equal(model.head.weight, head_before)


def test_full_fine_tuning_groups_use_head_multiplier():
    groups = make_strategy("full").param_groups(TinyClassifier(), TrainConfig(lr=1e-4))
    assert {g["name"]: g["lr"] for g in groups} == {"backbone": 1e-4, "head": pytest.approx(1e-3)}


def test_unknown_strategy_is_named():
    with pytest.raises(ValueError, match="unknown fine-tuning strategy 'lpft'"):
        make_strategy("lpft")


def test_class_weights_inverse_frequency():
    items = [{"label": 0}] * 30 + [{"label": 1}] * 10
    np.testing.assert_allclose(class_weights(items, 2).numpy(), [40 / 60, 40 / 20])


def test_auroc_single_class_is_nan():
    assert np.isnan(auroc(np.zeros(4, dtype=int), np.zeros((4, 2))))
