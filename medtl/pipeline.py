"""The two end-to-end jobs that join every stage: train a bundle, and evaluate one.

``train`` runs typed stages, each a function here: :func:`prepare_data` (manifest, splits,
the task: its classes or findings, target scans) and :func:`preprocessing` -> :func:`fit_members` (build and fine-tune each
ensemble member) -> :func:`calibrate` (calibrator and operating point) -> :func:`score_report_scans`
-> :func:`adapt_after_training` (AdaBN/TENT) -> :func:`save_bundle` -> :func:`write_training_report`.
``evaluate`` replays a bundle on any labelled manifest; both reports describe the run with one
:class:`~medtl.report.RunInfo`, in the layout of the run's :class:`~medtl.tasks.Task`.  Batch prediction lives in :mod:`medtl.infer`.
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
from medtl.config import AdaptConfig, Config, dump_config, load_config
from medtl.infer import ERROR_COLUMNS, iter_logits, write_table
from medtl.io import ScanReadError, ScanRecord, assign_splits, read_manifest, unreadable_scans
from medtl.recipe import fingerprint, resolve_recipe
from medtl.report import RunInfo, write_head_index, write_multilabel_report, write_report
from medtl.train import (
    CHECKPOINT_FILE, FitResult, Trainer, is_main, make_loader, micro_batch_size, predict_logits, resolve_device, world_size,
)
from medtl.train.distributed import broadcast, one_per_rank, rank
from medtl.train import Member, cross_validation_members, seed_members
from medtl.tasks import FittedCalibrator, MultiTask, Task, make_task, task_from_meta, task_type
from medtl.transforms import build_transforms, make_preprocessing
from medtl.adapt import DOMAIN_LOSSES, NORMALIZATION, adapt_normalization, make_domain_loss, make_strategy, site_shift

log = logging.getLogger(__name__)
VAL_LOGITS = "val_logits.safetensors"  # an ensemble member's scores on its validation (out-of-fold) scans
MEMBER_FILE = "member.json"  # written last: the member in this folder is finished
UNNORMALISED = {"kind": "mean_std", "mean": 0.0, "std": 1.0}  # intensities in [0, 1], for a consumer that normalises itself


@dataclass
class TrainOutcome:
    """Where a training run put its results, and the headline figures."""

    run_dir: Path
    bundle: Path
    report: Path
    metrics: dict[str, Any]
    training: dict[str, Any] = field(default_factory=dict)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities: the form an :class:`~medtl.backbones.Ensemble` outputs, so a calibrator
    fitted on members' out-of-fold log-probabilities applies to the ensemble's output."""
    return torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1).numpy()


def _partition_summary(parts: dict[str, list[ScanRecord]], task: Task) -> dict[str, Any]:
    """Counts and events (per class, or positives per finding) per partition, and whether partitions share patients."""
    summary: dict[str, Any] = {}
    for name, records in parts.items():
        counts = task.counts(records)
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


def _start_run(run_dir: Path, config: Config, resume: bool, recipe: dict[str, Any] | None) -> None:
    """Record the resolved config, the recipe's choices, package versions and thread budget in the run
    folder (rank 0 writes).  A resumed run must have the config it started with (exact resume depends on it)."""
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
        if recipe is not None:
            (run_dir / "recipe.json").write_text(json.dumps(recipe, indent=2))


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


def _members(parts: dict[str, list[ScanRecord]], tcfg, task: Task) -> list[Member]:
    """The models to train: one on the train/val split, ``train.seeds`` on it, or ``train.folds``
    cross-validation folds over the train and val rows together (ensembles: tasks whose outputs pool)."""
    folds = tcfg.folds or 1
    if folds > 1 and tcfg.seeds > 1:
        raise ValueError(f"train.folds={folds} and train.seeds={tcfg.seeds}: choose a cross-validation or a seed ensemble")
    if not task.ensembles and (folds > 1 or tcfg.seeds > 1):
        raise ValueError(f"task.type={task.name} trains one model: ensembles (train.folds={tcfg.folds}, train.seeds={tcfg.seeds}) "
                         "pool single-label outputs; set train.folds=1 and train.seeds=1")
    if folds > 1:
        return cross_validation_members(parts["train"] + parts["val"], folds, tcfg.seed)
    return seed_members(parts["train"], parts["val"], tcfg.seeds, tcfg.seed)


