"""The two end-to-end jobs that join every stage: train a bundle, and evaluate one.

``train`` goes manifest -> splits -> transforms -> backbone -> fine-tuning -> calibration ->
operating point -> bundle -> report; ``evaluate`` replays a bundle on any labelled manifest.
Batch prediction lives in :mod:`medtl.infer`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from itertools import chain
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from monai.utils import set_determinism
from safetensors.torch import load_file, save_file

from medtl import bundle as bundles
from medtl import threads
from medtl.bundle import FeatureReference
from medtl.bundle.bundle import CONFIG_FILE as BUNDLE_CONFIG
from medtl.backbones import Ensemble, check_batch, create, extract_features, get_spec, pool_members, preprocessing_for
from medtl.calibrate import make_calibrator
from medtl.config import AdaptConfig, Config, dump_config, load_config
from medtl.infer import ERROR_COLUMNS, iter_logits, write_table
from medtl.io import ScanReadError, ScanRecord, assign_splits, read_manifest, unreadable_scans
from medtl.metrics import OperatingPoint, choose_operating_point
from medtl.recipe import fingerprint, resolve_recipe
from medtl.report import run_info, write_report
from medtl.train import (
    CHECKPOINT_FILE, FitResult, Trainer, class_weights, is_main, labelled_items, make_loader, micro_batch_size, predict_logits,
    resolve_classes, resolve_device, softmax, world_size,
)
from medtl.train import Member, cross_validation_members, seed_members
from medtl.transforms import build_transforms, make_preprocessing
from medtl.adapt import DOMAIN_LOSSES, NORMALIZATION, adapt_normalization, make_domain_loss, make_strategy, site_shift

log = logging.getLogger(__name__)
VAL_LOGITS = "val_logits.safetensors"  # an ensemble member's scores on its validation (out-of-fold) scans


@dataclass
class TrainOutcome:
    """Where a training run put its results, and the headline figures."""

    run_dir: Path
    bundle: Path
    report: Path
    metrics: dict[str, Any]
    training: dict[str, Any] = field(default_factory=dict)


def _positive_index(classes: Sequence[str], configured: str | None) -> int | None:
    if len(classes) != 2:
        return None
    if configured is None:
        return 1
    if configured not in classes:
        raise ValueError(f"data.positive_class '{configured}' is not one of the classes {list(classes)}")
    return list(classes).index(configured)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities: the form an :class:`~medtl.backbones.Ensemble` outputs, so a calibrator
    fitted on members' out-of-fold log-probabilities applies to the ensemble's output."""
    return torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1).numpy()


def _partition_summary(parts: dict[str, list[ScanRecord]], classes: Sequence[str]) -> dict[str, Any]:
    """Counts and events per partition, and whether partitions share patients."""
    summary: dict[str, Any] = {}
    for name, records in parts.items():
        counts = {c: sum(r.label == c for r in records) for c in classes}
        summary[name] = {"scans": len(records), "patients": len({r.patient for r in records}), "per_class": counts}
    patients = {name: {r.patient for r in recs} for name, recs in parts.items()}
    names = list(patients)
    shared = {f"{a}/{b}": len(patients[a] & patients[b]) for i, a in enumerate(names) for b in names[i + 1 :]}
    summary["patients_shared_between_partitions"] = shared
    summary["patient_level_disjoint"] = not any(shared.values())
    return summary


def _selection_text(fit: FitResult, patience: int) -> str:
    """How the kept epoch was chosen, in plain words for the report."""
    if fit.selection == "source_val":
        how = f"highest source validation AUROC ({fit.best_auroc:.4f})"
    else:
        how = f"highest label-free target score '{fit.selection}' ({fit.best_score:.4f}; no target labels used)"
    return f"epoch {fit.best_epoch} of {len(fit.history)}, {how}; early stopping patience {patience}"


def _groups(records: Sequence[ScanRecord], columns: Sequence[str]) -> dict[str, list[str]] | None:
    """Subgroup labels per case for each requested manifest column that has values."""
    groups = {}
    for column in columns:
        values = [r.site if column == "site" else r.extra.get(column) for r in records]
        if any(values):
            groups[column] = [v or "unknown" for v in values]
    return groups or None


