"""``medtl adapt BUNDLE UNLABELLED --method NAME --out NEW_BUNDLE``: label-free adaptation of a bundle."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "adapt",
        help="Adapt a bundle to a site's unlabelled scans (AdaBN/TENT) and estimate its prevalence.",
        description="Re-normalise BUNDLE's model with a new site's unlabelled scans, without retraining (adabn: "
        "BatchNorm statistics of the site's scans; tent: that, then entropy minimisation of the normalisation "
        "layers' affine parameters) and write a new bundle to --out (calibration and operating point kept, a "
        "provenance entry added) with adaptation.md / adaptation.json: the site's prevalence estimated from the "
        "scans (EM of Saerens et al. 2002, bootstrap CI), PPV/NPV at it, and the shift test before and after.",
    )
    p.add_argument("bundle", type=Path, help="Bundle folder to start from.")
    p.add_argument("unlabelled", type=Path, help="Folder of the site's scans, or a manifest CSV with an image column.")
    p.add_argument("--out", type=Path, required=True, help="Folder for the new bundle (must not exist).")
    p.add_argument("--method", default="adabn", metavar="NAME",
                   help="A normalisation adaptation registered in medtl.adapt.NORMALIZATION (default adabn); an "
                   "unknown name is refused before any scan is read.")
    p.add_argument("--tent-lr", type=float, default=1e-4, help="TENT learning rate (default 1e-4).")
    p.add_argument("--tent-steps", type=int, default=1, help="TENT passes over the scans (default 1).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the bootstrap and permutation tests (default 0).")
    p.add_argument("--batch-size", type=int, default=32, help="Scans per forward pass (default 32).")
    p.add_argument("--workers", type=int, default=0, help="Processes decoding scans in parallel (default 0).")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medtl.bundle import adapt

    result = adapt(args.bundle, args.unlabelled, args.out, method=args.method, tent_lr=args.tent_lr, tent_steps=args.tent_steps,
                   seed=args.seed, batch_size=args.batch_size, num_workers=args.workers)
    r = result.report
    print(f"adapted with {r['method']} on {r['unlabelled_set']['scans']} scans")
    if r["label_shift"]:
        p = r["label_shift"]["prevalence"]
        print(f"  estimated prevalence {p['value']:.3f} [{p['ci'][0]:.3f}, {p['ci'][1]:.3f}] "
              f"(training validation split {r['label_shift']['source_prevalence']:.3f})")
    if r["shift_test"]:
        print(f"  shift test after adaptation: {r['shift_test']['after']['message']}")
    for warning in result.warnings:
        print(f"warning: {warning}")
    print(f"bundle: {result.bundle}  report: {result.bundle / 'adaptation.md'}")
    return 0