@dataclass
class RunData:
    """Stage 1's output: the task (its classes, or findings, and the positive class of a binary
    task), the labelled partitions (``train``, ``val``, and ``test`` when the manifest has test
    rows) and the unlabelled target scans."""

    task: Task
    parts: dict[str, list[ScanRecord]]
    targets: list[ScanRecord]

    @property
    def classes(self) -> list[str]:
        return self.task.names

    @property
    def positive(self) -> int | None:
        return self.task.positive_index


def read_records(config: Config) -> list[ScanRecord]:
    """The manifest's rows as ``task.type`` reads them, each labelled one in its patient-level split
    (``data.val_fraction``)."""
    data = config.data
    if data.manifest is None:
        raise ValueError("data.manifest is not set (give it in the config or with --set data.manifest=PATH)")
    records = task_type(config.task.type, config.task.heads).read(data.manifest, data.classes)
    return assign_splits(records, val_fraction=data.val_fraction, seed=config.train.seed)


def prepare_data(config: Config, records: Sequence[ScanRecord]) -> RunData:
    """Stage 1: task, partitions and target scans of ``records`` (from :func:`read_records`);
    an empty training or validation split is an error."""
    data = config.data
    labelled = [r for r in records if r.label]
    targets = _target_records(records, config)
    task = make_task(config.task.type, labelled, data.classes, data.positive_class, config.task.heads)
    parts = {name: [r for r in labelled if r.split == name] for name in ("train", "val", "test")}
    for name in ("train", "val"):
        if not parts[name]:
            raise ValueError(f"{data.manifest}: the '{name}' split is empty")
    return RunData(task, {k: v for k, v in parts.items() if v}, targets)


def _screen(data: RunData, members: Sequence[Member], config: Config, run_dir: Path) -> tuple[RunData, list[Member]]:
    """Check every scan before training (:func:`_readable`) and leave the unreadable ones out of the
    partitions, the target scans and each member."""
    parts = _readable({**data.parts, "target": data.targets}, skip=config.data.skip_unreadable, run_dir=run_dir)
    targets = parts.pop("target", [])
    if not targets and _needs_targets(config.adapt):
        raise ValueError("none of the unlabelled target scans can be read")
    readable = {str(r.image) for recs in parts.values() for r in recs}
    kept = [replace(m, train=[r for r in m.train if str(r.image) in readable], val=[r for r in m.val if str(r.image) in readable])
            for m in members]
    return replace(data, parts=parts, targets=targets), kept


def preprocessing(config: Config, *, image_size: Sequence[int] | int | None = None,
                  normalization: dict[str, Any] | None = None) -> dict[str, Any]:
    """Stage 1: the preprocessing recipe ``config`` gives; by default at the backbone's input size and
    with its weights' normalisation (``UNNORMALISED`` for a consumer that normalises itself, like LogME)."""
    data, mcfg = config.data, config.model
    return make_preprocessing(
        spatial_dims=data.spatial_dims,
        image_size=image_size or data.image_size or get_spec(mcfg.backbone, data.spatial_dims).default_input_size,
        channels=mcfg.in_channels,
        intensity=data.intensity,
        ct_window=data.ct_window,
        normalization=normalization or preprocessing_for(mcfg.backbone, mcfg.weights, in_channels=mcfg.in_channels),
        target_spacing=data.target_spacing,
        fit=data.fit,
    )


@dataclass
class FittedMember:
    """A trained member: its model, fit history, and its validation part's logits and labels
    (out-of-fold for cross-validation members)."""

    member: Member
    model: torch.nn.Module
    fit: FitResult
    val_logits: np.ndarray | None
    val_labels: np.ndarray | None


