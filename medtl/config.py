"""The run configuration: one validated schema for every stage.

A YAML file gives any subset of the fields; everything else takes the defaults below, chosen so
that a user who changes nothing gets a well-trained, calibrated model.  ``--set a.b=value``
overrides are parsed as YAML scalars and validated like the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medtl.config_errors import backbone_line, validation_lines, yaml_problem
from medtl.registry import CALIBRATORS, DOMAIN_LOSSES, NORMALIZATION, SCORES, STRATEGIES, TASKS, Registry, RegistryError


def _registered(value: str, registry: Registry, *extra: str, kind: str | None = None) -> str:
    """``value`` when it is one of ``extra`` or a name in ``registry``; else the registry's one-line error."""
    if value in extra or value in registry:
        return value
    raise RegistryError(registry.unknown(value, [*extra, *registry], kind))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HeadConfig(_Section):
    """One head of a multi-task model: its own task type, classes and weight in the summed loss."""

    name: str = Field(description="The head's name; for a binary or multiclass head also its manifest column (blank = unknown).")
    type: Literal["binary", "multiclass", "multilabel"] = "binary"
    classes: list[str] = Field(min_length=1,
                               description="Class order (binary, multiclass), or the findings, each a 0/1 column (multilabel).")
    positive_class: str | None = Field(None, description="Binary heads: the positive class; default the last.")
    weight: float = Field(1.0, gt=0, description="The head's weight in the summed training loss.")


class TaskConfig(_Section):
    """What a scan is labelled with (docs/training.md, Tasks)."""

    type: str = Field(
        "auto", description="auto (binary for two classes, multiclass otherwise: one 'label' column), or a name registered "
        "in medtl.tasks: binary, multiclass, multilabel (one 0/1 column per finding named in data.classes, blank = unknown), "
        "multitask (one backbone, the named task.heads)."
    )
    heads: list[HeadConfig] | None = Field(None, description="task.type=multitask: the heads, each with its own column(s) and loss weight.")

    @field_validator("type")
    @classmethod
    def _type(cls, value: str) -> str:
        return _registered(value, TASKS, "auto")

    @model_validator(mode="after")
    def _heads(self) -> TaskConfig:
        if (self.type == "multitask") != bool(self.heads):
            raise ValueError("task.heads (a list of {name, type, classes[, positive_class, weight]}) goes with task.type=multitask, "
                             "and task.type=multitask needs it")
        names = [h.name for h in self.heads or ()]
        if len(set(names)) != len(names):
            raise ValueError(f"task.heads: head names must differ, got {names}")
        for head in self.heads or ():
            if head.type != "multilabel" and len(head.classes) < 2:
                raise ValueError(f"task.heads '{head.name}': a {head.type} head needs at least two classes")
            if head.positive_class is not None and head.positive_class not in head.classes:
                raise ValueError(f"task.heads '{head.name}': positive_class '{head.positive_class}' is not one of {head.classes}")
        return self


class DataConfig(_Section):
    manifest: Path | None = Field(None, description="Manifest CSV (image, label[, site, patient_id, split]).")
    target_manifest: Path | None = Field(
        None, description="Unlabelled target-site scans for adapt.domain: an image column (labels ignored; no site = site 'target')."
    )
    spatial_dims: Literal[2, 3] = 2
    image_size: list[int] | None = Field(None, description="Network input size; default: the backbone's.")
    intensity: Literal["auto", "cxr", "ct", "mr", "none"] = Field(
        "auto", description="Intensity preset; 'auto' picks by DICOM Modality, else cxr for 2D and mr for 3D."
    )
    ct_window: tuple[float, float] = Field((40.0, 400.0), description="CT window (centre, width) in HU.")
    classes: list[str] | None = Field(
        None, description="Class order; default: sorted label names.  multilabel: the findings, each a 0/1 manifest column."
    )
    positive_class: str | None = Field(None, description="Binary positive class; default: the last class.")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="Validation share when the manifest has no split.")
    target_spacing: list[float] | None = Field(
        None, description="Resample to this voxel spacing in mm (one value per axis, or one for all); default: keep."
    )
    fit: Literal["resize", "crop_pad"] | None = Field(
        None, description="How scans meet image_size: resize, or centre crop/pad; default crop_pad with "
        "target_spacing (keeps voxel size), else resize."
    )
    cache: Literal["memory", "disk", "none"] = Field(
        "memory", description="Cache preprocessed scans: memory (CacheDataset), disk (PersistentDataset under "
        "cache_dir, keyed by the preprocessing recipe) or none."
    )
    cache_dir: Path | None = Field(None, description="Disk cache folder; default $MEDTL_CACHE_DIR or ~/.cache/medtl/preprocessed.")
    skip_unreadable: bool = Field(
        False, description="Train without scans whose headers cannot be read (listed in RUN_DIR/unreadable.csv); "
        "default: refuse to start."
    )
    augment: bool = True
    num_workers: int = Field(2, ge=0)