def _needs_targets(adapt: AdaptConfig) -> bool:
    """Whether the adaptation method or the model selection reads unlabelled target scans."""
    return adapt.domain != "none" or adapt.selection != "source_val"


def _target_records(records: Sequence[ScanRecord], config: Config) -> list[ScanRecord]:
    """Unlabelled target scans: manifest rows with a site and no label, plus ``data.target_manifest``
    (its labels, if any, are not used; rows without a site are site 'target').  Required when ``adapt`` needs them."""
    targets = [r for r in records if not r.label and r.site]
    if config.data.target_manifest is not None:
        targets += [r if r.site else replace(r, site="target") for r in read_manifest(config.data.target_manifest, require_label=False)]
    adapt = config.adapt
    if not targets and _needs_targets(adapt):
        raise ValueError(
            f"{config.data.manifest}: adapt.domain={adapt.domain} / adapt.selection={adapt.selection} need unlabelled "
            "target scans: rows with a site and no label, or data.target_manifest"
        )
    return targets


def _readable(parts: dict[str, list[ScanRecord]], *, skip: bool, run_dir: Path) -> dict[str, list[ScanRecord]]:
    """Check every scan's header before training (target scans too): refuse to start on unreadable scans (listing
    them all), or with ``skip`` leave them out and list them in ``RUN_DIR/unreadable.csv``."""
    records = [r for recs in parts.values() for r in recs]
    bad = dict(unreadable_scans([r.image for r in records]))
    if not bad:
        return parts
    listing = "\n".join(f"  {path}: {reason}" for path, reason in bad.items())
    if not skip:
        raise ScanReadError(None, f"{len(bad)} of {len(records)} scans cannot be read:\n{listing}\n"
                                  "fix or remove them, or set data.skip_unreadable: true to train without them")
    if is_main():
        write_table(run_dir / "unreadable.csv", ERROR_COLUMNS, [{"image": p, "error": r} for p, r in bad.items()])
    log.warning("left out %d unreadable scans (listed in %s):\n%s", len(bad), run_dir / "unreadable.csv", listing)
    kept = {name: [r for r in recs if str(r.image) not in bad] for name, recs in parts.items()}
    for name in ("train", "val"):
        if not kept.get(name):
            raise ValueError(f"the '{name}' split has no readable scans left")
    return {k: v for k, v in kept.items() if v}


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def _check_resumable(run_dir: Path) -> None:
    """A run can resume from its checkpoint, or (an ensemble) from its members' folder."""
    if not (run_dir / CHECKPOINT_FILE).is_file() and not (run_dir / "members").is_dir():
        raise FileNotFoundError(f"cannot resume: {run_dir / CHECKPOINT_FILE} does not exist (nor {run_dir / 'members'})")


def _start_run(run_dir: Path, config: Config, resume: bool) -> None:
    """Record the resolved config, package versions and thread budget in the run folder (rank 0 writes).  A
    resumed run must have the config it started with (exact resume depends on it)."""
    text = dump_config(config)
    if resume:
        stored, now = _flat(yaml.safe_load((run_dir / "config.yaml").read_text())), _flat(config.model_dump(mode="json"))
        changed = sorted(k for k in stored.keys() | now.keys() if stored.get(k) != now.get(k))
        if changed:
            raise ValueError(f"cannot resume {run_dir}: the config differs from the run's config.yaml in {', '.join(changed)}")
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main():
        (run_dir / "config.yaml").write_text(text)
        versions = {**bundles.package_versions(), "threads": threads.in_effect()}
        (run_dir / "versions.json").write_text(json.dumps(versions, indent=2))


def _configure(config: Config, labelled: Sequence[ScanRecord]) -> tuple[Config, dict[str, Any] | None]:
    """``recipe: auto``: fingerprint the labelled scans and fill every training value left unset;
    each choice is logged with its reason.  Returns the resolved config and the record of it."""
    if config.recipe == "none":
        return config, None
    fp = fingerprint(labelled, seed=config.train.seed)
    resolved, choices = resolve_recipe(config, fp)
    if is_main():
        log.info("dataset fingerprint: %d scans, %d patients, classes %s, %dD, median size %s, %d channel(s)%s, modality %s",
                 fp.scans, fp.patients, fp.per_class, fp.spatial_dims, fp.median_size, fp.channels,
                 " (colour)" if fp.colour else "", fp.modality)
        for choice in choices:
            log.info("recipe: %s = %s (%s)", choice.key, choice.value, choice.reason)
    return resolved, {"fingerprint": fp.to_dict(), "choices": [c.to_dict() for c in choices]}


