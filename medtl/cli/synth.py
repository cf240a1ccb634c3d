"""``medtl synth --out DIR``: write the embedded synthetic two-site data set."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="Write the synthetic two-site chest X-ray data set.",
        description="Write synthetic chest-radiograph-like scans labelled opacity/normal from two sites (site A as "
        "DICOM, site B as PNG and NIfTI) with DIR/manifest.csv, and held-out DICOM files in DIR/test/ with "
        "DIR/test/labels.csv. Deterministic by --seed.",
    )
    p.add_argument("--out", type=Path, required=True, help="Folder to write into.")
    p.add_argument("--seed", type=int, default=0, help="Random seed (default 0).")
    p.add_argument("--patients", type=int, default=110, help="Training patients per site (default 110).")
    p.add_argument("--test-patients", type=int, default=50, help="Held-out test patients per site (default 50).")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medtl.io import write_synthetic

    paths = write_synthetic(args.out, seed=args.seed, patients_per_site=args.patients, test_per_site=args.test_patients)
    print(f"manifest: {paths['manifest']}\ntest scans: {paths['test_dir']} (labels: {paths['test_labels']})")
    return 0