class ModelConfig(_Section):
    backbone: str = "resnet18"
    weights: str = Field(
        "imagenet",
        description="imagenet | none | medicalnet[:PATH] | radimagenet[:PATH] | torchxrayvision[:PATH] | bundle:PATH | "
        "PATH to a state dict (see 'medtl weights list')",
    )
    in_channels: int = Field(1, ge=1)
    allow_mismatch: bool = Field(False, description="Load weights even if some tensors do not match.")
    inflation: Literal["mean", "centre"] = Field(
        "mean",
        description="2D weights into a 3D backbone: mean (each kernel repeated along depth and divided by it) or "
        "centre (the kernel on the centre slice, zeros elsewhere: every slice starts with the exact 2D response; "
        "for networks that halve depth many times, e.g. EfficientNet-Lite at 28^3, docs/backbones.md).",
    )


class AdaptConfig(_Section):
    """Transfer: fine-tuning strategy and options, domain adaptation, label-free model selection (docs/adapt.md)."""

    strategy: str = Field("full", description="Fine-tuning strategy: a name registered in medtl.adapt (full, linear_probe, lp_ft, gradual_unfreeze).")
    probe_epochs: int | None = Field(None, ge=1, description="lp_ft: epochs of stage 1 (head only); default half of train.epochs.")
    stage2_lr_factor: float = Field(0.1, gt=0, description="lp_ft: stage-2 rates are the configured ones times this.")
    unfreeze_every: int = Field(1, ge=1, description="gradual_unfreeze: epochs between unfreezing one more block from the top.")
    layer_decay: float = Field(1.0, gt=0, le=1, description="Each backbone block its own group at lr * layer_decay**depth from the top.")
    head_lr_multiplier: float = Field(10.0, gt=0, description="Head rate = lr x this (unless train.head_lr is set).")
    l2sp: float = Field(0.0, ge=0, description="L2-SP weight: penalty towards the pretrained backbone weights (replaces their decay).")
    bn: Literal["train", "frozen_stats", "frozen"] = Field(
        "train", description="BatchNorm: train | frozen_stats (running statistics kept) | frozen (statistics and affine kept)."
    )
    domain: str = Field(
        "none", description="Domain adaptation to the unlabelled target scans (rows with a site and no label, or data.target_manifest): "
        "none, a registered domain loss (dann, cdan, coral, mmd) or normalisation step after training (adabn, tent)."
    )
    domain_weight: float = Field(1.0, ge=0, description="Weight of the domain loss (dann, cdan, coral, mmd).")
    cdan_entropy: bool = Field(True, description="cdan: weight examples by prediction certainty (CDAN+E).")
    tent_steps: int = Field(1, ge=1, description="tent: passes over the target scans.")
    tent_lr: float = Field(1e-4, gt=0, description="tent: Adam rate on the normalisation affine parameters.")
    selection: str = Field(
        "source_val",
        description="Early stopping / best epoch: source validation AUROC, or a registered label-free score on the target scans "
        "(im: information maximisation, entropy: negative entropy, snd: soft neighbourhood density).",
    )

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, value: str) -> str:
        return _registered(value, STRATEGIES)

    @field_validator("domain")
    @classmethod
    def _domain(cls, value: str) -> str:
        return _registered(value, DOMAIN_LOSSES, "none", *NORMALIZATION, kind="domain adaptation method")

    @field_validator("selection")
    @classmethod
    def _selection(cls, value: str) -> str:
        return _registered(value, SCORES, "source_val")