class TrainingRun:
    """What every member of one training run shares: the task, preprocessing, loader settings,
    target scans and the run folder."""

    def __init__(self, config: Config, run_dir: Path, task: Task, targets: list[ScanRecord], workers: int,
                 resume: bool) -> None:
        self.config, self.run_dir, self.task, self.targets, self.resume = config, run_dir, task, targets, resume
        data = config.data
        self.pre = preprocessing(config)
        self.loader_args = dict(num_workers=workers, cache=data.cache, cache_dir=data.cache_dir, recipe=self.pre)
        self.eval_transform = build_transforms(self.pre, train=False)
        self.train_transform = build_transforms(self.pre, train=data.augment)
        target_items = [{"image": str(r.image), "label": -1} for r in targets]
        self.target_items = target_items
        self.target_eval = self.loader(target_items, train=False) if targets else None

    def loader(self, items: list[dict], *, train: bool, seed: int | None = None, cache: str | None = None):
        """A loader over ``items``; its batch is this rank's share of ``train.batch_size`` (all of
        it when the rank trains a member on its own); ``cache`` overrides ``data.cache``."""
        tcfg = self.config.train
        transform = self.train_transform if train else self.eval_transform
        args = {**self.loader_args, "cache": cache or self.loader_args["cache"]}
        return make_loader(items, transform, shuffle=train, seed=tcfg.seed if seed is None else seed,
                           batch_size=micro_batch_size(tcfg.batch_size, tcfg.accumulate, world_size()), **args)

    def model(self) -> torch.nn.Module:
        """Build the configured backbone with a new head of the task's outputs."""
        mcfg, data = self.config.model, self.config.data
        return create(mcfg.backbone, weights=mcfg.weights, in_channels=mcfg.in_channels, spatial_dims=data.spatial_dims,
                      num_classes=self.task.outputs, allow_mismatch=mcfg.allow_mismatch, inflation=mcfg.inflation)

    def fit(self, member: Member, folder: Path, *, keep: bool = False) -> FittedMember:
        """Train one member (or, resuming, read it back when it finished before); ``keep``: save the
        finished member in ``folder`` so that a resumed run skips it."""
        config, acfg = self.config, self.config.adapt
        tcfg = config.train.model_copy(update={"seed": member.seed})
        if self.finished(folder):
            return self.read_back(member, folder)
        set_determinism(seed=member.seed)
        model = self.model()
        val_loader = self.loader(self.task.items(member.val), train=False)
        folder.mkdir(parents=True, exist_ok=True)
        train_items = self.task.items(member.train)
        train_loader = self.loader(train_items, train=True, seed=member.seed)
        target_train = self.loader(self.target_items, train=True, seed=member.seed) if acfg.domain in DOMAIN_LOSSES else None
        warning = check_batch(next(iter(val_loader))["image"], self.pre["normalization"])
        if warning:
            log.warning("%s", warning)
        loss = self.task.loss(train_items if tcfg.class_weighted else None)
        domain = make_domain_loss(acfg.domain, model.feature_dim, self.task.outputs, weight=acfg.domain_weight,
                                  entropy_conditioning=acfg.cdan_entropy)
        trainer = Trainer(model, make_strategy(acfg), tcfg, task=self.task, loss=loss, domain=domain, selection=acfg.selection)
        fit = trainer.fit(train_loader, val_loader, target_loader=target_train, target_eval_loader=self.target_eval,
                          log_path=folder / "train_log.csv", checkpoint=folder / CHECKPOINT_FILE, resume=self.resume and (folder / CHECKPOINT_FILE).is_file())
        if not is_main():
            return FittedMember(member, trainer.model, fit, None, None)
        logits, labels = predict_logits(trainer.model, val_loader, amp_dtype=trainer.amp_dtype, memory_format=trainer.memory_format)
        fitted = FittedMember(member, trainer.model, fit, logits, labels)
        if keep:
            self.keep(fitted, folder)
        return fitted

    def finished(self, folder: Path) -> bool:
        """Resuming, and the member in ``folder`` finished before."""
        return self.resume and all((folder / name).is_file() for name in (MEMBER_FILE, "model.safetensors", VAL_LOGITS))

    def read_back(self, member: Member, folder: Path) -> FittedMember:
        """A finished member from ``folder``: weights, fit history and validation scores as scored
        after training (so a resumed run refits the same calibrator)."""
        model = self.model()
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        scored = load_file(str(folder / VAL_LOGITS))
        log.info("member %s: finished before, read back from %s", member.name, folder)
        fit = FitResult(**json.loads((folder / MEMBER_FILE).read_text())["fit"])
        return FittedMember(member, model.to(resolve_device(self.config.train.device)), fit, scored["logits"].numpy(),
                            scored["labels"].numpy())

    def keep(self, fitted: FittedMember, folder: Path) -> None:
        """Save a finished member in ``folder``; ``member.json``, written last, marks it finished
        (and its training checkpoint goes: nothing in it is still needed)."""
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in fitted.model.state_dict().items()}, str(folder / "model.safetensors"))
        save_file({"logits": torch.from_numpy(fitted.val_logits).contiguous(), "labels": torch.from_numpy(fitted.val_labels).contiguous()},
                  str(folder / VAL_LOGITS))
        member = fitted.member
        (folder / MEMBER_FILE).write_text(json.dumps({"name": member.name, "seed": member.seed, "fit": asdict(fitted.fit)}))
        (folder / CHECKPOINT_FILE).unlink(missing_ok=True)  # the member's weights are kept above; resume reads them back


