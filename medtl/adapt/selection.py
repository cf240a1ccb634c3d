"""Label-free scores of a model on unlabelled target scans, for model selection (higher is better).

- ``im``: information maximisation, ``H(mean p) - mean H(p)`` (Shi & Sha 2012; SHOT): confident
  predictions that still use every class.
- ``entropy``: ``-mean H(p)``, confidence alone (collapses to one class are not penalised).
- ``snd``: soft neighbourhood density (Saito et al. 2021): the entropy of each scan's softmax
  similarity distribution (temperature 0.05) over the other scans, on the L2-normalised class
  probabilities as in the paper; high when target predictions form dense clusters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from medtl.adapt.domain import entropy
from medtl.registry import SCORES

_F = TypeVar("_F", bound=Callable)


def register_score(name: str) -> Callable[[_F], _F]:
    """Decorator: make ``score(logits) -> float`` (higher is better) an ``adapt.selection`` score,
    logged every epoch as ``target_<name>``."""
    return SCORES.register(name)


@register_score("im")
def information_maximization(logits: torch.Tensor) -> float:
    """``H(mean p) - mean H(p)`` in nats."""
    log_p = F.log_softmax(logits.double(), dim=1)
    return float(entropy(log_p.exp().mean(0).log()) - entropy(log_p).mean())


@register_score("entropy")
def negative_entropy(logits: torch.Tensor) -> float:
    """``-mean H(p)`` in nats."""
    return float(-entropy(F.log_softmax(logits.double(), dim=1)).mean())


@register_score("snd")
def soft_neighborhood_density(logits: torch.Tensor, temperature: float = 0.05) -> float:
    """SND: mean entropy of each row's softmax over its cosine similarities to the other rows."""
    z = F.normalize(F.softmax(logits.double(), dim=1), dim=1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(-torch.inf)
    return float(entropy(F.log_softmax(sim, dim=1)).mean())


def target_scores(logits: np.ndarray | torch.Tensor) -> dict[str, float]:
    """Every registered label-free score of the target ``logits``, keyed ``target_<name>``
    (``target_im``, ``target_entropy``, ``target_snd``: the per-epoch log's columns)."""
    t = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    return {f"target_{name}": score(t) for name, score in SCORES.items()}
