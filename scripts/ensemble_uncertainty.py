"""How well the ``uncertain`` flag of ``medtl predict`` singles out the errors of an ensemble
bundle, on the labelled ``test`` rows of a manifest: the fixed band around the threshold alone,
the members' vote alone, and both (what ``predict`` flags).

    .venv/bin/python scripts/ensemble_uncertainty.py runs/bench_recipe/runs/pneumonia_1/auto/bundle \\
        runs/bench_recipe/data/pneumonia/manifests/seed0_frac1.csv
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import torch

from medtl import bundle as bundles
from medtl.backbones import pool_members
from medtl.infer.predict import member_votes, uncertain


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("manifest", type=Path, help="image,label,split (images relative to it); the test rows are scored")
    parser.add_argument("--band", type=float, default=0.1, help="predict's --uncertain-band (default 0.1)")
    args = parser.parse_args(argv)
    predictor = bundles.load(args.bundle)
    if predictor.n_members == 1:
        parser.error(f"{args.bundle} is not an ensemble bundle")
    rows = [r for r in csv.DictReader(open(args.manifest)) if r["split"] == "test"]
    chain = predictor.transforms()
    images = torch.stack([chain({"image": str(args.manifest.parent / r["image"])})["image"] for r in rows])
    members = predictor.member_logits(images)
    probs = predictor.calibrate(pool_members(torch.from_numpy(members), predictor.model.combine).numpy())
    wrong = predictor.decide(probs) != np.array([predictor.classes.index(r["label"]) for r in rows])
    band = uncertain(predictor, probs, args.band)
    disagree, spread = member_votes(predictor, members, probs)
    print(f"{len(rows)} test scans, {predictor.n_members} members, accuracy {1 - wrong.mean():.3f}, errors {wrong.sum()}")
    print("| flag | flagged | errors caught | accuracy, flagged | accuracy, not flagged |\n|---|---|---|---|---|")
    for name, flag in ((f"band {args.band}", band), ("members disagree", disagree), ("either (predict)", band | disagree)):
        flagged = f"{(1 - wrong[flag].mean()):.3f}" if flag.any() else "-"
        print(f"| {name} | {flag.sum()} ({flag.mean():.1%}) | {(wrong & flag).sum()} / {wrong.sum()} | {flagged} | "
              f"{1 - wrong[~flag].mean():.3f} |")
    print(f"member_std: median {np.median(spread):.4f}, 90th percentile {np.percentile(spread, 90):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
