"""Transfer: fine-tuning strategies, domain-adaptation losses, normalisation-layer adaptation
(AdaBN, TENT), label-free model-selection scores and site-shift diagnostics.  See docs/adapt.md."""

from medtl.adapt.blocks import Block, backbone_blocks
from medtl.adapt.diagnostics import extract_features, proxy_a_distance, site_shift
from medtl.adapt.domain import (
    TRAINING_METHODS,
    ConditionalDomainAdversarialLoss,
    CoralLoss,
    DomainAdversarialLoss,
    DomainDiscriminator,
    DomainTerm,
    GradientReverseFunction,
    GradientReverseLayer,
    MultiKernelMMDLoss,
    dann_coefficient,
    make_domain_loss,
    prediction_entropy,
    reverse_gradient,
)
from medtl.adapt.norm import (
    NORMALIZATION_METHODS, Tent, adabn, adapt_normalization, batch_statistics, has_batch_norm, norm_affine_parameters,
)
from medtl.adapt.selection import SCORES, information_maximization, negative_entropy, soft_neighborhood_density, target_scores
from medtl.adapt.strategies import LPFT, STRATEGIES, FullFineTuning, GradualUnfreeze, LinearProbe, make_strategy

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
    "NORMALIZATION_METHODS",
    "SCORES",
    "STRATEGIES",
    "TRAINING_METHODS",
    "Tent",
    "adabn",
    "has_batch_norm",
    "adapt_normalization",
    "backbone_blocks",
    "batch_statistics",
    "dann_coefficient",
    "extract_features",
    "information_maximization",
    "make_domain_loss",
    "make_strategy",
    "negative_entropy",
    "norm_affine_parameters",
    "prediction_entropy",
    "proxy_a_distance",
    "reverse_gradient",
    "site_shift",
    "soft_neighborhood_density",
    "target_scores",
]
