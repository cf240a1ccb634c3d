"""LogME (checked against a direct dense computation), backbone ranking, and the input checks."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from medtl.backbones import check_batch, logme, normalize, parse_candidates, preprocessing_for, rank_backbones


def _dense_logme(f: np.ndarray, y: np.ndarray) -> float:
    """LogME straight from the definitions, with D x D matrices (independent of the SVD path)."""
    n, d = f.shape
    eig = np.linalg.eigvalsh(f.T @ f)
    scores = []
    for label in np.unique(y):
        t = (y == label).astype(np.float64)
        alpha, beta = 1.0, 1.0
        for _ in range(100):
            a = alpha * np.eye(d) + beta * f.T @ f
            m = beta * np.linalg.solve(a, f.T @ t)
            gamma = float((beta * eig / (alpha + beta * eig)).sum())
            new_alpha, new_beta = gamma / (m @ m), (n - gamma) / np.sum((f @ m - t) ** 2)
            done = abs(new_alpha / new_beta - alpha / beta) <= 1e-5 * alpha / beta
            alpha, beta = new_alpha, new_beta
            if done:
                break
        a = alpha * np.eye(d) + beta * f.T @ f
        m = beta * np.linalg.solve(a, f.T @ t)
        evidence = (n / 2 * math.log(beta) + d / 2 * math.log(alpha) - n / 2 * math.log(2 * math.pi)
                    - beta / 2 * np.sum((f @ m - t) ** 2) - alpha / 2 * (m @ m) - np.linalg.slogdet(a)[1] / 2)
        scores.append(evidence / n)
    return float(np.mean(scores))


@pytest.mark.parametrize("n,d,rank", [(200, 16, 16), (30, 64, 8)])  # more samples than features, and fewer
def test_logme_matches_the_dense_definition(n, d, rank):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, n)
    latent = rng.normal(size=(n, rank)) + labels[:, None] * rng.normal(size=rank)
    features = latent @ rng.normal(size=(rank, d))  # deep features are far from full rank
    assert logme(features, labels) == pytest.approx(_dense_logme(features, labels), rel=1e-6, abs=1e-9)


def test_logme_when_features_fit_the_labels_exactly():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 12)
    score = logme(rng.normal(size=(12, 40)), labels)  # 40 generic features, 12 samples
    assert np.isfinite(score)


def test_informative_features_score_higher_than_noise():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 400)
    noise = rng.normal(size=(400, 32))
    weak = noise + 0.5 * labels[:, None] * rng.normal(size=32)
    strong = noise + 2.0 * labels[:, None] * rng.normal(size=32)
    assert logme(strong, labels) > logme(weak, labels) > logme(noise, labels)
    with pytest.raises(ValueError, match="at least two classes"):
        logme(noise, np.zeros(400))


def test_rank_backbones_from_arrays_and_batches(tmp_path, caplog):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "rn18.pth")
    rng = np.random.default_rng(2)
    labels = np.repeat([0, 1], 12)
    images = rng.random((24, 1, 32, 32)).astype(np.float32)
    images[labels == 1, :, 8:24, 8:24] += 0.5  # a bright square marks class 1
    images = np.clip(images, 0, 1)
    candidates = parse_candidates(f"resnet18@{tmp_path / 'rn18.pth'}, mobilenet_v3_large", "none")
    assert candidates == [("resnet18", str(tmp_path / "rn18.pth")), ("mobilenet_v3_large", "none")]
    ranked = rank_backbones(candidates, (images, labels), batch_size=8)
    assert [r.logme for r in ranked] == sorted((r.logme for r in ranked), reverse=True)
    assert {r.backbone for r in ranked} == {"resnet18", "mobilenet_v3_large"}
    assert all(r.samples == 24 and np.isfinite(r.logme) for r in ranked)

    def batches():
        for start in range(0, 24, 5):
            yield torch.from_numpy(images[start:start + 5]), torch.from_numpy(labels[start:start + 5])

    again = rank_backbones(candidates[:1], batches)
    by_name = {r.backbone: r.logme for r in ranked}
    assert again[0].logme == pytest.approx(by_name["resnet18"], rel=1e-4)

    with caplog.at_level(logging.WARNING, logger="medtl.backbones"):
        rank_backbones(candidates[:1], (images * 1000, labels))  # not scaled to [0, 1]
    assert "the first batch spans" in caplog.text


def test_normalize_and_check_batch():
    x = torch.rand(2, 3, 8, 8)
    imagenet3 = preprocessing_for("resnet18", "imagenet", in_channels=3)
    out = normalize(x, imagenet3)
    torch.testing.assert_close(out[:, 1], (x[:, 1] - 0.456) / 0.224)
    assert check_batch(out, imagenet3) is None
    assert "expect about" in check_batch(x * 255, imagenet3)

    xrv = preprocessing_for("densenet121", "torchxrayvision")
    grey = torch.rand(2, 1, 8, 8)
    assert normalize(grey, xrv).min() >= -1024 and normalize(grey, xrv).max() <= 1024
    assert check_batch(normalize(grey, xrv), xrv) is None
    assert "torchxrayvision weights expect about [-1024, 1024]" in check_batch(grey, xrv)

    volume = torch.zeros(1, 1, 4, 4, 4)
    volume[..., 1:3, 1:3, 1:3] = torch.rand(2, 2, 2) + 1
    z = normalize(volume, {"source": "medicalnet", "kind": "zscore"})
    inside = z[volume != 0]
    assert torch.all(z[volume == 0] == 0)
    assert inside.mean().abs() < 1e-5 and (inside.std(unbiased=False) - 1).abs() < 1e-4


SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


@pytest.mark.shared_data
def test_logme_on_real_chest_xrays():
    """On PneumoniaMNIST, raw pixels carry the label: far more evidence than with shuffled labels."""
    archive = SHARED / "pneumoniamnist" / "pneumoniamnist_trainval_28.npz"
    if not archive.is_file():
        pytest.skip(f"real data not available ({archive})")
    data = np.load(archive)
    pick = np.random.default_rng(0).permutation(len(data["train_labels"]))[:1500]
    pixels = data["train_images"][pick].reshape(1500, -1) / 255.0
    labels = data["train_labels"][pick, 0]
    shuffled = np.random.default_rng(1).permutation(labels)
    assert logme(pixels, labels) > logme(pixels, shuffled) + 0.3