def _member_summary(fitted: Sequence[FittedMember]) -> dict[str, Any]:
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


def _feature_reference(run: TrainingRun, model: torch.nn.Module, first: Member, device) -> FeatureReference | None:
    """The shift alarm's reference, in the feature space of the (first) member: its training scans
    and the validation scans it never trained on (an ensemble's features are its first member's)."""
    def loader(records: list[ScanRecord]):
        return run.loader(run.task.items(records), train=False, cache="none")
    return bundles.reference_of(model, loader(first.train), loader(first.val), device=device, seed=run.config.train.seed)


@dataclass
class ReportPlan:
    """What the training report is computed on: the manifest's test rows when it has them (scored
    after training through ``loader``), else the calibration scans (out-of-fold or validation);
    and the features of those scans (plus target scans) before training, for the site-shift section."""

    records: list[ScanRecord]
    loader: Any | None
    shift_loaders: list
    shift_sites: list[str]
    before: np.ndarray | None


def report_plan(run: TrainingRun, parts: dict[str, list[ScanRecord]], members: Sequence[Member]) -> ReportPlan:
    """Before training: the report's scans, and with more than one site their features through the
    initial backbone."""
    folds = len(members) > 1 and (run.config.train.folds or 1) > 1
    records = parts["test"] if "test" in parts else [r for m in members for r in m.val] if folds else parts["val"]
    loader = run.loader(run.task.items(records), train=False)
    sites = [r.site or "source" for r in records] + [r.site for r in run.targets]  # labelled = source
    shift_loaders = [loader] + ([run.target_eval] if run.target_eval else [])
    before = None
    if is_main() and len(set(sites)) > 1:
        set_determinism(seed=run.config.train.seed)
        before, _ = extract_features(run.model(), chain(*shift_loaders))
    return ReportPlan(records, loader if "test" in parts else None, shift_loaders, sites, before)




def fit_members(run: TrainingRun, members: Sequence[Member]) -> list[FittedMember]:
    """Stage 3: train every member; an ensemble's in ``RUN_DIR/members/NAME``, each kept there once
    finished so that a resumed run reads it back.  Under torchrun with at least as many ranks as
    members each rank trains one member on its own; with fewer, members train one after another,
    each data-parallel over all ranks.  Rank 0 returns every member, the other ranks what they
    trained (nothing when one member per rank)."""
    ensemble = len(members) > 1
    if ensemble and world_size() >= len(members):
        return _fit_one_member_per_rank(run, members)
    fitted = []
    for i, member in enumerate(members):
        if ensemble and is_main():
            log.info("member %d of %d (%s): %d training, %d validation scans", i + 1, len(members), member.name,
                     len(member.train), len(member.val))
        folder = run.run_dir / "members" / member.name if ensemble else run.run_dir
        fitted.append(run.fit(member, folder, keep=ensemble))
    return fitted


