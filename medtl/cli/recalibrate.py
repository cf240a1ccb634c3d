"""``medtl recalibrate BUNDLE LOCAL.csv --out NEW_BUNDLE``: update a bundle's calibration at a new site."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "recalibrate",
        help="Refit a bundle's calibration on a few labelled scans from a new site.",
        description="Refit the calibrator of BUNDLE on LOCAL.csv (image,label: a small labelled sample from the "
        "deployment site, 50-100 scans recommended), re-choose the operating point and write a new bundle to --out "
        "with the same weights (or, when it helps, BatchNorm statistics re-estimated on the local scans), a provenance entry (parent hash, local set size, events and hash) and "
        "recalibration.md / recalibration.json: before/after figures on the local scans, the 'after' ones "
        "cross-validated within the local set (stratified 5-fold, leave-one-out under 30 scans).",
    )
    p.add_argument("bundle", type=Path, help="Bundle folder to start from.")
    p.add_argument("local", type=Path, help="Manifest CSV of labelled local scans (image,label).")
    p.add_argument("--out", type=Path, required=True, help="Folder for the new bundle (must not exist).")
    p.add_argument("--method", default="auto", metavar="NAME",
                   help="A local update of the bundle's calibrator (medtl.calibrate.LOCAL_UPDATES; intercept: "
                   "calibration-in-the-large, logistic: slope and intercept on its calibrated log-odds), or any "
                   "calibration method (medtl.calibrate.CALIBRATORS) refitted on the raw logits. auto (default): fewer than 10 scans of the rarer "
                   "class: intercept; 10-99: logistic; 100 or more: the bundle's own method.")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--operating-point", default=None, metavar="RULE",
                       help="youden, most_probable, sensitivity=T or specificity=T: the rule for the new threshold (default: the bundle's).")
    group.add_argument("--keep-threshold", action="store_true", help="Keep the bundle's threshold.")
    p.add_argument("--normalization", choices=("auto", "keep", "adabn"), default="auto",
                   help="adabn: re-estimate the BatchNorm statistics on the local scans (AdaBN; labels unused) before "
                   "recalibrating; keep: the bundle's own. auto (default): whichever gives the lower cross-validated "
                   "log-loss on the local scans.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the cross-validation folds and bootstrap CIs (default 0).")
    p.add_argument("--batch-size", type=int, default=16, help="Scans per forward pass (default 16).")
    p.add_argument("--workers", type=int, default=0, help="Processes decoding scans in parallel (default 0).")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medtl.bundle import recalibrate
    from medtl.bundle.site import parse_operating_point

    parse_operating_point(args.operating_point)  # a bad rule fails before any scan is read
    result = recalibrate(args.bundle, args.local, args.out, method=args.method, operating_point=args.operating_point,
                         keep_threshold=args.keep_threshold, normalization=args.normalization, seed=args.seed, batch_size=args.batch_size, num_workers=args.workers)
    r = result.report
    print(f"recalibrated with '{r['method']}' on {r['local_set']['scans']} local scans ({r['local_set']['events']} of the "
          f"rarer class); operating point {r['operating_point']}")
    print(f"  normalisation: {r['normalization']['how']}")
    for key in ("ece", "accuracy", "sensitivity", "specificity"):
        if key in r["before"]:
            b, a = r["before"][key], r["after"][key]
            print(f"  {key:12s} before {b['value']:.3f}  after {a['value']:.3f} (cross-validated)")
    for warning in result.warnings:
        print(f"warning: {warning}")
    print(f"bundle: {result.bundle}  report: {result.bundle / 'recalibration.md'}")
    return 0
