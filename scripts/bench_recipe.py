"""recipe: auto against the template recipes, on the real data sets in ../shared/data.

Each data set is written as files with a manifest the way a user would have it (``image``,
``label``, ``split``): PneumoniaMNIST at several fractions of its training labels and
AdrenalMNIST3D (the transfer study's files: the official validation split halved into ``val`` and
``test``), and a MedNIST subset as a six-class task (``--mednist-per-class`` training images per
class, 100 per class as test).  Three variants are trained on the train and val rows:

- ``template``: the data set's template config as it is (configs/pneumonia_scratch.yaml,
  configs/adrenal3d_scratch.yaml, configs/mednist_source.yaml), one model (``train.folds=1``);
- ``auto_single``: no config file, ``train.folds=1``: the rules' values, one model;
- ``auto``: no config file at all: the rules' values and their default folds.

Only ``data.manifest`` and ``data.positive_class`` are set, as a user would.  Every figure is
on the ``test`` rows, which no variant trains, selects or calibrates on.  Runs are kept
(WORK/runs/<set>/<variant>/outcome.json), so an interrupted benchmark resumes; ``--sets`` and
``--variants`` split the work between processes.

    .venv/bin/python scripts/bench_recipe.py --threads 1 --sets pneumonia:0.05 adrenal3d
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transfer_data as data  # noqa: E402

from medtl import bundle as bundles  # noqa: E402
from medtl.config import load_config  # noqa: E402
from medtl.metrics import expected_calibration_error  # noqa: E402
from medtl.pipeline import train  # noqa: E402
from medtl.transforms import build_transforms  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = {"pneumonia": "pneumonia_scratch.yaml", "adrenal3d": "adrenal3d_scratch.yaml", "mednist": "mednist_source.yaml"}
POSITIVE = {"pneumonia": "pneumonia", "adrenal3d": "hyperplasia", "mednist": None}
VARIANTS = ("template", "auto_single", "auto")


def mednist_manifest(args) -> Path:
    """Six MedNIST classes: ``--mednist-per-class`` training and 100 test images per class."""
    manifest = args.work / "data" / "mednist" / f"manifest_{args.mednist_per_class}.csv"
    if manifest.is_file():
        return manifest
    extracted = data.extract_mednist(args.data / "mednist" / "MedNIST.tar", args.work / "data" / "mednist", args.mednist_per_class + 100)
    rows = data.read_rows(extracted)
    by_class: dict[str, list[dict]] = {}
    for row in rows:
        by_class.setdefault(row["label"], []).append(row)
    out = []
    for _, group in sorted(by_class.items()):
        order = np.random.default_rng(0).permutation(len(group))
        out += [{**group[i], "split": "test" if rank < 100 else ""} for rank, i in enumerate(order)]
    return data._write_manifest(manifest, out)


def manifest_for(name: str, args) -> Path:
    if name == "mednist":
        return mednist_manifest(args)
    task, _, fraction = name.partition(":")
    npz = {"pneumonia": "pneumoniamnist/pneumoniamnist_trainval_28.npz", "adrenal3d": "adrenalmnist3d/adrenalmnist3d_trainval_28.npz"}[task]
    classes = data.PNEUMONIA_CLASSES if task == "pneumonia" else data.ADRENAL_CLASSES
    pool = data.write_target(args.data / npz, args.work / "data" / task, classes, volumes=task == "adrenal3d")
    return data.subset_manifest(pool, float(fraction or 1), seed=0)[0]


def run_variant(name: str, variant: str, manifest: Path, args) -> dict:
    out = args.work / "runs" / name.replace(":", "_") / variant
    done = out / "outcome.json"
    if done.is_file():
        return json.loads(done.read_text())
    task = name.partition(":")[0]
    overrides = [f"data.manifest={manifest}", "data.num_workers=0"]
    if POSITIVE[task]:
        overrides.append(f"data.positive_class={POSITIVE[task]}")
    if variant == "template":
        config = load_config(ROOT / "configs" / TEMPLATES[task], [*overrides, "train.folds=1"])
    else:
        config = load_config(None, overrides + (["train.folds=1"] if variant == "auto_single" else []))
    started = time.perf_counter()
    outcome = train(config, out)
    result = {"metrics": outcome.metrics, "training": outcome.training, "wall_seconds": round(time.perf_counter() - started, 1)}
    result["members_calibrated_ece"] = members_calibrated_ece(outcome.bundle, manifest)
    done.write_text(json.dumps(result, default=str))
    return result


@torch.inference_mode()
def members_calibrated_ece(bundle: Path, manifest: Path) -> float | None:
    """For an ensemble bundle, the test ECE of the other way to combine members: calibrate each
    member's log-probabilities with the bundle's calibrator, then average (the bundle averages first)."""
    predictor = bundles.load(bundle)
    if not hasattr(predictor.model, "members"):
        return None
    rows = [r for r in data.read_rows(manifest) if r["split"] == "test"]
    chain = build_transforms(predictor.preprocessing, train=False)
    images = torch.stack([chain({"image": str(manifest.parent / r["image"])})["image"] for r in rows])
    member_logits = predictor.model.member_logits(images).log_softmax(dim=2).double().numpy()
    probs = np.mean([predictor.calibrate(z) for z in member_logits], axis=0)
    labels = np.array([predictor.classes.index(r["label"]) for r in rows])
    if predictor.positive_index is not None:
        return float(expected_calibration_error((labels == predictor.positive_index).astype(int), probs[:, predictor.positive_index]))
    return float(expected_calibration_error(labels, probs))


def summary_row(name: str, variant: str, result: dict) -> dict:
    m, t = result["metrics"], result["training"]
    cal = m["calibrated"]
    accuracy = cal["threshold_metrics"]["accuracy"] if "threshold_metrics" in cal else cal["accuracy"]
    auroc = cal["auroc"]
    return {
        "set": name, "variant": variant, "n_test": m["n"],
        "auroc": round(auroc["auc"], 4), "auroc_lo": round(auroc["ci"][0], 4), "auroc_hi": round(auroc["ci"][1], 4),
        "accuracy": round(accuracy["value"], 4), "ece": round(cal["calibration"]["ece"]["value"], 4),
        "brier": round(cal["calibration"]["brier"]["value"], 4),
        "ece_members_calibrated": None if result.get("members_calibrated_ece") is None else round(result["members_calibrated_ece"], 4),
        "members": len(t.get("ensemble", {}).get("members", [])) or 1, "seconds": result["wall_seconds"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_recipe")
    parser.add_argument("--sets", nargs="+", default=["pneumonia:0.05", "pneumonia:0.25", "pneumonia:1", "mednist", "adrenal3d"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--mednist-per-class", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (e.g. 1 per process when running two)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.sets:
        manifest = manifest_for(name, args)
        for variant in args.variants:
            row = summary_row(name, variant, run_variant(name, variant, manifest, args))
            rows.append(row)
            print(json.dumps(row), flush=True)
    table = args.work / "results.csv"
    known = {(r["set"], r["variant"]): r for r in (csv.DictReader(open(table)) if table.is_file() else [])}
    known.update({(r["set"], r["variant"]): r for r in rows})
    with open(table, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(sorted(known.values(), key=lambda r: (r["set"], VARIANTS.index(r["variant"]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
