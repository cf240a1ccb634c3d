"""Multi-label end to end on real images: 2x2 mosaics of MedNIST scans labelled with the modalities present.

Each mosaic holds four real MedNIST images (disjoint across mosaics, so no image is in two
splits), each shrunk to 32x32 with its contrast scaled by a random factor and Gaussian noise added
to the mosaic, so that the findings are not trivially separable.  Four findings are the modalities a reader is asked about, each present independently
with its own prevalence (imbalanced: CXR 40 %, Hand 25 %, HeadCT 15 %, BreastMRI 8 %); tiles not
taken by a present finding come from the two filler classes (AbdomenCT, ChestCT), positions
shuffled.  A tenth of the HeadCT cells are blank (unknown), to exercise the masked loss and
metrics.  The mosaics are written as PNG files with one 0/1 column per finding and a split column
(train / val / test), then

    medtl train    (task.type=multilabel, ResNet-18 from scratch at 32 px, one model)
    medtl evaluate (the bundle on the test manifest)
    medtl predict  (the test folder: prob_<finding> and pred_<finding> columns)

run through the CLI; the script prints the per-finding table (AUROC with DeLong CI, ECE before
and after recalibration, thresholds) of the evaluation report as Markdown, with the load average.

    python scripts/bench_multilabel.py --data ../shared/data --work /tmp/bench_multilabel
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

FINDINGS = {"CXR": 0.40, "Hand": 0.25, "HeadCT": 0.15, "BreastMRI": 0.08}
FILLERS = ("AbdomenCT", "ChestCT")
SPLITS = {"train": 800, "val": 200, "test": 400}
TILE, NOISE = 32, 45.0  # tile side in pixels; noise standard deviation in grey levels (of 255)
UNKNOWN = ("HeadCT", 0.1)  # the finding with blank cells, and their share


def extract(tar_path: Path, out: Path, per_class: int, seed: int = 0) -> dict[str, list[Path]]:
    """``per_class`` randomly chosen JPEGs of each MedNIST class, extracted under ``out``."""
    rng = np.random.default_rng(seed)
    with tarfile.open(tar_path) as tar:
        by_class: dict[str, list[tarfile.TarInfo]] = {}
        for member in tar.getmembers():
            if member.isfile() and member.name.lower().endswith(".jpeg"):
                by_class.setdefault(Path(member.name).parent.name, []).append(member)
        chosen = {c: [sorted(ms, key=lambda m: m.name)[i] for i in sorted(rng.permutation(len(ms))[:per_class])]
                  for c, ms in sorted(by_class.items())}
        if not (out / "MedNIST").is_dir():
            tar.extractall(out, members=[m for ms in chosen.values() for m in ms], filter="data")
    return {c: [out / m.name for m in ms] for c, ms in chosen.items()}


def write_mosaics(images: dict[str, list[Path]], out: Path, seed: int = 0) -> dict[str, Path]:
    """Mosaic PNGs and one manifest per split (plus ``all.csv`` for training, with the split column)."""
    rng = np.random.default_rng(seed)
    pools = {c: list(rng.permutation(paths)) for c, paths in images.items()}
    rows: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for split, n in SPLITS.items():
        for i in range(n):
            present = {f: bool(rng.random() < p) for f, p in FINDINGS.items()}
            tiles = [pools[f].pop() for f, on in present.items() if on]
            tiles += [pools[FILLERS[int(rng.integers(2))]].pop() for _ in range(4 - len(tiles))]
            order = rng.permutation(4)
            grid = [rng.uniform(0.3, 1.0) * np.asarray(Image.open(tiles[k]).convert("L").resize((TILE, TILE)), dtype=np.float64)
                    for k in order]
            mosaic = np.block([[grid[0], grid[1]], [grid[2], grid[3]]]) + rng.normal(0, NOISE, (2 * TILE, 2 * TILE))
            name = f"{split}/m{i:05d}.png"
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(np.round(mosaic), 0, 255).astype(np.uint8)).save(out / name)
            cells = {f: str(int(on)) for f, on in present.items()}
            if rng.random() < UNKNOWN[1]:
                cells[UNKNOWN[0]] = ""
            rows[split].append({"image": name, **cells, "split": split, "patient_id": f"{split}{i:05d}"})
    manifests = {}
    for name, table in [("all", [r for rs in rows.values() for r in rs]), ("test", rows["test"])]:
        manifests[name] = out / f"{name}.csv"
        with open(manifests[name], "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(table[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(table)
    return manifests


def medtl(*args: str) -> None:
    """Run one ``medtl`` command (this interpreter, this checkout), failing loudly."""
    subprocess.run([sys.executable, "-m", "medtl", *args], check=True)


def table(metrics: dict) -> str:
    """The per-finding Markdown table of a multi-label report."""
    lines = ["| finding | test scans (known) | positives | AUROC (95% DeLong CI) | ECE before | ECE after | threshold (rule) "
             "| sensitivity | specificity |", "|---|---|---|---|---|---|---|---|---|"]
    for name, d in metrics["per_label"].items():
        auc, cal, op, tm = d["auroc"]["calibrated"], d["calibration"], d["operating_point"], d["threshold_metrics"]
        lines.append(f"| {name} | {d['n']} | {d['positives']} | {auc['auc']:.3f} ({auc['ci'][0]:.3f}-{auc['ci'][1]:.3f}) "
                     f"| {cal['uncalibrated']['ece']['value']:.3f} | {cal['calibrated']['ece']['value']:.3f} "
                     f"| {op['threshold']:.3f} ({op['method']}) | {tm['sensitivity']['value']:.3f} | {tm['specificity']['value']:.3f} |")
    macro = metrics["calibrated"]["auroc"]
    lines.append(f"\nMacro AUROC {macro['auc']:.3f} (95% bootstrap CI {macro['ci'][0]:.3f}-{macro['ci'][1]:.3f}).")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_multilabel"))
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    tar_path = args.data / "mednist" / "MedNIST.tar"
    if not tar_path.is_file():
        print(f"{tar_path} not found: the shared MedNIST data is needed", file=sys.stderr)
        return 2
    started = time.perf_counter()
    total = sum(SPLITS.values())
    per_class = int(1.05 * total * 4 / len(FILLERS))  # enough for the filler classes even with no finding present
    images = extract(tar_path, args.work / "src", per_class)
    manifests = write_mosaics(images, args.work / "mosaics")
    prepared = time.perf_counter() - started
    run, findings = args.work / "run", ",".join(FINDINGS)
    medtl("train", "--out", str(run), "--set", f"data.manifest={manifests['all']}", "--set", "task.type=multilabel",
          "--set", f"data.classes=[{findings}]", "--set", "recipe=none", "--set", "model.weights=none",
          "--set", f"data.image_size=[{2 * TILE},{2 * TILE}]", "--set", "data.num_workers=0", "--set", f"train.epochs={args.epochs}",
          "--set", "train.batch_size=32", "--set", "train.lr=0.001", "--set", "adapt.head_lr_multiplier=1",
          "--set", "train.folds=1", "--set", "operating_point.method=youden", "--set", "report.subgroups=[]")
    trained = time.perf_counter() - started - prepared
    medtl("evaluate", str(run / "bundle"), str(manifests["test"]), "--out", str(args.work / "evaluate"))
    medtl("predict", str(run / "bundle"), str(args.work / "mosaics" / "test"), "--out", str(args.work / "predictions.csv"))
    metrics = json.loads((args.work / "evaluate" / "metrics.json").read_text())
    with open(args.work / "predictions.csv", newline="") as handle:
        predicted = list(csv.DictReader(handle))
    print(table(metrics))
    print(f"\nprediction columns: {list(predicted[0])}; {len(predicted)} rows")
    print(f"data {prepared:.0f} s, train {trained:.0f} s, all {time.perf_counter() - started:.0f} s; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
