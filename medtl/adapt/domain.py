"""Domain-adaptation losses: small modules beside the classifier, acting on pooled features and
logits, so they serve 2D and 3D backbones alike (in the style of TLlib, Jiang et al.).

- :class:`DomainAdversarialLoss` (DANN, Ganin et al. 2016): a discriminator over N sites learns
  to tell features apart through a :class:`GradientReverseLayer`, so the backbone learns
  features it cannot tell apart.
- :class:`ConditionalDomainAdversarialLoss` (CDAN, Long et al. 2018): the discriminator sees the
  outer product of features and class predictions; with entropy conditioning (CDAN+E) confident
  examples count more.
- :class:`CoralLoss` (Deep CORAL, Sun & Saenko 2016): match feature means and covariances.
- :class:`MultiKernelMMDLoss` (DAN, Long et al. 2015): maximum mean discrepancy under a family
  of Gaussian kernels.

:func:`make_domain_loss` builds the configured one as a :class:`DomainTerm`, which takes one
source and one target batch and returns the loss the trainer adds.  Every registered domain loss
shares one call, ``loss(f_s, f_t, logits_s, logits_t)`` (source and target features and
logits); the adversarial ones see the two batches as sites 0 and 1 (:class:`TwoSites`).  A new
one is a builder decorated with ``@register_domain_loss(name)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medtl.registry import DOMAIN_LOSSES

DomainLossBuilder = Callable[..., nn.Module]


def register_domain_loss(name: str) -> Callable[[DomainLossBuilder], DomainLossBuilder]:
    """Decorator: make ``builder(feature_dim, num_classes, **options) -> module`` an ``adapt.domain``
    loss; the module is called as ``loss(f_s, f_t, logits_s, logits_t)``.  Options it does not use
    it ignores (``**_``)."""
    return DOMAIN_LOSSES.register(name)


def entropy(log_p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy (nats) of distributions given as log-probabilities along ``dim``; entries of
    probability zero (``-inf``) count zero, with a zero gradient."""
    p = log_p.exp()
    return -(p * log_p.masked_fill(p == 0, 0.0)).sum(dim)


class GradientReverseFunction(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``-coeff``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, coeff: float) -> torch.Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.coeff * grad, None