def _fit_one_member_per_rank(run: TrainingRun, members: Sequence[Member]) -> list[FittedMember]:
    """Rank k trains the k-th unfinished member alone and sends its weights, fit history and
    validation scores to rank 0, which keeps every member in its folder (rank 0 decides what is
    finished, so resuming works without a disk shared between nodes)."""
    folders = {m.name: run.run_dir / "members" / m.name for m in members}
    todo = broadcast([m for m in members if not run.finished(folders[m.name])])
    me = rank()

    def work(member: Member) -> tuple[dict[str, torch.Tensor], FitResult, np.ndarray | None, np.ndarray | None]:
        log.info("member %s on rank %d: %d training, %d validation scans", member.name, me, len(member.train), len(member.val))
        fitted = run.fit(member, folders[member.name])
        return {k: v.detach().cpu() for k, v in fitted.model.state_dict().items()}, fitted.fit, fitted.val_logits, fitted.val_labels

    trained = one_per_rank(todo, work)
    if trained is None:
        return []
    device = resolve_device(run.config.train.device)
    done = {}
    for member, (state, fit, logits, labels) in zip(todo, trained):
        model = run.model()
        model.load_state_dict(state)
        done[member.name] = FittedMember(member, model.to(device), fit, logits, labels)
        run.keep(done[member.name], folders[member.name])
    return [done.get(m.name) or run.read_back(m, folders[m.name]) for m in members]


def _cross_validated(config: Config, members: int) -> bool:
    return members > 1 and (config.train.folds or 1) > 1


def _warn_adversarial(acfg: AdaptConfig) -> None:
    if acfg.domain in ("dann", "cdan") and acfg.selection == "source_val" and is_main():
        log.warning("adapt.domain=%s with source-validation model selection: adversarial alignment can scramble the "
                    "target site's classes while source validation stays high (docs/benchmarks.md, Domain adaptation); "
                    "check the bundle on a few labelled target scans with medtl evaluate, or try adapt.domain=adabn",
                    acfg.domain)


@dataclass
class Calibration:
    """Stage 4's output: the calibrator, the decision rule (the operating point of a binary task, one
    per finding of a multi-label one, None for argmax), and the scans both were fitted on, which no
    member trained on: their logits, labels, and a phrase for the report."""

    calibrator: FittedCalibrator
    operating_point: Any
    logits: np.ndarray
    labels: np.ndarray
    fitted_on: str


def calibrate(config: Config, fitted: Sequence[FittedMember], model: torch.nn.Module, classes: Sequence[str],
              positive: int | None, task: Task | None = None) -> Calibration:
    """Stage 4: fit ``calibration.method`` and choose the operating point on the pooled out-of-fold
    predictions (cross-validation), else on the validation split through the whole model.  ``task``
    gives the calibrator family and the decision rule (default: binary with ``positive``, else
    multi-class over ``classes``)."""
    task = task if task is not None else task_from_meta({"classes": list(classes), "positive_index": positive})
    if _cross_validated(config, len(fitted)):
        logits = np.concatenate([_log_softmax(f.val_logits) for f in fitted])
        labels = np.concatenate([f.val_labels for f in fitted])
        fitted_on = f"the pooled out-of-fold predictions ({len(labels)} scans)"
    else:
        logits = (pool_members(torch.from_numpy(np.stack([f.val_logits for f in fitted])).double(), model.combine).numpy()
                  if len(fitted) > 1 else fitted[0].val_logits)
        labels = fitted[0].val_labels
        fitted_on = f"the validation split ({len(labels)} scans)"
    calibrator = task.calibrator(config.calibration.method).fit(logits, labels)
    opcfg = config.operating_point
    operating_point = task.choose_decision(labels, calibrator.transform(logits), opcfg.method, opcfg.target)
    return Calibration(calibrator, operating_point, logits, labels, fitted_on)


