"""Transfer study on real data: a MedNIST-pretrained backbone vs training from scratch.

1. Source: train a ResNet-18 on a per-class subsample of MedNIST (configs/mednist_source.yaml);
   its bundle is the radiology-pretrained backbone (``model.weights: bundle:PATH``).
2. Targets: PneumoniaMNIST (2D) and AdrenalMNIST3D (3D, the 2D bundle inflated), written as files;
   half of each official validation split (stratified) is the test set.
3. Label efficiency: for each fraction of the target training labels (nested stratified subsets,
   the same for every method) and seed, train every recipe (configs/pneumonia_*.yaml,
   configs/adrenal3d_*.yaml) with medtl's own pipeline; test AUROC with its DeLong CI, paired
   DeLong difference against scratch (same seed, same subset), ECE before and after calibration,
   accuracy at the validation-chosen threshold, training time.  ImageNet rows run only where
   torchvision's ResNet-18 file is in the torch cache.

Writes WORK/results.csv (one row per run), WORK/results.md (tables) and FIGURES/transfer_<task>.png.
Finished runs are kept (WORK/runs/.../outcome.json), so an interrupted study resumes.

    .venv/bin/python scripts/transfer_study.py --figures docs/img   # the full study
    .venv/bin/python scripts/transfer_study.py --quick              # smoke run: tiny data, 1 seed, 1 epoch

docs/transfer_study.md gives the command of the reduced grid that produced its numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transfer_data as data  # noqa: E402
import transfer_report as report  # noqa: E402

from medtl import bundle as bundles  # noqa: E402
from medtl.backbones import imagenet_checkpoint  # noqa: E402
from medtl.config import load_config  # noqa: E402
from medtl.infer import iter_logits  # noqa: E402
from medtl.metrics import delong_test  # noqa: E402
from medtl.pipeline import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
FRACTIONS = (0.01, 0.05, 0.10, 0.25, 1.0)
MIN_STEPS = 300  # small subsets get more epochs, up to MAX_EPOCHS, so every run takes a few hundred steps
MAX_EPOCHS = 40
log = logging.getLogger("transfer_study")


@dataclass(frozen=True)
class Method:
    """A recipe: its config and where its initial weights come from (none, mednist or imagenet)."""

    name: str
    config: str
    source: str = "none"


@dataclass
class Task:
    name: str
    npz: str
    classes: tuple[str, ...]
    methods: list[Method]
    fractions: Sequence[float]
    seeds: Sequence[int]
    volumes: bool = False
    batch_size: int = 32


def pneumonia_methods(imagenet: bool) -> list[Method]:
    methods = [
        Method("scratch", "pneumonia_scratch.yaml"),
        Method("mednist_linear_probe", "pneumonia_linear_probe.yaml", "mednist"),
        Method("mednist_full", "pneumonia_finetune.yaml", "mednist"),
        Method("mednist_lp_ft", "pneumonia_lp_ft.yaml", "mednist"),
    ]
    if imagenet:
        methods += [Method(m.name.replace("mednist", "imagenet"), m.config, "imagenet") for m in methods[1:]]
    return methods


def imagenet_available() -> bool:
    """True when torchvision's ResNet-18 ImageNet file is in the torch cache; says what is missing otherwise."""
    path, url, _ = imagenet_checkpoint("resnet18")
    if path.is_file():
        return True
    print(f"ImageNet rows skipped: {path} is missing (fetch {url} and put it there, or run "
          f"'medtl weights import imagenet:resnet18 FILE')")
    return False


def epochs_for(n_train: int, batch_size: int, base: int) -> int:
    steps = math.ceil(n_train / batch_size)
    return min(MAX_EPOCHS, max(base, math.ceil(MIN_STEPS / steps)))


def run_training(config: str, overrides: list[str], out: Path) -> dict:
    """Train one recipe with medtl's pipeline (resumable: a finished run is read back)."""
    done = out / "outcome.json"
    if done.is_file():
        return json.loads(done.read_text())
    started = time.perf_counter()
    outcome = train(load_config(CONFIGS / config, [*overrides, "train.folds=1"]), out, num_workers=0)  # single models: the study compares starts
    meta = json.loads((outcome.bundle / "bundle.json").read_text())
    result = {"metrics": outcome.metrics, "training": meta["training"], "wall_seconds": round(time.perf_counter() - started, 1)}
    done.write_text(json.dumps(result))
    return result