def _members(parts: dict[str, list[ScanRecord]], tcfg) -> list[Member]:
    """The models to train: one on the train/val split, ``train.seeds`` on it, or ``train.folds``
    cross-validation folds over the train and val rows together."""
    folds = tcfg.folds or 1
    if folds > 1 and tcfg.seeds > 1:
        raise ValueError(f"train.folds={folds} and train.seeds={tcfg.seeds}: choose a cross-validation or a seed ensemble")
    if folds > 1:
        return cross_validation_members(parts["train"] + parts["val"], folds, tcfg.seed)
    return seed_members(parts["train"], parts["val"], tcfg.seeds, tcfg.seed)


@dataclass
class _Fitted:
    """A trained member: its model, fit history, and its validation part's logits and labels
    (out-of-fold for cross-validation members)."""

    member: Member
    model: torch.nn.Module
    fit: FitResult
    val_logits: np.ndarray | None
    val_labels: np.ndarray | None


class _Run:
    """What every member of one training run shares: classes, preprocessing, loader settings,
    target scans and the run folder."""

    def __init__(self, config: Config, run_dir: Path, classes: list[str], targets: list[ScanRecord], workers: int,
                 resume: bool) -> None:
        self.config, self.run_dir, self.classes, self.targets, self.resume = config, run_dir, classes, targets, resume
        data, mcfg, tcfg = config.data, config.model, config.train
        spec = get_spec(mcfg.backbone, data.spatial_dims)
        self.pre = make_preprocessing(
            spatial_dims=data.spatial_dims,
            image_size=data.image_size or spec.default_input_size,
            channels=mcfg.in_channels,
            intensity=data.intensity,
            ct_window=data.ct_window,
            normalization=preprocessing_for(mcfg.backbone, mcfg.weights, in_channels=mcfg.in_channels),
            target_spacing=data.target_spacing,
            fit=data.fit,
        )
        batch_size = micro_batch_size(tcfg.batch_size, tcfg.accumulate, world_size())
        self.loader_args = dict(batch_size=batch_size, num_workers=workers, cache=data.cache, cache_dir=data.cache_dir, recipe=self.pre)
        self.eval_transform = build_transforms(self.pre, train=False)
        self.train_transform = build_transforms(self.pre, train=data.augment)
        target_items = [{"image": str(r.image), "label": -1} for r in targets]
        self.target_items = target_items
        self.target_eval = self.loader(target_items, train=False) if targets else None

    def loader(self, items: list[dict], *, train: bool, seed: int | None = None):
        transform = self.train_transform if train else self.eval_transform
        return make_loader(items, transform, shuffle=train, seed=self.config.train.seed if seed is None else seed, **self.loader_args)

    def model(self) -> torch.nn.Module:
        mcfg, data = self.config.model, self.config.data
        return create(mcfg.backbone, weights=mcfg.weights, in_channels=mcfg.in_channels, spatial_dims=data.spatial_dims,
                      num_classes=len(self.classes), allow_mismatch=mcfg.allow_mismatch)

    def fit(self, member: Member, folder: Path, *, keep: bool = False) -> _Fitted:
        """Train one member (or, resuming, read it back when it finished before); ``keep``: save the
        finished member in ``folder`` so that a resumed run skips it."""
        config, acfg = self.config, self.config.adapt
        tcfg = config.train.model_copy(update={"seed": member.seed})
        set_determinism(seed=member.seed)
        model = self.model()
        val_loader = self.loader(labelled_items(member.val, self.classes), train=False)
        done = folder / "member.json"
        if self.resume and all((folder / name).is_file() for name in (done.name, "model.safetensors", VAL_LOGITS)):
            model.load_state_dict(load_file(str(folder / "model.safetensors")))
            model = model.to(resolve_device(tcfg.device))
            scored = load_file(str(folder / VAL_LOGITS))  # as scored after training: resuming refits the same calibrator
            log.info("member %s: finished before, read back from %s", member.name, folder)
            return _Fitted(member, model, FitResult(**json.loads(done.read_text())["fit"]), scored["logits"].numpy(),
                           scored["labels"].numpy())
        folder.mkdir(parents=True, exist_ok=True)
        train_items = labelled_items(member.train, self.classes)
        train_loader = self.loader(train_items, train=True, seed=member.seed)
        target_train = self.loader(self.target_items, train=True, seed=member.seed) if acfg.domain in DOMAIN_LOSSES else None
        warning = check_batch(next(iter(val_loader))["image"], self.pre["normalization"])
        if warning:
            log.warning("%s", warning)
        weights = class_weights(train_items, len(self.classes)) if tcfg.class_weighted else None
        domain = make_domain_loss(acfg.domain, model.feature_dim, len(self.classes), weight=acfg.domain_weight,
                                  entropy_conditioning=acfg.cdan_entropy)
        trainer = Trainer(model, make_strategy(acfg), tcfg, class_weights=weights, domain=domain, selection=acfg.selection)
        fit = trainer.fit(train_loader, val_loader, target_loader=target_train, target_eval_loader=self.target_eval,
                          log_path=folder / "train_log.csv", checkpoint=folder / CHECKPOINT_FILE, resume=self.resume and (folder / CHECKPOINT_FILE).is_file())
        if not is_main():
            return _Fitted(member, trainer.model, fit, None, None)
        logits, labels = predict_logits(trainer.model, val_loader, amp_dtype=trainer.amp_dtype, memory_format=trainer.memory_format)
        if keep:
            save_file({k: v.detach().cpu().contiguous() for k, v in trainer.model.state_dict().items()}, str(folder / "model.safetensors"))
            save_file({"logits": torch.from_numpy(logits).contiguous(), "labels": torch.from_numpy(labels).contiguous()},
                      str(folder / VAL_LOGITS))
            done.write_text(json.dumps({"name": member.name, "seed": member.seed, "fit": asdict(fit)}))  # last: marks it finished
        return _Fitted(member, trainer.model, fit, logits, labels)


