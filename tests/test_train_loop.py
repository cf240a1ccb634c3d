"""The trainer and the fine-tuning strategies on a tiny in-memory problem."""

import csv

import numpy as np
import pytest
import torch

from medtl.adapt import LinearProbe, make_strategy
from medtl.config import TrainConfig
from medtl.metrics import auroc_point
from medtl.train import Trainer, class_weights, predict_logits, softmax


def test_trainer_learns_restores_best_and_logs(tmp_path, tiny_model, tiny_data):
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=6, lr=3e-3, patience=6, device="cpu")
    trainer = Trainer(tiny_model(), make_strategy("full"), cfg)
    val = tiny_data(64, 1, batch_size=16, shuffle=False)
    result = trainer.fit(tiny_data(128, 0, batch_size=16, shuffle=True), val, log_path=tmp_path / "log.csv")
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert len(rows) == len(result.history) == 6
    best = max(result.history, key=lambda r: (r["val_auroc"], -r["val_loss"]))
    assert result.best_epoch == best["epoch"]
    logits, labels = predict_logits(trainer.model, val)
    assert auroc_point(labels, softmax(logits)) == pytest.approx(best["val_auroc"], abs=1e-6)
    assert result.best_auroc > 0.9


def test_early_stopping_stops_after_patience(tiny_model, tiny_data):
    cfg = TrainConfig(epochs=20, lr=1e-9, head_lr=1e-9, patience=2, device="cpu")
    trainer = Trainer(tiny_model(), make_strategy("full"), cfg)
    result = trainer.fit(tiny_data(32, 0, batch_size=16, shuffle=True), tiny_data(32, 1, batch_size=16, shuffle=False))
    assert len(result.history) < 20


def test_linear_probe_leaves_backbone_bit_identical(tiny_model, tiny_data):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = model.head.weight.clone()
    trainer = Trainer(model, LinearProbe(), TrainConfig(epochs=2, device="cpu"))
    assert [g["name"] for g in trainer.optimizer.param_groups] == ["head"]
    trainer.fit(tiny_data(64, 0, batch_size=16, shuffle=True), tiny_data(32, 1, batch_size=16, shuffle=False))
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, before[key]), key  # weights and BatchNorm statistics
    assert not torch.equal(model.head.weight, head_before)


def test_full_fine_tuning_groups_use_head_multiplier(tiny_model):
    groups = make_strategy("full").param_groups(tiny_model(), TrainConfig(lr=1e-4))
    assert {g["name"]: g["lr"] for g in groups} == {"backbone": 1e-4, "head": pytest.approx(1e-3)}


def test_unknown_strategy_is_named():
    with pytest.raises(ValueError, match="unknown fine-tuning strategy 'lpft'"):
        make_strategy("lpft")


def test_class_weights_inverse_frequency():
    items = [{"label": 0}] * 30 + [{"label": 1}] * 10
    np.testing.assert_allclose(class_weights(items, 2).numpy(), [40 / 60, 40 / 20])


def test_auroc_single_class_is_nan():
    assert np.isnan(auroc_point(np.zeros(4, dtype=int), np.full((4, 2), 0.5)))