def reverse_gradient(x: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
    """``x`` unchanged, with its gradient flipped and scaled by ``coeff`` on the way back."""
    return GradientReverseFunction.apply(x, coeff)


def dann_coefficient(progress: float, gamma: float = 10.0) -> float:
    """DANN's reversal schedule ``2 / (1 + exp(-gamma p)) - 1``: 0 at the start of training
    (``p = 0``), rising towards 1, so the noisy early discriminator does not disturb the features."""
    return 2.0 / (1.0 + math.exp(-gamma * min(max(progress, 0.0), 1.0))) - 1.0


class GradientReverseLayer(nn.Module):
    """:func:`reverse_gradient` as a layer; ``coeff`` is ``max_coeff * dann_coefficient(progress)``
    once :meth:`set_progress` is called, else ``max_coeff``."""

    def __init__(self, max_coeff: float = 1.0, gamma: float = 10.0) -> None:
        super().__init__()
        self.max_coeff, self.gamma, self.coeff = max_coeff, gamma, max_coeff

    def set_progress(self, progress: float) -> None:
        """``progress``: the share of training done, in [0, 1]."""
        self.coeff = self.max_coeff * dann_coefficient(progress, self.gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reverse_gradient(x, self.coeff)


class DomainDiscriminator(nn.Sequential):
    """Two hidden layers (Linear-BatchNorm-ReLU) and one logit per domain, as in TLlib."""

    def __init__(self, in_features: int, num_domains: int = 2, hidden: int = 256) -> None:
        super().__init__(
            nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, num_domains),
        )


class DomainAdversarialLoss(nn.Module):
    """DANN: cross-entropy of a site discriminator on gradient-reversed features, over N sites.

    ``forward(features, domains)`` with ``domains`` the site index of each row;
    ``domain_accuracy`` is the discriminator's accuracy on the last batch (0.5 for two balanced
    sites means the features no longer tell the sites apart)."""

    def __init__(self, feature_dim: int, num_domains: int = 2, hidden: int = 256, max_coeff: float = 1.0) -> None:
        super().__init__()
        self.grl = GradientReverseLayer(max_coeff)
        self.discriminator = DomainDiscriminator(feature_dim, num_domains, hidden)
        self.domain_accuracy = float("nan")

    def set_progress(self, progress: float) -> None:
        self.grl.set_progress(progress)

    def forward(self, features: torch.Tensor, domains: torch.Tensor, logits: torch.Tensor | None = None,
                weights: torch.Tensor | None = None) -> torch.Tensor:
        """``logits`` (the classifier's) are not used: DANN aligns features alone."""
        site_logits = self.discriminator(self.grl(features))
        self.domain_accuracy = float((site_logits.argmax(1) == domains).float().mean())
        loss = F.cross_entropy(site_logits, domains, reduction="none")
        if weights is None:
            return loss.mean()
        return (loss * weights).sum() / weights.sum()


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of the softmax of each row."""
    return entropy(F.log_softmax(logits, dim=1), dim=1)


class ConditionalDomainAdversarialLoss(nn.Module):
    """CDAN: the discriminator sees ``features (x) softmax(logits)`` (outer product, flattened;
    a fixed random multilinear map of size ``randomized_dim`` when that product is larger).

    With ``entropy_conditioning`` each example is weighted by ``1 + exp(-H(p))``, normalised
    within its site so sites weigh the same."""

    def __init__(self, feature_dim: int, num_classes: int, num_domains: int = 2, *, entropy_conditioning: bool = True,
                 randomized_dim: int = 1024, hidden: int = 256, max_coeff: float = 1.0) -> None:
        super().__init__()
        self.entropy_conditioning = entropy_conditioning
        self.randomized = feature_dim * num_classes > randomized_dim
        if self.randomized:
            generator = torch.Generator().manual_seed(0)
            self.register_buffer("rf", torch.randn(feature_dim, randomized_dim, generator=generator))
            self.register_buffer("rg", torch.randn(num_classes, randomized_dim, generator=generator))
        in_features = randomized_dim if self.randomized else feature_dim * num_classes
        self.adversarial = DomainAdversarialLoss(in_features, num_domains, hidden, max_coeff)

    def set_progress(self, progress: float) -> None:
        self.adversarial.set_progress(progress)

    @property
    def domain_accuracy(self) -> float:
        return self.adversarial.domain_accuracy

    def _map(self, features: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        if self.randomized:
            return (features @ self.rf) * (probs @ self.rg) / math.sqrt(self.rf.shape[1])
        return torch.bmm(probs.unsqueeze(2), features.unsqueeze(1)).flatten(1)

    def forward(self, features: torch.Tensor, domains: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(logits, dim=1).detach()
        weights = None
        if self.entropy_conditioning:
            weights = 1.0 + torch.exp(-prediction_entropy(logits.detach()))
            for d in domains.unique():
                mask = domains == d
                weights[mask] = weights[mask] / weights[mask].sum()
        return self.adversarial(self._map(features, probs), domains, weights=weights)


class CoralLoss(nn.Module):
    """Deep CORAL with TLlib's mean term: mean squared difference of the feature means plus that
    of the covariance matrices.  Exactly zero for identical batches."""

    def forward(self, source: torch.Tensor, target: torch.Tensor, logits_s: Any = None, logits_t: Any = None) -> torch.Tensor:
        mean_s, mean_t = source.mean(0, keepdim=True), target.mean(0, keepdim=True)
        cov_s = (source - mean_s).T @ (source - mean_s) / max(len(source) - 1, 1)
        cov_t = (target - mean_t).T @ (target - mean_t) / max(len(target) - 1, 1)
        return (mean_s - mean_t).pow(2).mean() + (cov_s - cov_t).pow(2).mean()


class MultiKernelMMDLoss(nn.Module):
    """Squared MMD (biased estimate) under the sum of Gaussian kernels whose bandwidths are
    ``alphas`` times the mean squared pairwise distance of the joint batch (DAN's heuristic).
    Batches may differ in size; identical batches give exactly zero."""

    def __init__(self, alphas: Sequence[float] = (0.125, 0.25, 0.5, 1.0, 2.0)) -> None:
        super().__init__()
        self.alphas = tuple(alphas)

    def forward(self, source: torch.Tensor, target: torch.Tensor, logits_s: Any = None, logits_t: Any = None) -> torch.Tensor:
        joint = torch.cat([source, target])
        sq = torch.cdist(joint, joint).pow(2)
        scale = sq.detach().mean().clamp_min(1e-12)
        kernel = sum(torch.exp(-sq / (2 * a * scale)) for a in self.alphas)
        n = len(source)
        return kernel[:n, :n].mean() + kernel[n:, n:].mean() - 2 * kernel[:n, n:].mean()


class TwoSites(nn.Module):
    """An N-site adversarial loss (:class:`DomainAdversarialLoss`, :class:`ConditionalDomainAdversarialLoss`)
    called the shared way: the source batch is site 0, the target batch site 1."""

    def __init__(self, adversarial: nn.Module) -> None:
        super().__init__()
        self.adversarial = adversarial

    def set_progress(self, progress: float) -> None:
        self.adversarial.set_progress(progress)

    @property
    def domain_accuracy(self) -> float:
        return self.adversarial.domain_accuracy

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor, logits_s: torch.Tensor, logits_t: torch.Tensor) -> torch.Tensor:
        domains = torch.cat([torch.zeros(len(f_s)), torch.ones(len(f_t))]).long().to(f_s.device)
        return self.adversarial(torch.cat([f_s, f_t]), domains, logits=torch.cat([logits_s, logits_t]))


@register_domain_loss("dann")
def _dann(feature_dim: int, num_classes: int, **_: Any) -> nn.Module:
    return TwoSites(DomainAdversarialLoss(feature_dim))


@register_domain_loss("cdan")
def _cdan(feature_dim: int, num_classes: int, *, entropy_conditioning: bool = True, **_: Any) -> nn.Module:
    return TwoSites(ConditionalDomainAdversarialLoss(feature_dim, num_classes, entropy_conditioning=entropy_conditioning))


@register_domain_loss("coral")
def _coral(feature_dim: int, num_classes: int, **_: Any) -> nn.Module:
    return CoralLoss()


@register_domain_loss("mmd")
def _mmd(feature_dim: int, num_classes: int, **_: Any) -> nn.Module:
    return MultiKernelMMDLoss()


class DomainTerm(nn.Module):
    """The configured domain loss on one source and one target batch, times ``weight``."""

    def __init__(self, method: str, loss: nn.Module, weight: float = 1.0) -> None:
        super().__init__()
        self.method, self.loss, self.weight = method, loss, weight

    def set_progress(self, progress: float) -> None:
        if hasattr(self.loss, "set_progress"):
            self.loss.set_progress(progress)

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor, logits_s: torch.Tensor, logits_t: torch.Tensor) -> torch.Tensor:
        return self.weight * self.loss(f_s, f_t, logits_s, logits_t)


def make_domain_loss(method: str, feature_dim: int, num_classes: int, *, weight: float = 1.0, **options: Any) -> DomainTerm | None:
    """The :class:`DomainTerm` for a registered domain loss (``dann``, ``cdan``, ``coral``, ``mmd``;
    ``options`` such as ``entropy_conditioning`` go to its builder); None for the other
    ``adapt.domain`` values, which do not train with a loss (``none``, ``adabn``, ``tent``)."""
    if method not in DOMAIN_LOSSES:
        return None
    return DomainTerm(method, DOMAIN_LOSSES[method](feature_dim, num_classes, **options), weight)
