"""``medtl train CONFIG.yaml``: train, calibrate and bundle a classifier, and write its report."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from medtl.config import load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="Train a classifier from a YAML config.",
        description="Fine-tune a pretrained backbone on a manifest of scans, calibrate it on the validation split, "
        "choose the operating point, and write RUN_DIR/bundle/, RUN_DIR/report/ and RUN_DIR/train_log.csv.",
    )
    p.add_argument("config", type=Path, help="YAML config (see configs/ for templates; unset fields take defaults).")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Override a config field, e.g. --set train.epochs=5 --set model.weights=none (repeatable).",
    )
    p.add_argument("--out", type=Path, default=None, help="Run folder (default: runs/<config name>-<time>).")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medtl.pipeline import train

    config = load_config(args.config, args.overrides)
    out = args.out or Path("runs") / f"{args.config.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    outcome = train(config, out)
    summary = outcome.metrics.get("calibrated", {})
    print(f"bundle: {outcome.bundle}")
    print(f"report: {outcome.report}")
    if "auroc" in summary:
        auc = summary["auroc"]
        print(f"AUROC {auc['auc']:.4f} (95% CI {auc['ci'][0]:.4f}-{auc['ci'][1]:.4f})")
    return 0