def pretrain_source(args: argparse.Namespace) -> tuple[Path, str]:
    """Train the MedNIST source backbone; returns its bundle and a line that describes it."""
    manifest = data.extract_mednist(args.data / "mednist" / "MedNIST.tar", args.work / "data" / "mednist", args.mednist_per_class)
    out = args.work / "runs" / "mednist_source"
    overrides = [f"data.manifest={manifest}"] + ([f"train.epochs={args.epochs}"] if args.epochs else [])
    result = run_training("mednist_source.yaml", overrides, out)
    m, t = result["metrics"], result["training"]
    accuracy = m["calibrated"]["accuracy"]["value"]
    summary = (f"Source: ResNet-18 trained from scratch on MedNIST, {args.mednist_per_class} images per class "
               f"({t['partitions']['train']['scans']} training, {m['n']} validation scans), 28 px: validation accuracy "
               f"{accuracy:.4f}, macro AUROC {m['calibrated']['auroc']['auc']:.4f}; {t['epochs_run']} epochs (best {t['best_epoch']}), "
               f"{result['wall_seconds']:.0f} s wall.")
    print(summary)
    return out / "bundle", summary


def scores_on_test(bundle: Path, manifest: Path) -> tuple[list[int], list[float], list[float]]:
    """Labels and the model's positive-class probability for each test row, from the saved bundle,
    from one pass: softmax before calibration (the scores its AUROC is computed on) and after the
    bundle's stored calibration."""
    rows = [r for r in data.read_rows(manifest) if r["split"] == "test"]
    predictor = bundles.load(bundle)
    results = list(iter_logits(predictor, [manifest.parent / r["image"] for r in rows], batch_size=64, num_workers=0))
    failed = [r.image for r in results if r.error is not None]
    if failed:
        raise RuntimeError(f"{manifest}: {len(failed)} test scans could not be read, e.g. {failed[0]}")
    logits = torch.as_tensor(np.stack([r.logits for r in results]), dtype=torch.float64)
    positive = predictor.positive_index
    labels = [int(r["label"] == predictor.classes[positive]) for r in rows]
    calibrated = predictor.calibrate(logits.numpy())[:, positive]
    return labels, torch.softmax(logits, dim=1)[:, positive].tolist(), calibrated.tolist()


def run_cell(task: Task, method: Method, fraction: float, seed: int, manifest: Path, n_train: int, args, weights: dict) -> dict:
    """One training run of the grid and its figures."""
    out = args.work / "runs" / task.name / method.name / f"frac{fraction:g}_seed{seed}"
    epochs = args.epochs or epochs_for(n_train, task.batch_size, base=load_config(CONFIGS / method.config).train.epochs)
    overrides = [f"data.manifest={manifest}", f"train.seed={seed}", f"train.epochs={epochs}"]
    if method.source != "none":
        overrides.append(f"model.weights={weights[method.source]}")
    result = run_training(method.config, overrides, out)
    scores_file = out / "test_scores.json"
    if not scores_file.is_file():
        labels, scores, _ = scores_on_test(out / "bundle", manifest)
        scores_file.write_text(json.dumps({"labels": labels, "scores": scores}))
    m, t = result["metrics"], result["training"]
    auc = m["uncalibrated"]["auroc"]  # discrimination of the model itself; Platt scaling keeps the ranking
    return {
        "task": task.name,
        "method": method.name,
        "fraction": fraction,
        "n_train": n_train,
        "seed": seed,
        "epochs": epochs,
        "epochs_run": t["epochs_run"],
        "best_epoch": t["best_epoch"],
        "auroc": auc["auc"],
        "auroc_lo": auc["ci"][0],
        "auroc_hi": auc["ci"][1],
        "accuracy": m["calibrated"]["threshold_metrics"]["accuracy"]["value"],
        "ece_before": m["uncalibrated"]["calibration"]["ece"]["value"],
        "ece_after": m["calibrated"]["calibration"]["ece"]["value"],
        "train_seconds": t["seconds"],
        "wall_seconds": result["wall_seconds"],
        "run_dir": str(out.relative_to(args.work)),
    }


def paired_vs_scratch(rows: list[dict], work: Path) -> None:
    """Add each run's AUROC difference to scratch (same task, fraction, seed) with DeLong's paired CI."""
    scratch = {(r["task"], r["fraction"], r["seed"]): r for r in rows if r["method"] == "scratch"}
    for row in rows:
        base = scratch.get((row["task"], row["fraction"], row["seed"]))
        if base is None or row is base:
            continue
        a = json.loads((work / row["run_dir"] / "test_scores.json").read_text())
        b = json.loads((work / base["run_dir"] / "test_scores.json").read_text())
        test = delong_test(np.array(a["labels"]), np.array(a["scores"]), np.array(b["scores"]))
        row.update(delta_auroc=test.difference, delta_se=test.se, delta_lo=test.ci[0], delta_hi=test.ci[1], delta_p=test.pvalue)


