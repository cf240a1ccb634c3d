"""Applying a weight source's input recipe to a batch, and catching a batch that does not follow it.

The recipe is :func:`~medtl.backbones.preprocessing_for`'s dict; images arrive scaled to [0, 1]
(after the intensity preset).  :func:`check_batch` looks at the first batch that reaches the
network: [0, 1] images fed to a [-1024, 1024] model, or 0-255 images fed to an ImageNet model,
would otherwise train without complaint and transfer nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def _per_channel(values: Any, x: torch.Tensor) -> torch.Tensor:
    """Scalars or one value per channel, shaped to broadcast over (B, C, *spatial)."""
    tensor = torch.as_tensor(values, dtype=x.dtype, device=x.device).reshape(-1)
    return tensor.reshape(1, -1, *([1] * (x.dim() - 2)))


def normalize(x: torch.Tensor, recipe: Mapping[str, Any]) -> torch.Tensor:
    """A (B, C, *spatial) batch of [0, 1] images normalised as the recipe says."""
    kind = recipe.get("kind", "range" if "range" in recipe else "mean_std")
    if kind == "range":
        lo, hi = recipe["range"]
        return lo + x * (hi - lo)
    if kind == "zscore":  # each image over its non-zero voxels; the background stays 0
        flat = x.reshape(x.shape[0], -1)
        mask = flat != 0
        count = mask.sum(1, keepdim=True).clamp(min=1)
        mean = (flat * mask).sum(1, keepdim=True) / count
        std = (((flat - mean) * mask) ** 2).sum(1, keepdim=True).div(count).sqrt().clamp(min=1e-8)
        return torch.where(mask, (flat - mean) / std, flat).reshape(x.shape)
    return (x - _per_channel(recipe["mean"], x)) / _per_channel(recipe["std"], x)


def expected_interval(recipe: Mapping[str, Any]) -> tuple[float, float]:
    """Where [0, 1] images land after ``recipe`` (zscore: a generous [-5, 5])."""
    kind = recipe.get("kind", "range" if "range" in recipe else "mean_std")
    if kind == "range":
        lo, hi = recipe["range"]
        return float(lo), float(hi)
    if kind == "zscore":
        return -5.0, 5.0
    mean = torch.as_tensor(recipe["mean"], dtype=torch.float64).reshape(-1)
    std = torch.as_tensor(recipe["std"], dtype=torch.float64).reshape(-1)
    return float(((0 - mean) / std).min()), float(((1 - mean) / std).max())


def check_batch(x: torch.Tensor, recipe: Mapping[str, Any]) -> str | None:
    """A warning when batch ``x`` (as fed to the network) does not look normalised by ``recipe``.

    The expected interval is where [0, 1] images land after the recipe; the batch is flagged when
    it reaches more than half that span beyond it, or covers less than 2 % of it.
    """
    lo, hi = expected_interval(recipe)
    span = hi - lo
    found_lo, found_hi = float(x.min()), float(x.max())
    if found_lo < lo - span / 2 or found_hi > hi + span / 2 or found_hi - found_lo < 0.02 * span:
        return (
            f"the first batch spans [{found_lo:.4g}, {found_hi:.4g}] but the {recipe.get('source', '?')} weights "
            f"expect about [{lo:.4g}, {hi:.4g}] ({recipe.get('kind', 'mean_std')} normalisation); check that the "
            "images are scaled to [0, 1] and normalised with the weights' recipe"
        )
    return None
