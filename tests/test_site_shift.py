"""Site-shift diagnostics: proxy A-distance, the embedding, and their place in the report."""

import json

import numpy as np
import pytest
import torch

from medtl.adapt import proxy_a_distance, site_shift
from medtl.backbones import create, extract_features
from medtl.report import write_report


def test_proxy_a_distance_is_near_zero_for_one_distribution_and_two_for_separable_sites():
    rng = np.random.default_rng(0)
    same = proxy_a_distance(rng.normal(size=(200, 8)), rng.normal(size=(200, 8)))
    apart = proxy_a_distance(rng.normal(size=(200, 8)), rng.normal(size=(200, 8)) + 3.0)
    middle = proxy_a_distance(rng.normal(size=(200, 8)), rng.normal(size=(200, 8)) + 0.4)
    assert same < 0.3 and apart > 1.9 and same < middle < apart


def test_site_shift_gives_every_pair_and_a_2d_embedding():
    rng = np.random.default_rng(1)
    features = np.concatenate([rng.normal(size=(30, 5)), rng.normal(size=(30, 5)) + 2, rng.normal(size=(4, 5))])
    sites = ["A"] * 30 + ["B"] * 30 + ["C"] * 4
    shift = site_shift(features, sites)
    assert set(shift["proxy_a_distance"]) == {"A vs B", "A vs C", "B vs C"}
    assert shift["proxy_a_distance"]["A vs B"] > 1.5
    assert np.asarray(shift["embedding"]).shape == (64, 2)


def test_extract_features_uses_the_backbone_in_eval_mode():
    model = create("resnet18", weights="none", in_channels=1, spatial_dims=2, num_classes=2)
    model.train()
    batches = [{"image": torch.randn(3, 1, 32, 32)}, {"image": torch.randn(2, 1, 32, 32)}]
    features, labels = extract_features(model, batches)
    assert labels is None
    assert features.shape == (5, model.spec.feature_dim) and model.training
    model.eval()
    with torch.no_grad():
        np.testing.assert_allclose(features[:3], model.forward_features(batches[0]["image"]).numpy(), rtol=1e-5, atol=1e-6)


def test_report_shows_site_shift_before_and_after(tmp_path):
    rng = np.random.default_rng(2)
    n = 120
    y = rng.integers(0, 2, n)
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, n), 0, 1)
    probs = np.column_stack([1 - p, p])
    sites = ["A" if i % 2 else "B" for i in range(n)]
    features = rng.normal(size=(n, 6)) + np.where(np.array(sites) == "A", 2.0, 0.0)[:, None]
    shift = {"before": {**site_shift(features, sites), "label": "pretrained backbone"},
             "after": {**site_shift(features * 0.01 + rng.normal(size=(n, 6)), sites), "label": "trained model"}}
    metrics = write_report(tmp_path, y_true=y, probs_uncalibrated=probs, probs_calibrated=probs, class_names=["no", "yes"],
                           positive_index=1, operating_point=None, groups={"site": sites}, info={}, n_resamples=200,
                           site_shift=shift)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["site_shift"]["before"]["proxy_a_distance"]["A vs B"] == pytest.approx(metrics["site_shift"]["before"]["proxy_a_distance"]["A vs B"])
    assert saved["site_shift"]["before"]["proxy_a_distance"]["A vs B"] > saved["site_shift"]["after"]["proxy_a_distance"]["A vs B"]
    assert (tmp_path / "site_shift.png").is_file()
    html = (tmp_path / "report.html").read_text()
    assert "Site shift" in html and "pretrained backbone" in html