class TrainConfig(_Section):
    epochs: int = Field(12, ge=1)
    batch_size: int = Field(32, ge=1, description="Images per optimizer step over all processes (split evenly across torchrun ranks).")
    accumulate: int = Field(1, ge=1, description="Gradient accumulation: micro-batches of batch_size / accumulate per optimizer step.")
    lr: float = Field(3e-4, gt=0, description="Backbone learning rate (AdamW).")
    head_lr: float | None = Field(None, description="Head learning rate; default lr x adapt.head_lr_multiplier.")
    weight_decay: float = Field(1e-4, ge=0)
    class_weighted: bool = Field(False, description="Weight the loss by inverse class frequency.")
    patience: int = Field(4, ge=1, description="Early stopping: epochs without validation AUROC gain.")
    seed: int = 0
    deterministic: bool = Field(False, description="Deterministic algorithms only (torch + cuDNN): bit-reproducible on GPU, slower.")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N (under torchrun, auto = this rank's GPU)")
    amp: Literal["auto", "bf16", "fp16", "none"] = Field(
        "auto", description="Mixed precision: auto = bf16 where the GPU supports it, else fp16 with a grad scaler; none on CPU."
    )
    channels_last: bool | None = Field(None, description="Channels-last memory format for 2D CNNs; default on for CUDA.")
    checkpointing: bool = Field(False, description="Activation checkpointing of the backbone blocks (large 3D volumes).")
    sync_bn: bool = Field(
        False, description="Under torchrun, BatchNorm statistics over the whole batch of all GPUs (SyncBatchNorm); default per GPU."
    )
    checkpoint_every: int = Field(1, ge=1, description="Write RUN_DIR/checkpoint.pt every this many epochs (and at the end).")
    folds: int | None = Field(
        None, ge=1, description="K-fold cross-validation ensemble (patient-level, stratified, over the train and val rows): "
        "K members in one bundle, calibrator and threshold fitted on the pooled out-of-fold predictions; "
        "1 = one model on the validation split; default: recipe: auto decides (5 for up to 10,000 labelled scans)."
    )
    seeds: int = Field(1, ge=1, description="Seed ensemble on the fixed validation split: members trained with seed, seed+1, ...")


class CalibrationConfig(_Section):
    method: str = Field(
        "auto",
        description="Post-hoc calibration of the logits on the validation split: auto or a name registered in medtl.calibrate "
        "(temperature, vector, matrix, platt, isotonic, beta, none); auto = platt for two classes, temperature otherwise; "
        "platt and beta are binary-only.",
    )

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        return _registered(value, CALIBRATORS, "auto")


class OperatingPointConfig(_Section):
    method: Literal["youden", "most_probable", "sensitivity", "specificity"] = Field(
        "youden", description="youden | most_probable (0.5 on the calibrated probability) | sensitivity / specificity with target"
    )
    target: float | None = Field(None, gt=0, lt=1, description="Target sensitivity/specificity.")

    @model_validator(mode="after")
    def _target_needed(self) -> OperatingPointConfig:
        if self.method in ("sensitivity", "specificity") and self.target is None:
            raise ValueError(f"operating_point.method={self.method} needs operating_point.target")
        return self


class ReportConfig(_Section):
    subgroups: list[str] = Field(
        ["site"], description="Manifest columns to report every metric by (site, or any extra column); absent ones are skipped."
    )
    bootstrap: int = Field(2000, ge=100, description="Bootstrap resamples for the CIs that have no closed form.")
    prevalence: float | None = Field(
        None, gt=0, lt=1, description="Positive-class prevalence where the model will be used: binary reports add PPV and "
        "NPV at it (Bayes from sensitivity and specificity) beside the evaluated sample's own."
    )


class Config(_Section):
    recipe: Literal["auto", "none"] = Field(
        "auto", description="auto: training values left unset are chosen from a fingerprint of the data set by fixed "
        "rules (docs/recipe.md; a value you set always wins); none: the schema defaults."
    )
    task: TaskConfig = TaskConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    adapt: AdaptConfig = AdaptConfig()
    train: TrainConfig = TrainConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    operating_point: OperatingPointConfig = OperatingPointConfig()
    report: ReportConfig = ReportConfig()

    @model_validator(mode="after")
    def _multitask_alone(self) -> Config:
        if self.task.type == "multitask" and (self.adapt.domain != "none" or self.adapt.selection != "source_val"):
            raise ValueError("task.type=multitask trains without domain adaptation (adapt.domain=none, adapt.selection=source_val): "
                             "the domain losses and label-free scores read one softmax head")
        return self


class ConfigError(ValueError):
    """A configuration file or override that does not validate."""


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: '{part}' is not a section")
    node[parts[-1]] = value


DATA_PATHS = ("manifest", "target_manifest")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config and apply ``key=value`` overrides.  Relative manifest paths are resolved
    against the config file's folder when written in the file, and against the working directory
    when given as an override (as a path typed on the command line is)."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {yaml_problem(err)}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        data = tree.get("data")
        for key in DATA_PATHS if isinstance(data, dict) else ():
            if isinstance(data.get(key), str) and not Path(data[key]).is_absolute():
                data[key] = str((path.resolve().parent / data[key]).resolve())
    given: dict[str, str] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item}: not a valid YAML value: {yaml_problem(err)}") from None
        given[key.strip()] = raw
        _set_dotted(tree, key.strip(), value)
    try:
        config = Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError("\n".join(validation_lines(err, Config, given, path))) from None
    bad_backbone = backbone_line(config, given, path)
    if bad_backbone:
        raise ConfigError(bad_backbone)
    for key in DATA_PATHS:
        value = getattr(config.data, key)
        if value is not None and not value.is_absolute():
            setattr(config.data, key, value.resolve())
    return config


def dump_config(config: Config) -> str:
    """The resolved config as YAML, for runs and bundles."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
