"""Multi-task vs single-task on real images: PneumoniaMNIST diagnosis, with and without a MedNIST modality head.

Does a second head, trained on another public set's labels, help the diagnosis when diagnosis
labels are few?  For each fraction of the PneumoniaMNIST training labels (nested stratified
subsets, the transfer study's) and seed, two runs with medtl's default recipe (``recipe: auto``,
one model each, ResNet-18 from scratch at 28 px):

- **single-task**: the diagnosis subset alone (``image,label,split``);
- **multi-task**: the same rows with ``diagnosis`` = their label and ``modality`` = CXR, plus
  MedNIST images (``--mednist-per-class`` per class, 90 % train / 10 % val) with ``modality`` =
  their class and ``diagnosis`` blank (unknown), ``task.type=multitask`` with a binary diagnosis
  head and a six-class modality head (loss weight ``--modality-weight``).

Both are scored on the same 262 PneumoniaMNIST test scans (half of the official validation
split): the diagnosis head's AUROC, the paired DeLong difference multi-task minus single-task,
ECE after each run's own calibration, training time.  Writes WORK/results.csv and prints a
Markdown table with the load average.

    python scripts/bench_multitask.py --data ../shared/data --work runs/bench_multitask
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transfer_data as data  # noqa: E402

from medtl import bundle as bundles  # noqa: E402
from medtl.config import load_config  # noqa: E402
from medtl.infer import iter_logits  # noqa: E402
from medtl.metrics import delong_test  # noqa: E402
from medtl.pipeline import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODALITIES = ("AbdomenCT", "BreastMRI", "CXR", "ChestCT", "Hand", "HeadCT")
Z95 = 1.959964


def multitask_manifest(single: Path, mednist: Path, seed: int) -> Path:
    """The single-task manifest's rows as diagnosis + modality=CXR, plus MedNIST rows labelled for modality only."""
    rows = [{"image": r["image"], "diagnosis": r["label"], "modality": "CXR", "split": r["split"]} for r in data.read_rows(single)]
    rng = np.random.default_rng(seed)
    for r in data.read_rows(mednist):
        image = os.path.relpath(mednist.parent / r["image"], single.parent)
        rows.append({"image": image, "diagnosis": "", "modality": r["label"], "split": "val" if rng.random() < 0.1 else "train"})
    out = single.with_name(single.stem + "_multitask.csv")
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def run(config_args: list[str], out: Path) -> dict:
    """Train (or read back a finished run): the report's metrics, training facts and wall time."""
    done = out / "outcome.json"
    if not done.is_file():
        started = time.perf_counter()
        outcome = train(load_config(None, config_args), out, num_workers=0)
        meta = json.loads((outcome.bundle / "bundle.json").read_text())
        done.write_text(json.dumps({"metrics": outcome.metrics, "training": meta["training"],
                                    "wall_seconds": round(time.perf_counter() - started, 1)}))
    return json.loads(done.read_text())