def _member_summary(fitted: Sequence[_Fitted]) -> dict[str, Any]:
    """Per-member validation AUROC and its spread (the report's ensemble section)."""
    aurocs = [f.fit.best_auroc for f in fitted]
    return {
        "members": [{"name": f.member.name, "seed": f.member.seed, "train_scans": len(f.member.train), "val_scans": len(f.member.val),
                     "best_epoch": f.fit.best_epoch, "epochs_run": len(f.fit.history), "val_auroc": round(f.fit.best_auroc, 4)}
                    for f in fitted],
        "val_auroc_mean": round(float(np.mean(aurocs)), 4),
        "val_auroc_sd": round(float(np.std(aurocs, ddof=1)), 4) if len(aurocs) > 1 else 0.0,
        "val_auroc_range": [round(float(min(aurocs)), 4), round(float(max(aurocs)), 4)],
    }


def _site_shift(before: np.ndarray, model: torch.nn.Module, device, loaders: Sequence, sites: Sequence[str], config: Config) -> dict:
    """Proxy A-distances and 2D embeddings of the evaluated (and target) scans' features, with the
    initial backbone and with the trained model."""
    after, _ = extract_features(model, chain(*loaders), device)
    adapt = config.adapt.strategy + ("" if config.adapt.domain == "none" else f" + {config.adapt.domain}")
    return {
        "before": {**site_shift(before, sites, seed=config.train.seed), "label": f"initial backbone ({config.model.weights})"},
        "after": {**site_shift(after, sites, seed=config.train.seed), "label": f"trained model ({adapt})"},
    }


