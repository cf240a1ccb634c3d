"""``medtl evaluate BUNDLE MANIFEST``: the clinical report of a bundle on labelled scans."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="Report a bundle's performance on a labelled manifest.",
        description="Run a bundle on every labelled scan of a manifest and write report.html, metrics.json and plots "
        "to --out, using the bundle's stored calibration and operating point.",
    )
    p.add_argument("bundle", type=Path, help="Bundle folder written by 'medtl train'.")
    p.add_argument("manifest", type=Path, help="Manifest CSV with image and label columns (site optional).")
    p.add_argument("--out", type=Path, required=True, help="Folder for the report.")
    p.add_argument("--batch-size", type=int, default=16, help="Scans per forward pass (default 16).")
    p.add_argument("--workers", type=int, default=2, help="Processes decoding scans in parallel (default 2).")
    p.add_argument(
        "--subgroups",
        default=None,
        help="Comma-separated manifest columns to report every metric by (default: the training config's "
        "report.subgroups, normally 'site').",
    )
    p.add_argument("--prevalence", type=float, default=None,
                   help="Positive-class prevalence where the model will be used: adds PPV and NPV at it (default: the "
                   "training config's report.prevalence; the sample's own PPV/NPV are always reported).")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medtl.pipeline import evaluate

    subgroups = None if args.subgroups is None else [c.strip() for c in args.subgroups.split(",") if c.strip()]
    if args.prevalence is not None and not 0 < args.prevalence < 1:
        raise ValueError(f"--prevalence must be between 0 and 1, got {args.prevalence}")
    summary = evaluate(args.bundle, args.manifest, args.out, batch_size=args.batch_size, num_workers=args.workers,
                       subgroups=subgroups, prevalence=args.prevalence)
    print(headline(summary))
    excluded = summary["info"].get("excluded", 0)
    print(f"excluded {excluded} scans" + (f" (reasons: {args.out / 'errors.csv'})" if excluded else ""))
    print(f"report: {args.out / 'report.html'}")
    return 0


def headline(summary: dict) -> str:
    """AUROC with its CI and, for binary bundles, sensitivity and specificity at the threshold (each
    head's, for a multi-task bundle)."""
    if "heads" in summary:
        return "; ".join(f"head {name}: {headline(head)}" for name, head in summary["heads"].items())
    cal = summary["calibrated"]
    auroc = cal["auroc"]
    if auroc.get("auc") is None:
        text = "AUROC not estimable (one class only)"
    else:
        name = "macro AUROC" if summary.get("task") == "multilabel" else "AUROC"
        text = f"{name} {auroc['auc']:.4f} (95% CI {auroc['ci'][0]:.4f}-{auroc['ci'][1]:.4f})"
    tm = cal.get("threshold_metrics")
    if tm:
        parts = [f"{name} {tm[key]['value']:.1%} ({tm[key]['numerator']}/{tm[key]['denominator']})"
                 for key, name in (("sensitivity", "sensitivity"), ("specificity", "specificity")) if tm[key]["value"] is not None]
        text += f"; at threshold {summary['conventions']['threshold']:.4f}: " + ", ".join(parts)
    return f"{text}; {summary['n']} scans evaluated"
