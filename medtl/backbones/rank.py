"""Ranking backbones before fine-tuning: LogME on frozen features of the labelled training set.

LogME (You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer Learning",
ICML 2021) is the log marginal likelihood, per sample, of a Bayesian linear model from the
features to each one-hot label column, with its prior precision alpha and noise precision beta
set by evidence maximisation (MacKay's fixed point).  Higher is better; it needs one forward pass
per backbone and no training, and tracks fine-tuned accuracy across backbones.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from medtl.backbones.inputs import check_batch, normalize
from medtl.backbones.model import create, extract_features

log = logging.getLogger("medtl.backbones")

Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


def _evidence(s: np.ndarray, z: np.ndarray, y_norm2: float, n: int, d: int, tol: float, max_iter: int) -> float:
    """Maximised log evidence of y = F w + noise, from F's singular values ``s`` and z = U^T y.

    In F's singular basis the posterior mean is m_i = beta s_i z_i / (alpha + beta s_i^2) and the
    residual is alpha z_i / (alpha + beta s_i^2) plus the part of y outside F's column space.
    When the features can fit y exactly (as many independent features as samples), the
    evidence only approaches its supremum as beta grows; the iteration stops where the fit
    has used up the samples' degrees of freedom to machine precision.
    """
    sigma = s**2
    outside = max(y_norm2 - float(z @ z), 0.0)
    alpha, beta = 1.0, 1.0
    for _ in range(max_iter):
        denom = alpha + beta * sigma
        gamma = float((beta * sigma / denom).sum())
        m2 = float(((beta * s * z / denom) ** 2).sum())
        residual = float(((alpha * z / denom) ** 2).sum()) + outside
        if n - gamma <= 1e-9 * n or residual <= 1e-300 or m2 <= 1e-300:
            break
        new_alpha, new_beta = gamma / m2, (n - gamma) / residual
        converged = abs(new_alpha / new_beta - alpha / beta) <= tol * (alpha / beta)
        alpha, beta = new_alpha, new_beta
        if converged:
            break
    denom = alpha + beta * sigma
    m2 = float(((beta * s * z / denom) ** 2).sum())
    residual = float(((alpha * z / denom) ** 2).sum()) + outside
    log_det = float(np.log(denom).sum()) + (d - len(s)) * math.log(alpha)
    return (
        n / 2 * math.log(beta)
        + d / 2 * math.log(alpha)
        - n / 2 * math.log(2 * math.pi)
        - beta / 2 * residual
        - alpha / 2 * m2
        - log_det / 2
    )


def logme(features: np.ndarray, labels: np.ndarray, *, tol: float = 1e-5, max_iter: int = 100) -> float:
    """LogME score of ``features`` (N, F) for class ``labels`` (N,): mean over classes of the
    per-sample log evidence of a linear model to that class's one-hot column (float64)."""
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).reshape(-1)
    if f.ndim != 2 or len(f) != len(y):
        raise ValueError(f"features must be (N, F) and labels (N,), got {f.shape} and {y.shape}")
    classes = np.unique(y)
    if len(classes) < 2:
        raise ValueError("LogME needs at least two classes in the labels")
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    scores = []
    for label in classes:
        target = (y == label).astype(np.float64)
        scores.append(_evidence(s, u.T @ target, float(target @ target), n, d, tol, max_iter) / n)
    return float(np.mean(scores))


@dataclass(frozen=True)
class BackboneScore:
    """One backbone's LogME on the task, with what it cost to compute."""

    backbone: str
    weights: str
    logme: float
    feature_dim: int
    samples: int
    seconds: float


def parse_candidates(text: str, default_weights: str) -> list[tuple[str, str]]:
    """``"resnet18,densenet121@torchxrayvision"`` -> [(name, weights), ...]."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, weights = item.partition("@")
        pairs.append((name, weights or default_weights))
    return pairs


def _as_batches(data: Batches | tuple[np.ndarray, np.ndarray], batch_size: int) -> Batches:
    if callable(data):
        return data
    images, labels = (torch.as_tensor(np.asarray(a)) for a in data)

    def batches() -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(images), batch_size):
            yield images[start : start + batch_size], labels[start : start + batch_size]

    return batches


def frozen_features(model: torch.nn.Module, batches: Batches, recipe: dict, device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Pooled features (float64) and labels of every batch, images normalised with the weights' ``recipe``."""
    model.to(device)

    def normalised() -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        for i, (images, targets) in enumerate(batches()):
            x = normalize(images.to(device=device, dtype=torch.float32), recipe)
            if i == 0 and (warning := check_batch(x, recipe)):
                log.warning("%s", warning)
            yield x, targets

    features, labels = extract_features(model, normalised(), device)
    return features.astype(np.float64), labels


def rank_backbones(
    candidates: Sequence[tuple[str, str]],
    data: Batches | tuple[np.ndarray, np.ndarray],
    *,
    in_channels: int = 1,
    spatial_dims: int = 2,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    allow_mismatch: bool = False,
    inflation: str = "mean",
) -> list[BackboneScore]:
    """LogME of each (backbone, weights) candidate on a labelled set, best first.

    ``data`` is a callable returning an iterable of (images, labels) batches, or arrays
    (images (N, C, *spatial), labels (N,)); images are scaled to [0, 1] and each backbone's own
    normalisation is applied here, so one data source serves every candidate.
    """
    scores = []
    batches = _as_batches(data, batch_size)
    for name, weights in candidates:
        start = time.perf_counter()
        model = create(name, weights=weights, in_channels=in_channels, spatial_dims=spatial_dims, allow_mismatch=allow_mismatch,
                       inflation=inflation)
        try:
            features, labels = frozen_features(model, batches, model.preprocessing, device)
        except RuntimeError as err:
            raise ValueError(
                f"{name}@{weights} cannot run on these inputs ({str(err).splitlines()[0]}); the backbone's default "
                f"input size is {model.spec.default_input_size}: raise data.image_size or leave this candidate out"
            ) from err
        score = logme(features, labels)
        scores.append(BackboneScore(name, weights, score, model.feature_dim, len(labels), time.perf_counter() - start))
        log.info("LogME %s (%s): %.4f", name, weights, score)
    return sorted(scores, key=lambda item: item.logme, reverse=True)
