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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from monai.utils import set_determinism

from medtl import bundle as bundles
from medtl.bundle.bundle import CONFIG_FILE as BUNDLE_CONFIG
from medtl.backbones import check_batch, create, preprocessing_for
from medtl.calibrate import make_calibrator
from medtl.config import AdaptConfig, Config, dump_config, load_config
from medtl.infer import ERROR_COLUMNS, iter_logits, write_table
from medtl.io import ScanReadError, ScanRecord, assign_splits, read_manifest, unreadable_scans
from medtl.metrics import OperatingPoint, choose_operating_point
from medtl.report import run_info, write_report
from medtl.train import (
    CHECKPOINT_FILE, FitResult, Trainer, class_weights, is_main, labelled_items, make_loader, micro_batch_size, resolve_classes,
    world_size,
)
from medtl.transforms import build_transforms, make_preprocessing
from medtl.adapt import NORMALIZATION_METHODS, TRAINING_METHODS, adapt_normalization, extract_features, make_domain_loss, make_strategy, site_shift

log = logging.getLogger(__name__)


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


def _softmax(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1).numpy()


def _partition_summary(parts: dict[str, list[ScanRecord]], classes: Sequence[str]) -> dict[str, Any]:
    """Counts and events per partition, and whether partitions share patients."""
    summary: dict[str, Any] = {}
    for name, records in parts.items():
        counts = {c: sum(r.label == c for r in records) for c in classes}
        summary[name] = {"scans": len(records), "patients": len({r.patient_id or str(r.image) for r in records}), "per_class": counts}
    patients = {name: {r.patient_id or str(r.image) for r in recs} for name, recs in parts.items()}
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


def _start_run(run_dir: Path, config: Config, resume: bool) -> None:
    """Record the resolved config and package versions in the run folder (rank 0 writes).  A
    resumed run must have the config it started with (exact resume depends on it)."""
    text = dump_config(config)
    if resume:
        if not (run_dir / CHECKPOINT_FILE).is_file():
            raise FileNotFoundError(f"cannot resume: {run_dir / CHECKPOINT_FILE} does not exist")
        stored, now = _flat(yaml.safe_load((run_dir / "config.yaml").read_text())), _flat(config.model_dump(mode="json"))
        changed = sorted(k for k in stored.keys() | now.keys() if stored.get(k) != now.get(k))
        if changed:
            raise ValueError(f"cannot resume {run_dir}: the config differs from the run's config.yaml in {', '.join(changed)}")
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main():
        (run_dir / "config.yaml").write_text(text)
        (run_dir / "versions.json").write_text(json.dumps(bundles.package_versions(), indent=2))


def _site_shift(before: np.ndarray, trainer: Trainer, loaders: Sequence, sites: Sequence[str], config: Config) -> dict:
    """Proxy A-distances and 2D embeddings of the evaluated (and target) scans' features, with the
    initial backbone and with the trained model."""
    after = extract_features(trainer.model, chain(*loaders), trainer.device)
    adapt = config.adapt.strategy + ("" if config.adapt.domain == "none" else f" + {config.adapt.domain}")
    return {
        "before": {**site_shift(before, sites, seed=config.train.seed), "label": f"initial backbone ({config.model.weights})"},
        "after": {**site_shift(after, sites, seed=config.train.seed), "label": f"trained model ({adapt})"},
    }