@dataclass
class Scored:
    """The report's scans through the trained model (before any adaptation after training): their
    logits and labels, which scans they are (``kind``: test, out-of-fold or val), and in words."""

    logits: np.ndarray
    labels: np.ndarray
    kind: str
    evaluated_on: str


def score_report_scans(plan: ReportPlan, model: torch.nn.Module, device, calibration: Calibration, folds: int) -> Scored:
    """Score the manifest's test rows; without them the report reuses the calibration scans
    (``folds``: the number of cross-validation members, 0 for none) and says why it is optimistic."""
    if plan.loader is not None:
        logits, labels = predict_logits(model, plan.loader, device)
        return Scored(logits, labels, "test", "held-out test split of the training manifest (internal)")
    if folds:
        return Scored(calibration.logits, calibration.labels, "out-of-fold",
                      f"pooled out-of-fold predictions of the {folds} cross-validation members (each scan scored by the "
                      "member that did not train on it; the calibrator and threshold were fitted on these predictions too, "
                      "so the calibration figures are optimistic)")
    return Scored(calibration.logits, calibration.labels, "val",
                  "internal validation split (also used for model selection, calibration and the threshold: optimistic)")


def adapt_after_training(run: TrainingRun, model: torch.nn.Module, device) -> str:
    """Stage 5: with ``adapt.domain`` a normalisation method and target scans, re-normalise ``model``
    on them (after calibration, in the source regime the calibrator was fitted in); returns what the
    report adds to its 'evaluated on' ('' when nothing was done)."""
    acfg = run.config.adapt
    if run.target_eval is None or acfg.domain not in NORMALIZATION:
        return ""
    adapt_normalization(model, acfg.domain, run.target_eval, tent_lr=acfg.tent_lr, tent_steps=acfg.tent_steps, device=device)
    return (f"; figures of the model before its {acfg.domain} step, which re-normalises with the target scans' "
            "statistics: the bundle holds the adapted model, for the target site (check it there with medtl evaluate)")


def training_summary(run: TrainingRun, data: RunData, fitted: Sequence[FittedMember], recipe: dict[str, Any] | None,
                     started: float) -> dict[str, Any]:
    """The ``training`` record of ``bundle.json``: kept epoch, adaptation, time, partitions,
    ensemble members and recipe."""
    acfg, first = run.config.adapt, fitted[0].fit
    folds = _cross_validated(run.config, len(fitted))
    return {
        "best_epoch": first.best_epoch,
        "best_val_auroc": first.best_auroc,
        "epochs_run": len(first.history),
        "selection": first.selection,
        "adaptation": {"strategy": acfg.strategy, "domain": acfg.domain, "target_scans": len(run.targets)},
        "seconds": round(time.perf_counter() - started, 1),
        "partitions": _partition_summary(data.parts, data.task),
        **({"ensemble": {"kind": f"{len(fitted)}-fold cross-validation" if folds else f"{len(fitted)} seeds",
                         **_member_summary(fitted)}} if len(fitted) > 1 else {}),
        **({"recipe": recipe} if recipe is not None else {}),
    }


def save_bundle(run: TrainingRun, model: torch.nn.Module, fitted: Sequence[FittedMember], calibration: Calibration,
                training: dict[str, Any]) -> Path:
    """Stage 6: write ``RUN_DIR/bundle`` (with the shift alarm's feature reference); returns its path."""
    config = run.config
    model_spec = {
        "backbone": config.model.backbone,
        "in_channels": config.model.in_channels,
        "spatial_dims": config.data.spatial_dims,
        "num_classes": run.task.outputs,
        "weights": config.model.weights,
        **({"members": len(fitted), "combine": model.combine} if len(fitted) > 1 else {}),
    }
    return bundles.save(
        run.run_dir / "bundle",
        model,
        model_spec=model_spec,
        classes=run.task.names,
        positive_index=run.task.positive_index,
        preprocessing=run.pre,
        calibrator=calibration.calibrator,
        operating_point=calibration.operating_point,
        task=run.task,
        config_yaml=dump_config(config),
        training=training,
        reference=_feature_reference(run, model, fitted[0].member, device=next(model.parameters()).device),
    )


