"""``medtl train CONFIG.yaml``: train, calibrate and bundle a classifier, and write its report.

Under ``torchrun --nproc_per_node=N -m medtl train CONFIG`` the same command trains on N
processes (DDP); ``--resume RUN_DIR`` continues an interrupted run from its checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

from medtl.config import load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="Train a classifier from a YAML config.",
        description="Fine-tune a pretrained backbone on a manifest of scans (recipe: auto chooses every training value "
        "you leave unset from a fingerprint of the data, and for up to 10,000 labelled scans a 5-fold cross-validation "
        "ensemble), calibrate it on scans no member trained on, choose the operating point, and write RUN_DIR/bundle/, "
        "RUN_DIR/report/, RUN_DIR/recipe.json and the training logs. Runs data-parallel when started by torchrun "
        "(see docs/training.md and docs/recipe.md).",
    )
    p.add_argument("config", type=Path, nargs="?", default=None,
                   help="YAML config (see configs/; optional: with recipe: auto, the default, every training value left "
                   "unset is chosen from the data, so --set data.manifest=PATH is enough).")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Override a config field, e.g. --set train.epochs=5 --set model.weights=none (repeatable).",
    )
    p.add_argument("--folds", type=int, default=None, metavar="K",
                   help="K-fold cross-validation ensemble in one bundle (train.folds; 1 = a single model; "
                   "default: recipe: auto decides, 5 for up to 10,000 labelled scans).")
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="Seed ensemble of N members on the fixed validation split (train.seeds).")
    p.add_argument("--out", type=Path, default=None, help="Run folder (default: runs/<config name>-<time>).")
    p.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                   help="Continue the interrupted run in RUN_DIR from its checkpoint (an ensemble: from its finished members and the interrupted one's checkpoint; same config and --set).")
    p.set_defaults(func=run)


def _summary(outcome) -> str:
    """The end-of-run summary: kept epoch, headline AUROC with CI, calibration, where files are."""
    t, run = outcome.training, outcome.run_dir
    if "ensemble" in t:
        e = t["ensemble"]
        lines = [f"{e['kind']} ensemble of {len(e['members'])}: member validation AUROC {e['val_auroc_mean']:.4f} "
                 f"+- {e['val_auroc_sd']:.4f} (range {e['val_auroc_range'][0]:.4f}-{e['val_auroc_range'][1]:.4f}), {t['seconds']:.0f} s"]
    else:
        lines = [f"best epoch {t['best_epoch']} of {t['epochs_run']} ({t['selection']}: val AUROC {t['best_val_auroc']:.4f}), "
                 f"{t['seconds']:.0f} s"]
    calibrated = outcome.metrics.get("calibrated", {})
    if "auroc" in calibrated:
        auc = calibrated["auroc"]
        ci = f"95% CI {auc['ci'][0]:.4f}-{auc['ci'][1]:.4f}" if auc.get("ci") else "no CI: too few scans of a class"
        lines.append(f"AUROC {auc['auc']:.4f} ({ci}) on the {t['evaluated_on']} split")
    ece = {k: outcome.metrics.get(k, {}).get("calibration", {}).get("ece", {}).get("value") for k in ("uncalibrated", "calibrated")}
    if None not in ece.values():
        lines.append(f"calibration {t['calibration']}: ECE {ece['uncalibrated']:.4f} -> {ece['calibrated']:.4f}")
    logs = f"members' logs and checkpoints: {run / 'members'}" if "ensemble" in t else \
        f"log: {run / 'train_log.csv'}; checkpoint: {run / 'checkpoint.pt'}"
    lines += [f"bundle: {outcome.bundle}", f"report: {outcome.report}", f"{logs}; config, recipe and versions: {run}"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from medtl.pipeline import train
    from medtl.train import CHECKPOINT_FILE
    from medtl.train.distributed import broadcast, distributed_session, is_main

    ensemble = [f"train.folds={args.folds}"] * (args.folds is not None) + [f"train.seeds={args.seeds}"] * (args.seeds is not None)
    config = load_config(args.config, [*args.overrides, *ensemble])
    if args.resume is not None and args.out is not None and args.out.resolve() != args.resume.resolve():
        raise ValueError("give --resume RUN_DIR or --out RUN_DIR, not two different folders")
    with distributed_session():
        if not is_main():  # one voice in the terminal: rank 0's
            logging.getLogger().setLevel(logging.WARNING)
        out = args.resume or args.out or Path("runs") / broadcast(f"{args.config.stem if args.config else 'train'}-{time.strftime('%Y%m%d-%H%M%S')}")
        new_folder = not out.exists()
        try:
            outcome = train(config, out, resume=args.resume is not None)
        except (ValueError, OSError):
            if new_folder and is_main() and not (out / CHECKPOINT_FILE).exists() and not (out / "members").exists():
                shutil.rmtree(out, ignore_errors=True)  # refused before training: leave no half-made run folder
            raise
    if outcome is not None:  # rank 0 (or a single process)
        print(_summary(outcome))
    return 0
