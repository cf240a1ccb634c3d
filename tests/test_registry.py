"""The registries are the one list of names: a method registered from outside the package (here,
from the test itself) is a config value at once, trains, and round-trips through the bundle."""

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import torch
from scipy.special import softmax
from torch import nn

from helpers import write_small_split
from medtl.backbones import BACKBONES, create, get_spec, register_backbone
from medtl.bundle import load
from medtl.calibrate import CALIBRATORS, Calibrator, calibrator_from_dict, make_calibrator, register_calibrator
from medtl.calibrate.base import param_array
from medtl.config import ConfigError, load_config
from medtl.pipeline import train


class PriorShift(Calibrator):
    """A toy calibrator: ``softmax(z + b)`` with ``b`` moving the mean predicted probability
    onto the (smoothed) class frequencies."""

    method = "toy_prior_shift"

    def _fit(self, logits: np.ndarray, labels: np.ndarray) -> None:
        freq = np.bincount(labels, minlength=logits.shape[1]) + 1.0
        self.bias_ = np.log(freq / freq.sum()) - np.log(softmax(logits, axis=1).mean(0))

    def _transform(self, logits: np.ndarray) -> np.ndarray:
        return softmax(logits + self.bias_, axis=1)

    def _params(self) -> dict[str, Any]:
        return {"bias": self.bias_.tolist()}

    def _load(self, d: Mapping[str, Any], n_classes: int) -> None:
        self.bias_ = param_array(d, "bias", (n_classes,))


@pytest.fixture
def toy_calibrator():
    register_calibrator(PriorShift)
    yield PriorShift
    CALIBRATORS.unregister(PriorShift.method)


def test_a_calibrator_registered_by_the_test_is_a_config_choice(toy_calibrator):
    config = load_config(None, ["calibration.method=toy_prior_shift"])
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(200, 3)), rng.choice(3, 200, p=[0.6, 0.3, 0.1])
    calibrator = make_calibrator(config.calibration.method, 3).fit(logits, labels)
    assert isinstance(calibrator, PriorShift)
    freq = (np.bincount(labels, minlength=3) + 1) / (len(labels) + 3)
    gap = np.abs(calibrator.transform(logits).mean(0) - freq).sum()
    assert gap < 0.5 * np.abs(softmax(logits, axis=1).mean(0) - freq).sum()
    again = calibrator_from_dict(json.loads(json.dumps(calibrator.to_dict())))
    np.testing.assert_array_equal(again.transform(logits), calibrator.transform(logits))


@pytest.mark.slow
def test_a_registered_calibrator_trains_and_lands_in_the_bundle(toy_calibrator, tmp_path):
    manifest = write_small_split(tmp_path, patients_per_site=12, n_train=24, n_val=16)
    config = load_config(None, [f"data.manifest={manifest}", "recipe=none", "model.weights=none", "data.image_size=[32, 32]",
                                "data.num_workers=0", "data.cache=none", "train.epochs=1", "train.batch_size=8",
                                "train.folds=1", "report.bootstrap=100", "calibration.method=toy_prior_shift"])
    outcome = train(config, tmp_path / "run")
    assert outcome.training["calibration"] == "toy_prior_shift"
    predictor = load(outcome.bundle)
    assert isinstance(predictor.calibrator, PriorShift) and predictor.meta["calibration"]["method"] == "toy_prior_shift"


def test_an_unregistered_name_is_refused_with_the_registered_ones(toy_calibrator):
    CALIBRATORS.unregister(PriorShift.method)
    with pytest.raises(ConfigError) as info:
        load_config(None, ["calibration.method=toy_prior_shift"])
    (line,) = str(info.value).splitlines()
    assert line.startswith("--set calibration.method=toy_prior_shift: calibration.method: unknown calibration method")
    assert all(name in line for name in ["auto", *CALIBRATORS])
    with pytest.raises(ValueError, match="already registered"):
        register_calibrator(type("Again", (PriorShift,), {"method": "platt"}))


def test_a_backbone_registered_with_a_builder_is_created_and_configurable():
    def tiny(spec, in_channels: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))

    register_backbone("toy_cnn", 2, builder=tiny, family="toy", feature_dim=4, stem="0", classifier="3", cam_layer="0",
                      input_size=32)
    try:
        assert load_config(None, ["model.backbone=toy_cnn"]).model.backbone == "toy_cnn"
        model = create("toy_cnn", in_channels=1, num_classes=3)
        assert model(torch.rand(2, 1, 32, 32)).shape == (2, 3) and get_spec("toy_cnn").spatial_dims == (2,)
        with pytest.raises(ConfigError, match="not built in 3D"):
            load_config(None, ["model.backbone=toy_cnn", "data.spatial_dims=3"])
    finally:
        BACKBONES.unregister("toy_cnn")
    with pytest.raises(ConfigError, match="unknown backbone 'toy_cnn'"):
        load_config(None, ["model.backbone=toy_cnn"])