def train(config: Config, out_dir: str | Path, *, num_workers: int | None = None, resume: bool = False) -> TrainOutcome | None:
    """Train, calibrate and bundle a classifier as ``config`` says; write the report.

    With ``recipe: auto`` the training values left unset are first chosen from a fingerprint of
    the data (:mod:`medtl.recipe`).  ``train.folds`` > 1 trains a cross-validation ensemble and
    ``train.seeds`` > 1 a seed ensemble: one bundle holding every member, calibrated on their
    pooled out-of-fold (or validation) predictions.  ``resume``: continue the interrupted run in
    ``out_dir`` (finished members are read back).  Under torchrun every rank trains; rank 0 alone
    calibrates and writes bundle and report (the other ranks return None)."""
    run_dir = Path(out_dir)
    if resume:
        _check_resumable(run_dir)
    if config.data.manifest is None:
        raise ValueError("data.manifest is not set (give it in the config or with --set data.manifest=PATH)")
    started = time.perf_counter()
    records = assign_splits(read_manifest(config.data.manifest), val_fraction=config.data.val_fraction, seed=config.train.seed)
    labelled = [r for r in records if r.label]
    config, recipe = _configure(config, [r for r in labelled if r.split != "test"])
    data, tcfg, acfg = config.data, config.train, config.adapt
    targets = _target_records(records, config)
    classes = resolve_classes(labelled, data.classes)
    positive = _positive_index(classes, data.positive_class)
    parts = {name: [r for r in labelled if r.split == name] for name in ("train", "val", "test")}
    for name in ("train", "val"):
        if not parts[name]:
            raise ValueError(f"{data.manifest}: the '{name}' split is empty")
    members = _members(parts, tcfg)
    ensemble = len(members) > 1
    _start_run(run_dir, config, resume)
    if recipe is not None and is_main():
        (run_dir / "recipe.json").write_text(json.dumps(recipe, indent=2))
    parts = _readable({**{k: v for k, v in parts.items() if v}, "target": targets}, skip=data.skip_unreadable, run_dir=run_dir)
    targets = parts.pop("target", [])
    if not targets and _needs_targets(acfg):
        raise ValueError("none of the unlabelled target scans can be read")
    readable = {str(r.image) for recs in parts.values() for r in recs}
    members = [replace(m, train=[r for r in m.train if str(r.image) in readable], val=[r for r in m.val if str(r.image) in readable])
               for m in members]

    workers = data.num_workers if num_workers is None else num_workers
    run = _Run(config, run_dir, classes, targets, workers, resume)
    if acfg.domain in ("dann", "cdan") and acfg.selection == "source_val" and is_main():
        log.warning("adapt.domain=%s with source-validation model selection: adversarial alignment can scramble the "
                    "target site's classes while source validation stays high (docs/benchmarks.md, Domain adaptation); "
                    "check the bundle on a few labelled target scans with medtl evaluate, or try adapt.domain=adabn",
                    acfg.domain)
    plan = _report_plan(run, parts, members)

    fitted = []
    for i, member in enumerate(members):
        if ensemble and is_main():
            log.info("member %d of %d (%s): %d training, %d validation scans", i + 1, len(members), member.name,
                     len(member.train), len(member.val))
        folder = run_dir / "members" / member.name if ensemble else run_dir
        fitted.append(run.fit(member, folder, keep=ensemble))
    if not is_main():
        return None
    return _finish(run, fitted, parts, positive, recipe, plan, started)


def _feature_reference(run: _Run, model: torch.nn.Module, first: Member, device) -> FeatureReference | None:
    """The shift alarm's reference, in the feature space of the (first) member: its training scans
    and the validation scans it never trained on (an ensemble's features are its first member's)."""
    def loader(records: list[ScanRecord]):
        return make_loader(labelled_items(records, run.classes), run.eval_transform, shuffle=False,
                           **{**run.loader_args, "cache": "none"})
    return bundles.reference_of(model, loader(first.train), loader(first.val), device=device, seed=run.config.train.seed)


@dataclass
class _ReportPlan:
    """What the training report is computed on: the manifest's test rows when it has them (scored
    after training through ``loader``), else the calibration scans (out-of-fold or validation);
    and the features of those scans (plus target scans) before training, for the site-shift section."""

    records: list[ScanRecord]
    loader: Any | None
    shift_loaders: list
    shift_sites: list[str]
    before: np.ndarray | None


def _report_plan(run: _Run, parts: dict[str, list[ScanRecord]], members: Sequence[Member]) -> _ReportPlan:
    folds = len(members) > 1 and (run.config.train.folds or 1) > 1
    records = parts["test"] if "test" in parts else [r for m in members for r in m.val] if folds else parts["val"]
    loader = run.loader(labelled_items(records, run.classes), train=False)
    sites = [r.site or "source" for r in records] + [r.site for r in run.targets]  # labelled = source
    shift_loaders = [loader] + ([run.target_eval] if run.target_eval else [])
    before = None
    if is_main() and len(set(sites)) > 1:
        set_determinism(seed=run.config.train.seed)
        before, _ = extract_features(run.model(), chain(*shift_loaders))
    return _ReportPlan(records, loader if "test" in parts else None, shift_loaders, sites, before)


