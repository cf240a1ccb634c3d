"""Exact resume from checkpoints, atomic checkpoint files, and the loop's options (precision,
accumulation, activation checkpointing) that a resumed or distributed run relies on."""

import copy
import csv
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from helpers import TinyClassifier, tiny_loader, write_small_split
from medtl.adapt import make_domain_loss, make_strategy
from medtl.cli import main
from medtl.config import Config, TrainConfig, dump_config
from medtl.pipeline import train
from medtl.train import Trainer
from medtl.train import checkpoint as ckpt
from medtl.train import trainer as trainer_module
from medtl.train.memory import checkpoint_blocks
from medtl.train.precision import resolve_amp

CONFIG = (
    "data:\n  manifest: small.csv\n  image_size: [32, 32]\n  num_workers: 0\n  augment: true\n"
    "model:\n  backbone: resnet18\n  weights: none\n"
    "train:\n  epochs: 3\n  batch_size: 16\n  lr: 0.001\n  head_lr: 0.001\n  patience: 5\n  folds: 1\n"
    "report:\n  bootstrap: 100\n"
)


class Killed(Exception):
    """Stands for the job being pre-empted."""


@pytest.fixture
def one_thread():
    """One intra-op thread: on a loaded 2-core machine several threads mostly wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    write_small_split(root, patients_per_site=25, n_train=32, n_val=16)
    (root / "run.yaml").write_text(CONFIG)
    return root


def _without_timing(path):
    return [{k: v for k, v in row.items() if k not in ("seconds", "images_per_s")} for row in csv.DictReader(open(path))]


def _spy_on_states(monkeypatch) -> dict:
    """The model and optimizer state as each checkpoint is taken (the last, written when training
    has finished, keeps only the chosen weights, so the spy sees what the file no longer holds)."""
    seen: dict = {}
    real_state = trainer_module.Trainer._state

    def state(self, progress):
        seen["model"] = {k: v.clone() for k, v in self.model.state_dict().items()}
        seen["optimizer"] = copy.deepcopy(self.optimizer.state_dict()["state"])
        return real_state(self, progress)

    monkeypatch.setattr(trainer_module.Trainer, "_state", state)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_interrupted_then_resumed_run_is_bit_identical(small_data, monkeypatch, one_thread, workers):
    """3 epochs straight vs killed after epoch 2 and resumed, random augmentation on."""
    config = [str(small_data / "run.yaml"), "--set", f"data.num_workers={workers}", "--threads", "1"]
    straight, resumed = small_data / f"straight{workers}", small_data / f"resumed{workers}"
    last_a = _spy_on_states(monkeypatch)
    assert main(["train", *config, "--out", str(straight)]) == 0
    monkeypatch.undo()

    real_save = trainer_module.save_checkpoint

    def save_then_die(state, path):
        real_save(state, path)
        if state["epoch"] == 2:
            raise Killed

    monkeypatch.setattr(trainer_module, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        main(["train", *config, "--out", str(resumed)])
    monkeypatch.undo()
    assert not (resumed / "bundle").exists() and len(_without_timing(resumed / "train_log.csv")) == 2
    last_b = _spy_on_states(monkeypatch)
    assert main(["train", *config, "--resume", str(resumed)]) == 0

    final_a, final_b = load_file(straight / "bundle" / "model.safetensors"), load_file(resumed / "bundle" / "model.safetensors")
    assert final_a.keys() == final_b.keys()
    for key in final_a:
        assert torch.equal(final_a[key], final_b[key]), key
    for key in last_a["model"]:  # the last epoch's weights and BatchNorm statistics, not only the best
        assert torch.equal(last_a["model"][key], last_b["model"][key]), key
    for a, b in zip(last_a["optimizer"].values(), last_b["optimizer"].values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert _without_timing(straight / "train_log.csv") == _without_timing(resumed / "train_log.csv")


def test_finished_run_keeps_a_slim_checkpoint_that_resumes_without_training(tmp_path):
    """Once training ends the checkpoint keeps the chosen weights and the result, not the optimizer's
    moments: a resumed finished run trains nothing, and asking it for more epochs says why it cannot."""
    straight = _fit_dann(tmp_path, 2)
    state = ckpt.load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["finished"] and not {"optimizer", "best_state", "domain"} & state.keys()
    for key, value in straight.model.state_dict().items():  # the restored best epoch
        assert torch.equal(state["model"][key], value), key
    again = _fit_dann(tmp_path, 2, resume=True)
    for key, value in straight.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[key], value), key
    with pytest.raises(ValueError, match="training finished after epoch 2 .* cannot go on to epoch 3"):
        _fit_dann(tmp_path, 3, resume=True)


def test_resume_refuses_another_config_or_a_missing_checkpoint(tmp_path, small_data):
    run = tmp_path / "run"
    run.mkdir()
    config = Config.model_validate({"recipe": "none", "data": {"manifest": small_data / "small.csv"}})
    (run / "config.yaml").write_text(dump_config(config))
    with pytest.raises(FileNotFoundError, match="checkpoint.pt does not exist"):
        train(config, run, resume=True)
    (run / "checkpoint.pt").write_bytes(b"")
    changed = config.model_copy(update={"train": TrainConfig(epochs=20)})
    with pytest.raises(ValueError, match="differs from the run's config.yaml in train.epochs"):
        train(changed, run, resume=True)


def test_checkpoint_killed_mid_write_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    ckpt.save_checkpoint({"epoch": 1, "w": torch.ones(1000), "rng": ckpt.rng_state()}, path)
    real_save = torch.save

    def half_write(obj, handle):
        real_save(obj, handle)
        handle.truncate(handle.tell() // 2)
        raise Killed

    monkeypatch.setattr(ckpt.torch, "save", half_write)
    with pytest.raises(Killed):
        ckpt.save_checkpoint({"epoch": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    state = ckpt.load_checkpoint(path)  # weights_only=True: tensors and plain values only
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(1000))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left behind
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable medtl checkpoint"):
        ckpt.load_checkpoint(path)


def test_rng_state_round_trips():
    state = ckpt.rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.set_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and (first[1] == again[1]).all() and first[2] == again[2]


# -- the loop's options, on a tiny in-memory problem -----------------------------------------

def _fit_dann(tmp_path, epochs: int, resume: bool = False, kill_after: int | None = None, monkeypatch=None):
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=epochs, lr=1e-2, head_lr=1e-2, patience=9, device="cpu", amp="bf16", accumulate=2, batch_size=16)
    domain = make_domain_loss("dann", 8, 2)
    trainer = Trainer(TinyClassifier(), make_strategy("full"), cfg, domain=domain)
    if kill_after is not None:
        real_save = trainer_module.save_checkpoint

        def save_then_die(state, path):
            real_save(state, path)
            if state["epoch"] == kill_after:
                raise Killed

        monkeypatch.setattr(trainer_module, "save_checkpoint", save_then_die)
    trainer.fit(tiny_loader(64, 0, batch_size=8), tiny_loader(32, 1, batch_size=16, shuffle=False), target_loader=tiny_loader(48, 2, batch_size=8),
                checkpoint=tmp_path / "checkpoint.pt", resume=resume)
    return trainer


def test_resume_exact_with_domain_loss_bf16_and_accumulation(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = _fit_dann(tmp_path / "a", 3)
    with pytest.raises(Killed):
        _fit_dann(tmp_path / "b", 3, kill_after=2, monkeypatch=monkeypatch)
    monkeypatch.undo()
    resumed = _fit_dann(tmp_path / "b", 3, resume=True)
    for (key, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    for a, b in zip(straight.domain.state_dict().values(), resumed.domain.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_accumulation_matches_one_large_batch():
    models = []
    for accumulate, micro in ((1, 16), (2, 8)):
        torch.manual_seed(0)
        cfg = TrainConfig(epochs=1, lr=1e-2, head_lr=1e-2, device="cpu", accumulate=accumulate, amp="none")
        trainer = Trainer(TinyClassifier(norm=False), make_strategy("full"), cfg)
        trainer.fit(tiny_loader(32, 0, batch_size=micro), tiny_loader(16, 1, batch_size=16, shuffle=False))
        models.append(trainer.model.state_dict())
    for key in models[0]:
        torch.testing.assert_close(models[0][key], models[1][key], rtol=1e-5, atol=1e-6)


def test_bf16_and_channels_last_train_on_cpu():
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=4, lr=3e-3, device="cpu", amp="bf16", channels_last=True, patience=4)
    trainer = Trainer(TinyClassifier(), make_strategy("full"), cfg)
    assert trainer.amp_dtype is torch.bfloat16
    assert trainer.model.backbone[0].weight.is_contiguous(memory_format=torch.channels_last)
    result = trainer.fit(tiny_loader(128, 0, batch_size=16), tiny_loader(64, 1, batch_size=16, shuffle=False))
    assert result.best_auroc > 0.9


def test_amp_choices():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_amp("auto", cpu) is None and resolve_amp("none", gpu) is None
    assert resolve_amp("bf16", cpu) is torch.bfloat16
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        resolve_amp("fp16", cpu)


def test_activation_checkpointing_same_gradients_and_statistics_counted_once():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.Sequential(nn.Conv3d(4, 4, 3), nn.BatchNorm3d(4)))
    wrapped = copy.deepcopy(plain)
    assert checkpoint_blocks(wrapped) > 0
    x = torch.randn(2, 1, 6, 6, 6)
    for model in (plain, wrapped):
        model.train()
        model(x).square().mean().backward()
    for (key, a), b in zip(plain.state_dict().items(), wrapped.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=key)  # running statistics and counters too
    for a, b in zip(plain.parameters(), wrapped.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