def _write_report(task: Task, out_dir: Path, *, decision: Any, **common: Any) -> dict[str, Any]:
    """The report in ``task``'s layout: :func:`write_report` for single-label tasks (``decision``: the
    operating point), :func:`write_multilabel_report` for ``per_label`` ones (an operating point per finding)."""
    if task.report_layout == "per_head":
        return _write_head_reports(task, out_dir, decision=decision, **common)
    if task.report_layout == "per_label":
        return write_multilabel_report(out_dir, label_names=task.names, operating_points=decision, **common)
    return write_report(out_dir, class_names=task.names, positive_index=task.positive_index, operating_point=decision, **common)


def _write_head_reports(task: MultiTask, out_dir: Path, *, decision: Any, y_true: np.ndarray, probs_uncalibrated: np.ndarray,
                        probs_calibrated: np.ndarray, groups: dict[str, list[str]] | None, title: str, **common: Any) -> dict[str, Any]:
    """A multi-task model's report: each head's own report in ``out_dir/<head>`` on the scans where
    it is known, and an index of the heads."""
    reports = {}
    for head in task.heads:
        known = head.known(y_true)
        reports[head.name] = _write_report(
            head.task, out_dir / head.name, decision=(decision or {}).get(head.name), y_true=head.labels(y_true[known]),
            probs_uncalibrated=probs_uncalibrated[known][:, head.outputs], probs_calibrated=probs_calibrated[known][:, head.outputs],
            groups={k: [v for v, keep in zip(values, known) if keep] for k, values in groups.items()} if groups else None,
            title=f"{title}: head '{head.name}'", **common)
    return write_head_index(out_dir, reports, title=title, weights={h.name: h.weight for h in task.heads}, info=common.get("info"))


def write_training_report(run: TrainingRun, info: RunInfo, plan: ReportPlan, model: torch.nn.Module, fitted: Sequence[FittedMember],
                          calibration: Calibration, scored: Scored, adapted: str) -> dict[str, Any]:
    """Stage 7: ``RUN_DIR/report`` on the scored scans (``adapted``: stage 5's note); returns its metrics."""
    config, first, ensemble = run.config, fitted[0].fit, len(fitted) > 1
    selection = (_selection_text(first, config.train.patience) if not ensemble else
                 f"each member: best epoch by its own validation part ({first.selection}); early stopping patience {config.train.patience}")
    kind = f" ({info.training['ensemble']['kind']} ensemble)" if ensemble else ""
    report_info = info.report(title=f"medtl training report: {info.backbone}{kind}", evaluated_on=scored.evaluated_on + adapted,
                              recalibration=f"{calibration.calibrator.method} fitted on {calibration.fitted_on}",
                              model_selection=selection)
    device = next(model.parameters()).device
    return _write_report(
        run.task,
        run.run_dir / "report",
        y_true=scored.labels,
        probs_uncalibrated=run.task.probabilities(scored.logits),
        probs_calibrated=calibration.calibrator.transform(scored.logits),
        decision=calibration.operating_point,
        groups=_groups(plan.records, config.report.subgroups),
        info=report_info,
        history=None if ensemble else first.history,
        title=report_info["title"],
        n_resamples=config.report.bootstrap,
        prevalence=config.report.prevalence,
        seed=config.train.seed,
        site_shift=_site_shift(plan.before, model, device, plan.shift_loaders, plan.shift_sites, config) if plan.before is not None else None,
    )


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
    started = time.perf_counter()
    records = read_records(config)
    config, recipe = _configure(config, [r for r in records if r.label and r.split != "test"])
    data = prepare_data(config, records)
    members = _members(data.parts, config.train, data.task)
    _start_run(run_dir, config, resume, recipe)
    data, members = _screen(data, members, config, run_dir)
    workers = config.data.num_workers if num_workers is None else num_workers
    run = TrainingRun(config, run_dir, data.task, data.targets, workers, resume)
    _warn_adversarial(config.adapt)
    plan = report_plan(run, data.parts, members)
    fitted = fit_members(run, members)
    if not is_main():
        return None
    return _finish(run, data, fitted, recipe, plan, started)