def _finish(run: _Run, fitted: list[_Fitted], parts: dict[str, list[ScanRecord]], positive: int | None,
            recipe: dict[str, Any] | None, plan: _ReportPlan, started: float) -> TrainOutcome:
    """Calibrate, choose the threshold, adapt normalisation, save the bundle and write the report."""
    config, classes, run_dir = run.config, run.classes, run.run_dir
    data, mcfg, tcfg, acfg = config.data, config.model, config.train, config.adapt
    ensemble = len(fitted) > 1
    folds = ensemble and (tcfg.folds or 1) > 1
    model = Ensemble([f.model for f in fitted]) if ensemble else fitted[0].model
    device = next(model.parameters()).device
    # Calibration and threshold are fitted on scans no member trained on: the pooled out-of-fold
    # predictions (cross-validation), else the validation split through the whole model.
    if folds:
        cal_logits = np.concatenate([_log_softmax(f.val_logits) for f in fitted])
        cal_labels = np.concatenate([f.val_labels for f in fitted])
    elif ensemble:
        cal_logits = pool_members(torch.from_numpy(np.stack([f.val_logits for f in fitted])).double(), model.combine).numpy()
        cal_labels = fitted[0].val_labels
    else:
        cal_logits, cal_labels = fitted[0].val_logits, fitted[0].val_labels
    calibrator = make_calibrator(config.calibration.method, len(classes)).fit(cal_logits, cal_labels)
    operating_point: OperatingPoint | None = None
    if positive is not None:
        opcfg = config.operating_point
        scores = calibrator.transform(cal_logits)[:, positive]
        operating_point = choose_operating_point((cal_labels == positive).astype(int), scores, opcfg.method, opcfg.target)

    if plan.loader is not None:
        logits, labels = predict_logits(model, plan.loader, device)
        evaluation = "held-out test split of the training manifest (internal)"
    else:
        logits, labels = cal_logits, cal_labels
        evaluation = (f"pooled out-of-fold predictions of the {len(fitted)} cross-validation members (each scan scored by the "
                      "member that did not train on it; the calibrator and threshold were fitted on these predictions too, "
                      "so the calibration figures are optimistic)" if folds else
                      "internal validation split (also used for model selection, calibration and the threshold: optimistic)")
    if run.target_eval is not None and acfg.domain in NORMALIZATION:
        adapt_normalization(model, acfg.domain, run.target_eval, tent_lr=acfg.tent_lr, tent_steps=acfg.tent_steps, device=device)
        evaluation += (f"; figures of the model before its {acfg.domain} step, which re-normalises with the target scans' "
                       "statistics: the bundle holds the adapted model, for the target site (check it there with medtl evaluate)")

    model_spec = {
        "backbone": mcfg.backbone,
        "in_channels": mcfg.in_channels,
        "spatial_dims": data.spatial_dims,
        "num_classes": len(classes),
        "weights": mcfg.weights,
        **({"members": len(fitted), "combine": model.combine} if ensemble else {}),
    }
    partitions = _partition_summary(parts, classes)
    first = fitted[0].fit
    training = {
        "best_epoch": first.best_epoch,
        "best_val_auroc": first.best_auroc,
        "epochs_run": len(first.history),
        "selection": first.selection,
        "adaptation": {"strategy": acfg.strategy, "domain": acfg.domain, "target_scans": len(run.targets)},
        "seconds": round(time.perf_counter() - started, 1),
        "partitions": partitions,
        **({"ensemble": {"kind": f"{len(fitted)}-fold cross-validation" if folds else f"{len(fitted)} seeds",
                         **_member_summary(fitted)}} if ensemble else {}),
        **({"recipe": recipe} if recipe is not None else {}),
    }
    bundle_dir = bundles.save(
        run_dir / "bundle",
        model,
        model_spec=model_spec,
        classes=classes,
        positive_index=positive,
        preprocessing=run.pre,
        calibrator=calibrator,
        operating_point=operating_point,
        config_yaml=dump_config(config),
        training=training,
        reference=_feature_reference(run, model, fitted[0].member, device),
    )
    calibration_data = (f"the pooled out-of-fold predictions ({len(cal_labels)} scans)" if folds
                        else f"the validation split ({len(cal_labels)} scans)")
    selection = (_selection_text(first, tcfg.patience) if not ensemble else
                 f"each member: best epoch by its own validation part ({first.selection}); early stopping patience {tcfg.patience}")
    kind = f" ({training['ensemble']['kind']} ensemble)" if ensemble else ""
    info = run_info(config, bundles.read_meta(bundle_dir), title=f"medtl training report: {mcfg.backbone}{kind}",
                    evaluated_on=evaluation, recalibration=f"{calibrator.method} fitted on {calibration_data}",
                    model_selection=selection)
    metrics = write_report(
        run_dir / "report",
        y_true=labels,
        probs_uncalibrated=softmax(logits),
        probs_calibrated=calibrator.transform(logits),
        class_names=classes,
        positive_index=positive,
        operating_point=operating_point,
        groups=_groups(plan.records, config.report.subgroups),
        info=info,
        history=None if ensemble else first.history,
        title=info["title"],
        n_resamples=config.report.bootstrap,
        prevalence=config.report.prevalence,
        seed=tcfg.seed,
        site_shift=_site_shift(plan.before, model, device, plan.shift_loaders, plan.shift_sites, config) if plan.before is not None else None,
    )
    return TrainOutcome(run_dir=run_dir, bundle=bundle_dir, report=run_dir / "report" / "report.html", metrics=metrics,
                        training={**training, "evaluated_on": "test" if plan.loader is not None else "out-of-fold" if folds else "val",
                                  "calibration": calibrator.method})


