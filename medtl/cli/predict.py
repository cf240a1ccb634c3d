"""``medtl predict BUNDLE INPUT``: calibrated predictions for a folder of scans or a manifest."""

from __future__ import annotations

import argparse
from pathlib import Path

OUTPUT_FORMATS = ("csv", "jsonl")  # medtl.infer.FORMATS, spelled out so that --help does not import torch


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="Predict every scan in a folder or manifest.",
        description="Write one row per scan (image, prob_<class>..., pred, uncertain, fingerprint) with calibrated "
        "probabilities and the decision at the bundle's operating point. Scans that cannot be read go to "
        "<out>.errors.csv with the reason; the run goes on. --tta adds a tta_std column; --cam DIR writes Grad-CAM "
        "overlays. Re-running the same command resumes: scans already "
        "in --out (same name and content) are skipped. Under torchrun (torchrun --nproc_per_node=N -m medtl "
        "predict ...) the scans are sharded across processes and rank 0 merges the results. With a bundle that holds a "
        "feature reference, each row also gets ood_distance and ood_p (how unlike the training data the scan looks), "
        "and the run ends with a folder-level shift verdict with a p-value, also in <out stem>.summary.json.",
    )
    p.add_argument("bundle", type=Path, help="Bundle folder written by 'medtl train'.")
    p.add_argument("input", type=Path, help="Folder (searched recursively for DICOM, NIfTI, PNG, JPEG) or a CSV with an image column "
                   "(a manifest, labels not needed, or the inventory of 'medtl scan --out').")
    p.add_argument("--out", type=Path, required=True, help="Output file (.csv, or .jsonl with --format jsonl).")
    p.add_argument("--format", choices=OUTPUT_FORMATS, default=None, help="Output format (default: from the --out suffix, else csv).")
    p.add_argument("--batch-size", type=_batch_size, default="auto",
                   help="Scans per forward pass, or 'auto' (default): time a few sizes and take the fastest.")
    p.add_argument("--workers", type=int, default=None,
                   help="Processes decoding scans in parallel (default: a quarter of the cores on CPU, up to 8 on GPU).")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto).")
    p.add_argument("--amp", action="store_true", help="Mixed precision on GPU (bfloat16 where supported, else float16); "
                   "ignored on CPU.")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (falls back to eager if it fails).")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="Keep the default memory layout (channels-last is used for 2D CNNs otherwise).")
    p.add_argument("--tta", action="store_true",
                   help="Test-time augmentation: also predict each scan shifted a few pixels; probabilities are the mean, "
                   "a tta_std column gives the spread, and a scan is uncertain when the threshold (or the top-two "
                   "margin) is within 2 spreads.")
    p.add_argument("--cam", type=Path, default=None, metavar="DIR",
                   help="Write a Grad-CAM overlay PNG per scan into DIR (target layer from the backbone registry).")
    p.add_argument(
        "--uncertain-band",
        type=float,
        default=0.1,
        help="Flag a scan as uncertain when its positive probability is within this distance of the threshold "
        "(binary), or its top-two probability margin is below it (multi-class). Default 0.1; not used with --tta.",
    )
    p.add_argument("--no-shift-check", dest="shift_check", action="store_false",
                   help="Skip the out-of-distribution columns and the folder-level shift test (saves a feature pass).")
    p.add_argument("--shift-level", type=float, default=0.01,
                   help="Significance level of the folder-level shift test (default 0.01: on real X-rays it raised "
                   "1.5-2 %% false alarms on in-distribution folders of 50-100 scans and caught every shifted one).")
    p.set_defaults(func=run)


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got '{text}'")
    return int(text)


def run(args: argparse.Namespace) -> int:
    from medtl.bundle import load
    from medtl.infer import predict_scans
    from medtl.train import resolve_device

    if not 0 < args.shift_level < 1:
        raise ValueError(f"--shift-level must be between 0 and 1, got {args.shift_level}")
    fmt = args.format or ("jsonl" if args.out.suffix.lower() in (".jsonl", ".json") else "csv")
    predictor = load(args.bundle, device=resolve_device(args.device))
    predictor.accelerate(channels_last=args.channels_last, amp=args.amp, compile=args.compile)
    summary = predict_scans(
        predictor,
        args.input,
        args.out,
        fmt=fmt,
        batch_size=args.batch_size,
        num_workers=args.workers,
        uncertain_band=args.uncertain_band,
        tta=args.tta,
        cam_dir=args.cam,
        shift_check=args.shift_check,
        shift_level=args.shift_level,
    )
    print(f"predicted {summary.predicted}, skipped {summary.skipped} (already done), failed {summary.failed} -> {summary.out}")
    if summary.failed:
        print(f"unreadable scans and reasons: {summary.errors}")
    if summary.shift is not None:
        print(("shift alarm: " if summary.shift.get("shifted") else "") + summary.shift["message"])
        print(f"summary: {summary.summary_file}")
    return 0