def diagnosis_scores(bundle: Path, manifest: Path) -> tuple[np.ndarray, np.ndarray]:
    """Test labels (pneumonia = 1) and the diagnosis head's uncalibrated pneumonia probability."""
    rows = [r for r in data.read_rows(manifest) if r["split"] == "test"]
    predictor = bundles.load(bundle)
    results = list(iter_logits(predictor, [manifest.parent / r["image"] for r in rows], batch_size=64, num_workers=0))
    logits = torch.as_tensor(np.stack([r.logits for r in results]), dtype=torch.float64)
    task = predictor.task
    columns = next(h.outputs for h in task.heads if h.name == "diagnosis") if hasattr(task, "heads") else slice(None)
    names = [n.split(":")[-1] for n in task.names[columns]]
    probs = torch.softmax(logits[:, columns], dim=1)[:, names.index("pneumonia")].numpy()
    labels = np.array([int(r.get("label", r.get("diagnosis")) == "pneumonia") for r in rows])
    return labels, probs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_multitask")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1, 0.25])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--mednist-per-class", type=int, default=500)
    parser.add_argument("--modality-weight", type=float, default=0.5)
    parser.add_argument("--limit", type=int, default=None, help="scans per PneumoniaMNIST split (smoke runs)")
    parser.add_argument("--epochs", type=int, default=None, help="fixed epochs (smoke runs; default: the recipe's)")
    args = parser.parse_args(argv)
    work = args.work.resolve()
    pool = data.write_target(args.data / "pneumoniamnist" / "pneumoniamnist_trainval_28.npz", work / "data" / "pneumonia",
                             data.PNEUMONIA_CLASSES, limit=args.limit)
    mednist = data.extract_mednist(args.data / "mednist" / "MedNIST.tar", work / "data" / "mednist", args.mednist_per_class)
    heads = ("task.heads=[{name: diagnosis, type: binary, classes: [normal, pneumonia], positive_class: pneumonia}, "
             f"{{name: modality, type: multiclass, classes: [{', '.join(MODALITIES)}], weight: {args.modality_weight}}}]")
    common = ["train.folds=1", "data.image_size=[28, 28]"] + ([f"train.epochs={args.epochs}"] if args.epochs else [])
    rows = []
    for fraction in args.fractions:
        for seed in args.seeds:
            single, n_train = data.subset_manifest(pool, fraction, seed)
            multi = multitask_manifest(single, mednist, seed)
            cell = work / "runs" / f"frac{fraction:g}_seed{seed}"
            arms = {
                "single": (run([f"data.manifest={single}", f"train.seed={seed}", *common], cell / "single"), single),
                "multitask": (run([f"data.manifest={multi}", f"train.seed={seed}", "task.type=multitask", heads, *common],
                                  cell / "multitask"), multi),
            }
            scores = {name: diagnosis_scores(cell / name / "bundle", manifest) for name, (_, manifest) in arms.items()}
            labels = scores["single"][0]
            test = delong_test(labels, scores["multitask"][1], scores["single"][1])
            for name, (result, _) in arms.items():
                m = result["metrics"]
                m = m["heads"]["diagnosis"] if "heads" in m else m
                rows.append({"fraction": fraction, "n_diagnosis": n_train, "seed": seed, "arm": name,
                             "auroc": m["uncalibrated"]["auroc"]["auc"], "auroc_lo": m["uncalibrated"]["auroc"]["ci"][0],
                             "auroc_hi": m["uncalibrated"]["auroc"]["ci"][1],
                             "ece_after": m["calibrated"]["calibration"]["ece"]["value"],
                             "epochs_run": result["training"]["epochs_run"], "train_seconds": result["training"]["seconds"],
                             **({"delta": test.difference, "delta_se": test.se, "delta_lo": test.ci[0], "delta_hi": test.ci[1],
                                 "delta_p": test.pvalue} if name == "multitask" else {})})
                print(f"{fraction:5.0%} seed {seed} {name:9s}: AUROC {rows[-1]['auroc']:.4f}, ECE {rows[-1]['ece_after']:.3f}, "
                      f"{rows[-1]['train_seconds']:.0f} s" + (f", delta {test.difference:+.4f} [{test.ci[0]:+.4f}, {test.ci[1]:+.4f}]"
                                                               if name == "multitask" else ""), flush=True)
    with open(work / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[1]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nload average {os.getloadavg()[0]:.2f}; {args.mednist_per_class} MedNIST images per class, modality weight "
          f"{args.modality_weight}\n")
    print("| diagnosis labels | single-task AUROC | multi-task AUROC | Δ multi − single (conservative 95 % CI) | "
          "seeds with Δ CI > 0 / < 0 | ECE single / multi | train s single / multi |")
    print("|---|---|---|---|---|---|---|")
    for fraction in args.fractions:
        cell = [r for r in rows if r["fraction"] == fraction]
        single = [r for r in cell if r["arm"] == "single"]
        multi = [r for r in cell if r["arm"] == "multitask"]
        mean = float(np.mean([r["delta"] for r in multi]))
        se = float(np.mean([r["delta_se"] for r in multi]))  # seeds share the test set: a CI valid for any correlation
        print(f"| {fraction:.0%} ({single[0]['n_diagnosis']}) | {np.mean([r['auroc'] for r in single]):.3f} | "
              f"{np.mean([r['auroc'] for r in multi]):.3f} | {mean:+.3f} [{mean - Z95 * se:+.3f}, {mean + Z95 * se:+.3f}] | "
              f"{sum(r['delta_lo'] > 0 for r in multi)} / {sum(r['delta_hi'] < 0 for r in multi)} of {len(multi)} | "
              f"{np.mean([r['ece_after'] for r in single]):.3f} / {np.mean([r['ece_after'] for r in multi]):.3f} | "
              f"{np.mean([r['train_seconds'] for r in single]):.0f} / {np.mean([r['train_seconds'] for r in multi]):.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
