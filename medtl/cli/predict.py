"""``medtl predict BUNDLE INPUT``: calibrated predictions for a folder of scans or a manifest."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="Predict every scan in a folder or manifest.",
        description="Write one CSV row per scan (image, prob_<class>..., pred) with calibrated probabilities and the "
        "decision at the bundle's operating point. Scans that cannot be read go to <out>.errors.csv with the "
        "reason; the run goes on.",
    )
    p.add_argument("bundle", type=Path, help="Bundle folder written by 'medtl train'.")
    p.add_argument("input", type=Path, help="Folder (searched recursively for DICOM, NIfTI, PNG, JPEG) or manifest CSV.")
    p.add_argument("--out", type=Path, required=True, help="Output CSV path.")
    p.add_argument("--batch-size", type=int, default=16, help="Scans per forward pass (default 16).")
    p.add_argument("--workers", type=int, default=2, help="Processes decoding scans in parallel (default 2).")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto).")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medtl.bundle import load
    from medtl.infer import predict_to_csv
    from medtl.train import resolve_device

    predictor = load(args.bundle, device=resolve_device(args.device))
    summary = predict_to_csv(predictor, args.input, args.out, batch_size=args.batch_size, num_workers=args.workers)
    print(f"predicted {summary.predicted} scans -> {summary.out}")
    if summary.failed:
        print(f"{summary.failed} scans could not be read -> {summary.errors}")
    return 0
