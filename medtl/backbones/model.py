"""The classifier every backbone is wrapped in, and :func:`create`, the one way to build it."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from medtl.backbones.registry import BackboneSpec, get_spec, preprocessing_for, set_module, source_of
from medtl.backbones.sources import read_source
from medtl.backbones.weights import LoadReport, transfer


class Classifier(nn.Module):
    """A backbone that maps (B, C, *spatial) to pooled features (B, F), and a linear head.

    State-dict keys are ``backbone.*`` (for torchvision networks exactly torchvision's names,
    minus the removed classifier) and ``head.*``.  ``load_report`` says how the pretrained
    weights were loaded; ``weights`` and ``preprocessing`` name the source and the input
    normalisation it expects.
    """

    def __init__(self, backbone: nn.Module, spec: BackboneSpec, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.feature_dim = spec.feature_dim
        self.in_channels = in_channels
        self.head = nn.Linear(spec.feature_dim, num_classes)
        self.weights = "none"
        self.load_report = LoadReport(source="none")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features, (B, feature_dim)."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, (B, num_classes)."""
        return self.head(self.backbone(x))

    def reset_head(self, num_classes: int) -> None:
        """A fresh head for ``num_classes`` on the same device and dtype as the old one."""
        old = self.head.weight
        self.head = nn.Linear(self.feature_dim, num_classes).to(device=old.device, dtype=old.dtype)

    @property
    def preprocessing(self) -> dict:
        """The input normalisation the loaded weights expect (see :func:`preprocessing_for`)."""
        return preprocessing_for(self.spec.name, self.weights, in_channels=self.in_channels)


COMBINE_RULES = ("log_prob_mean", "prob_mean")


class Ensemble(nn.Module):
    """Classifiers of one architecture (cross-validation folds or seeds) used as one model.

    The output is a logit vector, so a calibrator, a threshold and every consumer of logits treat
    the ensemble like a single :class:`Classifier`.  ``combine`` says how members are pooled:

    - ``log_prob_mean`` (default): the mean of the members' log-probabilities (a normalised
      geometric mean of their probabilities).  It keeps the scale of one member's log-odds, which
      is what the calibrator is fitted on (each scan's out-of-fold member), and temperature and
      Platt scaling, affine in the log-probabilities, commute with it.  Averaging probabilities
      instead left calibrated ensembles under-confident (docs/recipe.md, *Ensembles*).
    - ``prob_mean``: the log of the members' mean probability (bundles written before
      ``combine`` was recorded).

    A one-member ensemble gives the member's own probabilities.  Features (shift alarms, site
    diagnostics) are the first member's: in a cross-validation ensemble its own validation fold is
    the one set of labelled scans that the feature space has not been trained on.
    State-dict keys are ``members.<k>.backbone.*`` and ``members.<k>.head.*``.
    """

    def __init__(self, members: Sequence[Classifier], combine: str = "log_prob_mean") -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if combine not in COMBINE_RULES:
            raise ValueError(f"unknown ensemble combine rule {combine!r}; choose one of {', '.join(COMBINE_RULES)}")
        self.members = nn.ModuleList(members)
        self.combine = combine
        first = members[0]
        self.spec, self.in_channels, self.weights = first.spec, first.in_channels, first.weights
        self.feature_dim = first.feature_dim

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Each member's logits, (K, B, num_classes)."""
        return torch.stack([member(x).float() for member in self.members])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The first member's pooled features, (B, feature_dim)."""
        return self.members[0].forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled members' log-probabilities, (B, num_classes)."""
        return pool_members(self.member_logits(x), self.combine)


def pool_members(member_logits: torch.Tensor, combine: str = "log_prob_mean") -> torch.Tensor:
    """Pool (K, B, C) member logits into (B, C) log-probabilities by an :class:`Ensemble` rule."""
    log_probs = member_logits.log_softmax(dim=2)
    if combine == "prob_mean":
        return torch.logsumexp(log_probs, dim=0) - math.log(len(log_probs))
    return log_probs.mean(dim=0).log_softmax(dim=1)


@torch.inference_mode()
def extract_features(model: nn.Module, batches: Iterable, device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray | None]:
    """Pooled features ``(N, feature_dim)`` (float32, by ``model.forward_features`` in eval mode;
    the model's mode is restored after) of every batch, and the batches' labels (``(N,)``, or
    ``(N, L)`` multi-label; None when they have none).  A batch is a dict with ``image`` (and ``label``) or an ``(images, labels)`` pair."""
    was_training = model.training
    model.eval()
    features, labels = [], []
    try:
        for batch in batches:
            images, target = (batch["image"], batch.get("label")) if isinstance(batch, Mapping) else batch
            features.append(model.forward_features(images.to(device)).float().cpu())
            if target is not None:
                target = np.asarray(target).reshape(len(images), -1)  # (B,), or (B, L) for multi-label targets
                labels.append(target[:, 0] if target.shape[1] == 1 else target)
    finally:
        model.train(was_training)
    if not features:
        raise ValueError("no batches to extract features from")
    return torch.cat(features).numpy(), np.concatenate(labels) if labels else None


def build_backbone(spec: BackboneSpec, in_channels: int) -> nn.Module:
    """The randomly initialised backbone of ``spec`` for ``in_channels`` inputs, head removed."""
    net = spec.builder(spec, in_channels)
    set_module(net, spec.classifier, nn.Identity())
    return net


def create(
    name: str,
    *,
    weights: str = "none",
    in_channels: int = 1,
    spatial_dims: int = 2,
    num_classes: int = 2,
    allow_mismatch: bool = False,
    inflation: str = "mean",
) -> Classifier:
    """Build registry backbone ``name`` with a ``num_classes`` head and load ``weights``.

    ``weights``: ``none``; ``imagenet`` (or ``imagenet:VARIANT``, a torchvision weights enum
    member); ``medicalnet[:PATH]``, ``radimagenet[:PATH]``, ``torchxrayvision[:PATH]`` (without
    PATH: the expected file in the local weights folder); ``bundle:PATH`` (the backbone of a
    medtl bundle); or the path of a state dict (``.pt``/``.pth``/``.safetensors``).  The stem is
    adapted to ``in_channels`` and 2D kernels are inflated (``inflation``: ``mean`` or
    ``centre``) for 3D networks; anything else that does not fit raises
    :class:`~medtl.backbones.weights.WeightsMismatchError` unless ``allow_mismatch``.
    """
    if in_channels < 1 or num_classes < 1:
        raise ValueError(f"in_channels and num_classes must be positive, got {in_channels} and {num_classes}")
    spec = get_spec(name, spatial_dims)
    model = Classifier(build_backbone(spec, in_channels), spec, num_classes, in_channels)
    source, _ = source_of(weights)
    if source != "none":
        model.load_report = transfer(
            model.backbone, read_source(spec, weights), spec, source=source, allow_mismatch=allow_mismatch, inflation=inflation
        )
    model.weights = weights
    return model
