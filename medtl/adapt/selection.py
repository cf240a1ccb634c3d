"""Label-free scores of a model on unlabelled target scans, for model selection (higher is better).

- ``im``: information maximisation, ``H(mean p) - mean H(p)`` (Shi & Sha 2012; SHOT): confident
  predictions that still use every class.
- ``entropy``: ``-mean H(p)``, confidence alone (collapses to one class are not penalised).
- ``snd``: soft neighbourhood density (Saito et al. 2021): the entropy of each scan's softmax
  similarity distribution (temperature 0.05) over the other scans, on the L2-normalised class
  probabilities as in the paper; high when target predictions form dense clusters.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SCORES = ("im", "entropy", "snd")


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1)


def information_maximization(logits: torch.Tensor) -> float:
    """``H(mean p) - mean H(p)`` in nats."""
    p = F.softmax(logits.double(), dim=1)
    return float(_entropy(p.mean(0)) - _entropy(p).mean())


def negative_entropy(logits: torch.Tensor) -> float:
    """``-mean H(p)`` in nats."""
    return float(-_entropy(F.softmax(logits.double(), dim=1)).mean())


def soft_neighborhood_density(logits: torch.Tensor, temperature: float = 0.05) -> float:
    """SND: mean entropy of each row's softmax over its cosine similarities to the other rows."""
    z = F.normalize(F.softmax(logits.double(), dim=1), dim=1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(-torch.inf)
    return float(_entropy(F.softmax(sim, dim=1)).mean())


def target_scores(logits: np.ndarray | torch.Tensor) -> dict[str, float]:
    """Every label-free score of the target ``logits``, keyed ``target_im``, ``target_entropy``,
    ``target_snd`` (the per-epoch log's columns)."""
    t = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    return {
        "target_im": information_maximization(t),
        "target_entropy": negative_entropy(t),
        "target_snd": soft_neighborhood_density(t),
    }