def train(config: Config, out_dir: str | Path, *, num_workers: int | None = None, resume: bool = False) -> TrainOutcome | None:
    """Train, calibrate and bundle a classifier as ``config`` says; write the report.

    ``resume``: continue the interrupted run in ``out_dir`` from its ``checkpoint.pt``.  Under
    torchrun every rank trains; rank 0 alone calibrates and writes bundle and report (the other
    ranks return None)."""
    run_dir = Path(out_dir)
    _start_run(run_dir, config, resume)
    data, tcfg = config.data, config.train
    if data.manifest is None:
        raise ValueError("data.manifest is not set (give it in the config or with --set data.manifest=PATH)")
    set_determinism(seed=tcfg.seed)
    started = time.perf_counter()

    records = assign_splits(read_manifest(data.manifest), val_fraction=data.val_fraction, seed=tcfg.seed)
    labelled = [r for r in records if r.label]
    targets = _target_records(records, config)
    classes = resolve_classes(labelled, data.classes)
    positive = _positive_index(classes, data.positive_class)
    parts = {name: [r for r in labelled if r.split == name] for name in ("train", "val", "test")}
    for name in ("train", "val"):
        if not parts[name]:
            raise ValueError(f"{data.manifest}: the '{name}' split is empty")
    parts = _readable({**{k: v for k, v in parts.items() if v}, "target": targets}, skip=data.skip_unreadable, run_dir=run_dir)
    targets = parts.pop("target", [])
    if not targets and _needs_targets(config.adapt):
        raise ValueError("none of the unlabelled target scans can be read")

    mcfg = config.model
    model = create(
        mcfg.backbone,
        weights=mcfg.weights,
        in_channels=mcfg.in_channels,
        spatial_dims=data.spatial_dims,
        num_classes=len(classes),
        allow_mismatch=mcfg.allow_mismatch,
    )
    pre = make_preprocessing(
        spatial_dims=data.spatial_dims,
        image_size=data.image_size or model.spec.default_input_size,
        channels=mcfg.in_channels,
        intensity=data.intensity,
        ct_window=data.ct_window,
        normalization=preprocessing_for(mcfg.backbone, mcfg.weights, in_channels=mcfg.in_channels),
        target_spacing=data.target_spacing,
        fit=data.fit,
    )
    workers = data.num_workers if num_workers is None else num_workers
    items = {name: labelled_items(recs, classes) for name, recs in parts.items()}
    batch_size = micro_batch_size(tcfg.batch_size, tcfg.accumulate, world_size())
    loader_args = dict(batch_size=batch_size, num_workers=workers, cache=data.cache, cache_dir=data.cache_dir, recipe=pre, seed=tcfg.seed)
    train_loader = make_loader(items["train"], build_transforms(pre, train=data.augment), shuffle=True, **loader_args)
    eval_transform = build_transforms(pre, train=False)
    eval_loaders = {name: make_loader(items[name], eval_transform, shuffle=False, **loader_args) for name in parts if name != "train"}

    acfg = config.adapt
    if acfg.domain in ("dann", "cdan") and acfg.selection == "source_val" and is_main():
        log.warning("adapt.domain=%s with source-validation model selection: adversarial alignment can scramble the "
                    "target site's classes while source validation stays high (docs/benchmarks.md, Domain adaptation); "
                    "check the bundle on a few labelled target scans with medtl evaluate, or try adapt.domain=adabn",
                    acfg.domain)
    target_items = [{"image": str(r.image), "label": -1} for r in targets]
    target_eval = make_loader(target_items, eval_transform, shuffle=False, **loader_args) if targets else None
    target_train = None
    if acfg.domain in TRAINING_METHODS:
        target_train = make_loader(target_items, build_transforms(pre, train=data.augment), shuffle=True, **loader_args)

    report_split = "test" if "test" in eval_loaders else "val"
    shift_loaders = [eval_loaders[report_split]] + ([target_eval] if target_eval is not None else [])
    shift_sites = [r.site or "source" for r in parts[report_split]] + [r.site for r in targets]  # labelled = source
    diagnose_shift = is_main() and len(set(shift_sites)) > 1
    if diagnose_shift:
        before = extract_features(model, chain(*shift_loaders))

    warning = check_batch(next(iter(eval_loaders["val"]))["image"], pre["normalization"])
    if warning:
        log.warning("%s", warning)
    weights = class_weights(items["train"], len(classes)) if tcfg.class_weighted else None
    domain = make_domain_loss(acfg.domain, model.feature_dim, len(classes), weight=acfg.domain_weight, entropy_conditioning=acfg.cdan_entropy)
    trainer = Trainer(model, make_strategy(acfg), tcfg, class_weights=weights, domain=domain, selection=acfg.selection)
    fit = trainer.fit(
        train_loader, eval_loaders["val"], target_loader=target_train, target_eval_loader=target_eval, log_path=run_dir / "train_log.csv",
        checkpoint=run_dir / CHECKPOINT_FILE, resume=resume,
    )
    if not is_main():
        return None
    # Calibration, threshold and the report's figures come from the labelled source scans through the
    # model as trained.  AdaBN/TENT run after them: they re-normalise with the target site's
    # statistics so that target features look like source features did, which is what lets the
    # source-fitted calibrator hold at the target (fitting it on source scans pushed through target
    # statistics gave target ECE 0.30-0.45 instead of 0.06-0.07 in docs/benchmarks.md).
    val_logits, val_labels = trainer.predict_logits(eval_loaders["val"])
    calibrator = make_calibrator(config.calibration.method, len(classes)).fit(val_logits, val_labels)
    operating_point: OperatingPoint | None = None
    if positive is not None:
        opcfg = config.operating_point
        scores = calibrator.transform(val_logits)[:, positive]
        operating_point = choose_operating_point((val_labels == positive).astype(int), scores, opcfg.method, opcfg.target)

    if report_split == "val":
        logits, labels = val_logits, val_labels
        evaluation = "internal validation split (also used for model selection, calibration and the threshold: optimistic)"
    else:
        logits, labels = trainer.predict_logits(eval_loaders["test"])
        evaluation = "held-out test split of the training manifest (internal)"
    if target_eval is not None and acfg.domain in NORMALIZATION_METHODS:
        adapt_normalization(trainer.model, acfg.domain, target_eval, tent_lr=acfg.tent_lr, tent_steps=acfg.tent_steps, device=trainer.device)
        evaluation += (f"; figures of the model before its {acfg.domain} step, which re-normalises with the target scans' "
                       "statistics: the bundle holds the adapted model, for the target site (check it there with medtl evaluate)")

    model_spec = {
        "backbone": mcfg.backbone,
        "in_channels": mcfg.in_channels,
        "spatial_dims": data.spatial_dims,
        "num_classes": len(classes),
        "weights": mcfg.weights,
    }
    partitions = _partition_summary(parts, classes)
    training = {
        "best_epoch": fit.best_epoch,
        "best_val_auroc": fit.best_auroc,
        "epochs_run": len(fit.history),
        "selection": fit.selection,
        "adaptation": {"strategy": acfg.strategy, "domain": acfg.domain, "target_scans": len(targets)},
        "seconds": round(time.perf_counter() - started, 1),
        "partitions": partitions,
    }
    bundle_dir = bundles.save(
        run_dir / "bundle",
        trainer.model,
        model_spec=model_spec,
        classes=classes,
        positive_index=positive,
        preprocessing=pre,
        calibrator=calibrator,
        operating_point=operating_point,
        config_yaml=dump_config(config),
        training=training,
    )

    info = run_info(config, bundles.read_meta(bundle_dir), title=f"medtl training report: {mcfg.backbone}", evaluated_on=evaluation,
                    recalibration=f"{calibrator.method} fitted on the validation split ({len(val_labels)} scans)",
                    model_selection=_selection_text(fit, tcfg.patience))
    metrics = write_report(
        run_dir / "report",
        y_true=labels,
        probs_uncalibrated=_softmax(logits),
        probs_calibrated=calibrator.transform(logits),
        class_names=classes,
        positive_index=positive,
        operating_point=operating_point,
        groups=_groups(parts[report_split], config.report.subgroups),
        info=info,
        history=fit.history,
        title=info["title"],
        n_resamples=config.report.bootstrap,
        prevalence=config.report.prevalence,
        seed=tcfg.seed,
        site_shift=_site_shift(before, trainer, shift_loaders, shift_sites, config) if diagnose_shift else None,
    )
    return TrainOutcome(run_dir=run_dir, bundle=bundle_dir, report=run_dir / "report" / "report.html", metrics=metrics,
                        training={**training, "evaluated_on": report_split, "calibration": calibrator.method})


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
        probs_uncalibrated=_softmax(logits_arr),
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