def _finish(run: TrainingRun, data: RunData, fitted: list[FittedMember], recipe: dict[str, Any] | None, plan: ReportPlan,
            started: float) -> TrainOutcome:
    """Stages 4 to 7 (rank 0): calibrate and choose the threshold, score the report's scans, adapt
    after training, save the bundle, write the report."""
    model = Ensemble([f.model for f in fitted]) if len(fitted) > 1 else fitted[0].model
    device = next(model.parameters()).device
    calibration = calibrate(run.config, fitted, model, data.classes, data.positive, data.task)
    folds = len(fitted) if _cross_validated(run.config, len(fitted)) else 0
    scored = score_report_scans(plan, model, device, calibration, folds)
    adapted = adapt_after_training(run, model, device)
    training = training_summary(run, data, fitted, recipe, started)
    bundle_dir = save_bundle(run, model, fitted, calibration, training)
    info = RunInfo.of(run.config, bundles.read_meta(bundle_dir))
    metrics = write_training_report(run, info, plan, model, fitted, calibration, scored, adapted)
    return TrainOutcome(run_dir=run.run_dir, bundle=bundle_dir, report=run.run_dir / "report" / "report.html", metrics=metrics,
                        training={**training, "evaluated_on": scored.kind, "calibration": calibration.calibrator.method})


def _score_manifest(predictor: bundles.Predictor, records: Sequence[ScanRecord], batch_size: int,
                    num_workers: int) -> tuple[list[ScanRecord], np.ndarray | None, list[tuple[str, str]]]:
    """The readable scans of ``records`` with their logits, and the failures (image, error)."""
    by_path = {str(r.image): r for r in records}
    kept, logits, failures = [], [], []
    for result in iter_logits(predictor, list(by_path), batch_size=batch_size, num_workers=num_workers):
        if result.error is not None:
            failures.append((result.image, result.error))
        else:
            kept.append(by_path[result.image])
            logits.append(result.logits)
    return kept, np.stack(logits) if logits else None, failures


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
    info = RunInfo.of(load_config(Path(bundle_path) / BUNDLE_CONFIG), predictor.meta)
    task = predictor.task
    # a missing scan is excluded and listed, as in predict; a label that is not one of the bundle's classes is an error
    records = [r for r in task.read(manifest, task.names, check_files=False) if r.label]
    if not records:
        raise ValueError(f"{manifest}: no labelled rows to evaluate")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kept, logits, failures = _score_manifest(predictor, records, batch_size, num_workers)
    if failures:
        write_table(out_dir / "errors.csv", ERROR_COLUMNS, [dict(zip(ERROR_COLUMNS, f)) for f in failures])
    if logits is None:
        raise ValueError(f"{manifest}: no scan could be read (see {out_dir / 'errors.csv'})")
    report_info = info.report(
        title=f"medtl evaluation: {info.backbone} on {Path(manifest).name}",
        evaluated_on=f"{manifest} ({len(kept)} scans; {len(failures)} unreadable, left out)",
        recalibration=f"{info.calibration} (stored in the bundle, fitted on the training run's validation split)",
        excluded=len(failures),
    )
    report = info.config.report
    return _write_report(
        task,
        out_dir,
        y_true=task.targets(kept),
        probs_uncalibrated=task.probabilities(logits),
        probs_calibrated=predictor.calibrate(logits),
        decision=predictor.operating_point,
        groups=_groups(kept, report.subgroups if subgroups is None else subgroups),
        info=report_info,
        title=report_info["title"],
        n_resamples=report.bootstrap,
        prevalence=report.prevalence if prevalence is None else prevalence,
    )
