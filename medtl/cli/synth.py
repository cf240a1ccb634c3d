"""``medtl synth --out DIR [--task multilabel]``: write the embedded synthetic two-site data set."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="Write the synthetic two-site chest X-ray data set.",
        description="Write synthetic chest-radiograph-like scans labelled opacity/normal from two sites (site A as "
        "DICOM, site B as PNG and NIfTI) with DIR/manifest.csv, and held-out DICOM files in DIR/test/ with "
        "DIR/test/labels.csv. With --task multilabel each scan has overlapping findings (opacity, effusion, "
        "cardiomegaly) as 0/1 columns, effusion blank (unknown) on a fifth of site B's scans; train it with "
        "--set task.type=multilabel --set data.classes=[opacity,effusion,cardiomegaly]. Deterministic by --seed.",
    )
    p.add_argument("--out", type=Path, required=True, help="Folder to write into.")
    p.add_argument("--seed", type=int, default=0, help="Random seed (default 0).")
    p.add_argument("--patients", type=int, default=110, help="Training patients per site (default 110).")
    p.add_argument("--test-patients", type=int, default=50, help="Held-out test patients per site (default 50).")
    p.add_argument("--task", choices=("binary", "multilabel"), default="binary",
                   help="binary: one label per scan (opacity/normal, default); multilabel: several findings per scan.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medtl.io import write_synthetic, write_synthetic_multilabel
    from medtl.io.synthetic import FINDINGS

    write = write_synthetic_multilabel if args.task == "multilabel" else write_synthetic
    paths = write(args.out, seed=args.seed, patients_per_site=args.patients, test_per_site=args.test_patients)
    print(f"manifest: {paths['manifest']}\ntest scans: {paths['test_dir']} (labels: {paths['test_labels']})")
    if args.task == "multilabel":
        print(f"train with: --set task.type=multilabel --set data.classes=[{','.join(FINDINGS)}]")
    return 0