def build_tasks(args: argparse.Namespace) -> list[Task]:
    fractions = args.fractions or ((0.1, 1.0) if args.quick else FRACTIONS)
    seeds = args.seeds or ((0,) if args.quick else (0, 1, 2))
    tasks = []
    if "pneumonia" in args.tasks:
        tasks.append(Task("pneumonia", "pneumoniamnist/pneumoniamnist_trainval_28.npz", data.PNEUMONIA_CLASSES,
                          pneumonia_methods(imagenet_available()), fractions, seeds))
    if "adrenal3d" in args.tasks:
        methods = [Method("scratch", "adrenal3d_scratch.yaml"), Method("mednist_full", "adrenal3d_finetune.yaml", "mednist")]
        tasks.append(Task("adrenal3d", "adrenalmnist3d/adrenalmnist3d_trainval_28.npz", data.ADRENAL_CLASSES, methods,
                          args.adrenal_fractions or fractions, args.adrenal_seeds or seeds[:1], volumes=True, batch_size=16))
    return tasks


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="the shared data folder")
    parser.add_argument("--work", type=Path, default=None, help="data, runs and results (default runs/transfer_study[_quick])")
    parser.add_argument("--figures", type=Path, default=None, help="where the PNG plots go (default: WORK)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 40 scans per split, fractions 0.1 and 1, seed 0, 1 epoch")
    parser.add_argument("--tasks", nargs="+", default=["pneumonia", "adrenal3d"], choices=["pneumonia", "adrenal3d"])
    parser.add_argument("--fractions", type=float, nargs="+", help=f"label fractions (default {FRACTIONS})")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2)")
    parser.add_argument("--adrenal-fractions", type=float, nargs="+", help="AdrenalMNIST3D fractions (default: --fractions)")
    parser.add_argument("--adrenal-seeds", type=int, nargs="+", help="AdrenalMNIST3D seeds (default: the first of --seeds; a 3D run costs ~10 2D runs)")
    parser.add_argument("--seeds-at-100", type=int, default=None,
                        help="run only the first N seeds at fraction 1 (where every seed trains on the same scans)")
    parser.add_argument("--mednist-per-class", type=int, default=None, help="MedNIST images per class (default 2000)")
    parser.add_argument("--epochs", type=int, default=None, help="fixed epochs for every run (default: by subset size)")
    parser.add_argument("--limit", type=int, default=None, help="scans per target split (default: all)")
    args = parser.parse_args(argv)
    if args.quick:
        args.limit = args.limit or 40
        args.epochs = args.epochs or 1
        args.mednist_per_class = args.mednist_per_class or 20
    args.mednist_per_class = args.mednist_per_class or 2000
    args.work = (args.work or ROOT / "runs" / ("transfer_study_quick" if args.quick else "transfer_study")).resolve()
    args.figures = args.figures or args.work
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.data.is_dir():
        print(f"{args.data}: the shared data folder is missing", file=sys.stderr)
        return 2
    started = time.perf_counter()
    source, source_summary = pretrain_source(args)
    weights = {"mednist": f"bundle:{source}", "imagenet": "imagenet"}
    rows: list[dict] = []
    for task in build_tasks(args):
        pool = data.write_target(args.data / task.npz, args.work / "data" / task.name, task.classes, volumes=task.volumes, limit=args.limit)
        for seed in task.seeds:
            for fraction in sorted(task.fractions):
                if fraction == 1 and args.seeds_at_100 is not None and seed not in task.seeds[: args.seeds_at_100]:
                    continue
                manifest, n_train = data.subset_manifest(pool, fraction, seed)
                for method in task.methods:
                    row = run_cell(task, method, fraction, seed, manifest, n_train, args, weights)
                    rows.append(row)
                    print(f"{task.name} {method.name:22s} {fraction:5.0%} seed {seed}: AUROC {row['auroc']:.4f} "
                          f"[{row['auroc_lo']:.4f}, {row['auroc_hi']:.4f}], ECE {row['ece_before']:.3f} -> "
                          f"{row['ece_after']:.3f}, {row['train_seconds']:.0f} s", flush=True)
    paired_vs_scratch(rows, args.work)
    report.write_csv(args.work / "results.csv", rows)
    compute = sum(r["wall_seconds"] for r in rows) / 60
    tables = f"{source_summary} Target runs: {len(rows)}, {compute:.0f} min wall (training, calibration, report).\n\n{report.markdown(rows)}"
    (args.work / "results.md").write_text(tables)
    args.figures.mkdir(parents=True, exist_ok=True)
    for task in sorted({r["task"] for r in rows}):
        report.plot(rows, task, args.figures / f"transfer_{task}.png")
    print(tables)
    print(f"total {time.perf_counter() - started:.0f} s; results in {args.work}, figures in {args.figures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