def evaluate(
    bundle_path: str | Path,
    manifest: str | Path,
    out_dir: str | Path,
    *,
    batch_size: int = 16,
    num_workers: int = 2,
    subgroups: Sequence[str] | None = None,
    prevalence: float | None = None,
) -> dict[str, Any]:
    """Report a bundle's performance on a labelled manifest, with its stored calibration and
    operating point.  Unreadable scans are listed in ``errors.csv`` and left out of the metrics.
    ``subgroups`` and ``prevalence`` default to the training run's ``report`` settings."""
    predictor = bundles.load(bundle_path, device="cuda" if torch.cuda.is_available() else "cpu")
    records = [r for r in read_manifest(manifest, check_files=False) if r.label]  # a missing scan is excluded and listed, as in predict
    unknown = sorted({r.label for r in records} - set(predictor.classes))
    if unknown:
        raise ValueError(f"{manifest}: labels {unknown} are not classes of the bundle {predictor.classes}")
    if not records:
        raise ValueError(f"{manifest}: no labelled rows to evaluate")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_path = {str(r.image): r for r in records}
    kept, logits, failures = [], [], []
    for result in iter_logits(predictor, list(by_path), batch_size=batch_size, num_workers=num_workers):
        if result.error is not None:
            failures.append((result.image, result.error))
        else:
            kept.append(by_path[result.image])
            logits.append(result.logits)
    if failures:
        write_table(out_dir / "errors.csv", ERROR_COLUMNS, [dict(zip(ERROR_COLUMNS, f)) for f in failures])
    if not kept:
        raise ValueError(f"{manifest}: no scan could be read (see {out_dir / 'errors.csv'})")
    logits_arr = np.stack(logits)
    labels = np.array([predictor.classes.index(r.label) for r in kept])
    trained = load_config(Path(bundle_path) / BUNDLE_CONFIG)
    info = run_info(
        trained, predictor.meta, title=f"medtl evaluation: {predictor.meta['model']['backbone']} on {Path(manifest).name}",
        evaluated_on=f"{manifest} ({len(kept)} scans; {len(failures)} unreadable, left out)",
        recalibration=f"{predictor.meta['calibration'].get('method')} (stored in the bundle, fitted on the training run's validation split)",
        excluded=len(failures),
    )
    return write_report(
        out_dir,
        y_true=labels,
        probs_uncalibrated=softmax(logits_arr),
        probs_calibrated=predictor.calibrate(logits_arr),
        class_names=predictor.classes,
        positive_index=predictor.positive_index,
        operating_point=predictor.operating_point,
        groups=_groups(kept, trained.report.subgroups if subgroups is None else subgroups),
        info=info,
        title=info["title"],
        n_resamples=trained.report.bootstrap,
        prevalence=trained.report.prevalence if prevalence is None else prevalence,
    )
