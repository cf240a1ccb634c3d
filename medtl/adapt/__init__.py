"""Transfer: fine-tuning strategies, domain-adaptation losses, normalisation-layer adaptation
(AdaBN, TENT), label-free model-selection scores and site-shift diagnostics.  See docs/adapt.md."""

from medtl.adapt.blocks import Block, backbone_blocks
from medtl.adapt.diagnostics import proxy_a_distance, site_shift
from medtl.adapt.domain import (
    ConditionalDomainAdversarialLoss,
    CoralLoss,
    DomainAdversarialLoss,
    DomainDiscriminator,
    DomainTerm,
    GradientReverseFunction,
    GradientReverseLayer,
    MultiKernelMMDLoss,
    TwoSites,
    dann_coefficient,
    entropy,
    make_domain_loss,
    prediction_entropy,
    register_domain_loss,
    reverse_gradient,
)
from medtl.adapt.norm import (
    Tent,
    adabn,
    adapt_normalization,
    batch_statistics,
    has_batch_norm,
    norm_affine_parameters,
    register_normalization,
)
from medtl.adapt.selection import information_maximization, negative_entropy, register_score, soft_neighborhood_density, target_scores
from medtl.adapt.strategies import LPFT, FullFineTuning, GradualUnfreeze, LinearProbe, make_strategy, register_strategy
from medtl.registry import DOMAIN_LOSSES, NORMALIZATION, SCORES, STRATEGIES  # filled by the modules above

__all__ = [
    "Block",
    "ConditionalDomainAdversarialLoss",
    "CoralLoss",
    "DomainAdversarialLoss",
    "DomainDiscriminator",
    "DomainTerm",
    "FullFineTuning",
    "GradientReverseFunction",
    "GradientReverseLayer",
    "GradualUnfreeze",
    "LPFT",
    "LinearProbe",
    "MultiKernelMMDLoss",
    "DOMAIN_LOSSES",
    "NORMALIZATION",
    "SCORES",
    "STRATEGIES",
    "Tent",
    "TwoSites",
    "adabn",
    "has_batch_norm",
    "adapt_normalization",
    "backbone_blocks",
    "batch_statistics",
    "dann_coefficient",
    "entropy",
    "information_maximization",
    "make_domain_loss",
    "make_strategy",
    "negative_entropy",
    "norm_affine_parameters",
    "prediction_entropy",
    "proxy_a_distance",
    "register_domain_loss",
    "register_normalization",
    "register_score",
    "register_strategy",
    "reverse_gradient",
    "site_shift",
    "soft_neighborhood_density",
    "target_scores",
]
