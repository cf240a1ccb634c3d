"""Domain adaptation on a real shift: PneumoniaMNIST X-rays moved to a simulated second site.

The source site is half of PneumoniaMNIST's official training split as it is.  The target site
is the other half, re-acquired: lower resolution (4x area downsampling, bilinear back to 28 px),
darker mid-tones (gamma 2.5 on [0, 1] intensities) and detector noise (Gaussian, sd 0.06 of the
range), every image with its own noise seed.  The strength was set with one source-only model
(seed 0, no adaptation method involved) so that its AUROC falls by about as much as published
external-site drops (0.995 clean to 0.882 shifted; Zech et al. 2018: 0.931 to 0.815).  The target half is unlabelled in training; the
score is AUROC on the official validation split (524 X-rays, never trained on) under the same
acquisition change, with DeLong 95 % CIs; the clean validation split gives the in-domain AUROC
for comparison.

Every row trains with ``medtl.pipeline.train`` from a config, as a user would: the fine-tuning
strategies start from the MedNIST-pretrained ResNet-18 of ``scripts/transfer_study.py`` (trained
there if absent) without domain adaptation; the domain-adaptation rows are the ``full`` recipe
plus ``adapt.domain`` and the unlabelled target manifest (``dann_im``: DANN with the epoch chosen by
the label-free information-maximisation score instead of source validation AUROC).  No setting was tuned on the target.

    .venv/bin/python scripts/bench_da_real.py --seeds 0 1 2

Runs are resumable (a finished run is read back), so the grid can be split across processes with
``--methods``; the table is printed from every finished run of the requested seeds.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.transforms import AdjustContrast, Resize
from PIL import Image
from sklearn.model_selection import train_test_split

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transfer_study  # noqa: E402

from medtl.config import load_config  # noqa: E402
from medtl.metrics import delong_test, expected_calibration_error, roc_auc  # noqa: E402
from medtl.pipeline import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("normal", "pneumonia")
GAMMA, NOISE_SD, DOWNSAMPLE = 2.5, 0.06, 4
# The transfer study's recipes (configs/pneumonia_*.yaml); gradual unfreezing is the full recipe's
# rates with one more block from the top unfrozen each epoch.
STRATEGIES = {
    "scratch": ("pneumonia_scratch.yaml", []),
    "full": ("pneumonia_finetune.yaml", []),
    "linear_probe": ("pneumonia_linear_probe.yaml", []),
    "lp_ft": ("pneumonia_lp_ft.yaml", []),
    "gradual_unfreeze": ("pneumonia_finetune.yaml", ["adapt.strategy=gradual_unfreeze"]),
}
# The full recipe plus a domain method (source-validation model selection, the default), and DANN
# once more with the label-free information-maximisation score choosing the epoch.
DOMAIN = {
    **{m: ["adapt.domain=" + m] for m in ("dann", "cdan", "coral", "mmd", "adabn", "tent")},
    "dann_im": ["adapt.domain=dann", "adapt.selection=im"],
}
METHODS = (*STRATEGIES, *DOMAIN)


def reacquire(image: np.ndarray, seed: int) -> np.ndarray:
    """The simulated second site's version of one uint8 X-ray (see the module docstring)."""
    x = torch.as_tensor(image, dtype=torch.float32)[None] / 255.0
    small = Resize([s // DOWNSAMPLE for s in image.shape], mode="area")(x)
    x = Resize(list(image.shape), mode="bilinear", align_corners=False)(small)
    x = AdjustContrast(gamma=GAMMA)(x.clamp(0, 1))
    x = x + NOISE_SD * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return (x.clamp(0, 1)[0].numpy() * 255).round().astype(np.uint8)


def write_data(npz: Path, out: Path) -> dict[str, Path]:
    """PNG files and manifests: source (train/val), unlabelled target, target and clean test sets."""
    manifests = {name: out / f"{name}.csv" for name in ("source", "target", "test_shifted", "test_clean")}
    if all(p.is_file() for p in manifests.values()):
        return manifests
    arrays = np.load(npz)
    images, labels = arrays["train_images"], arrays["train_labels"][:, 0]
    source_idx, target_idx = train_test_split(np.arange(len(labels)), test_size=0.5, stratify=labels, random_state=0)
    fit_idx, val_idx = train_test_split(source_idx, test_size=0.15, stratify=labels[source_idx], random_state=0)
    rows: dict[str, list[dict]] = {name: [] for name in manifests}

    def save(name: str, image: np.ndarray) -> str:
        (out / Path(name).parent).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(out / name)
        return name

    for split, indices in (("train", fit_idx), ("val", val_idx)):
        for i in sorted(indices):
            rows["source"].append({"image": save(f"source/{i:05d}.png", images[i]), "label": CLASSES[labels[i]], "split": split})
    for i in sorted(target_idx):
        rows["target"].append({"image": save(f"target/{i:05d}.png", reacquire(images[i], seed=int(i))), "label": ""})
    test_images, test_labels = arrays["val_images"], arrays["val_labels"][:, 0]
    for i, (image, label) in enumerate(zip(test_images, test_labels)):
        label = CLASSES[label]
        rows["test_clean"].append({"image": save(f"test_clean/{i:05d}.png", image), "label": label, "split": "test"})
        shifted = reacquire(image, seed=100_000 + i)
        rows["test_shifted"].append({"image": save(f"test_shifted/{i:05d}.png", shifted), "label": label, "split": "test"})
    for name, path in manifests.items():
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[name][0]))
            writer.writeheader()
            writer.writerows(rows[name])
    return manifests


def plot_examples(npz: Path, out: Path, n: int = 6) -> Path:
    """The first ``n`` validation X-rays of each class as stored and as the second site acquires them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arrays = np.load(npz)
    images, labels = arrays["val_images"], arrays["val_labels"][:, 0]
    chosen = [i for c in (0, 1) for i in np.flatnonzero(labels == c)[: n // 2]]
    fig, axes = plt.subplots(2, len(chosen), figsize=(1.6 * len(chosen), 3.6))
    for col, i in enumerate(chosen):
        for row, image in enumerate((images[i], reacquire(images[i], seed=100_000 + int(i)))):
            axes[row, col].imshow(image, cmap="gray", vmin=0, vmax=255)
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
        axes[0, col].set_title(CLASSES[labels[i]], fontsize=9)
    axes[0, 0].set_ylabel("source site")
    axes[1, 0].set_ylabel("target site")
    fig.suptitle(f"PneumoniaMNIST re-acquired: {DOWNSAMPLE}x lower resolution, gamma {GAMMA}, noise sd {NOISE_SD}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def recipe(method: str, seed: int, manifests: dict[str, Path], source_bundle: Path) -> tuple[str, list[str]]:
    """The config file and overrides of one row: a strategy recipe, or ``full`` plus a domain method."""
    config, extra = STRATEGIES.get(method) or ("pneumonia_finetune.yaml", [*DOMAIN[method], f"data.target_manifest={manifests['target']}"])
    weights = [] if config == "pneumonia_scratch.yaml" else [f"model.weights=bundle:{source_bundle}"]
    return config, [f"data.manifest={manifests['source']}", f"train.seed={seed}", *weights, *extra]


def run(method: str, seed: int, manifests: dict[str, Path], source_bundle: Path, work: Path) -> dict:
    """Train one row and score it on both test sets (read back if already done).  The target
    scores are kept for paired DeLong tests between rows of the same seed."""
    out = work / "runs" / f"{method}_seed{seed}"
    done = out / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    started = time.perf_counter()
    config_file, overrides = recipe(method, seed, manifests, source_bundle)
    config = load_config(ROOT / "configs" / config_file, [*overrides, "train.folds=1"])  # single models, as the rows compare
    outcome = train(config, out, num_workers=0)
    result = {"method": method, "seed": seed, "train_seconds": round(time.perf_counter() - started, 1)}
    for test in ("test_shifted", "test_clean"):
        labels, scores, calibrated = transfer_study.scores_on_test(outcome.bundle, manifests[test])
        auc = roc_auc(labels, scores)
        result[test] = {"auroc": auc.auc, "lo": auc.ci[0], "hi": auc.ci[1], "labels": labels, "scores": scores,
                        "ece": expected_calibration_error(np.array(labels), np.array(calibrated))}
    done.write_text(json.dumps(result))
    return result


def significant_vs_full(row: dict, full: dict) -> int:
    """+1 / -1 when the row's target AUROC is significantly above / below ``full``'s on the same
    seed (paired DeLong, p < 0.05), 0 otherwise."""
    a, b = row["test_shifted"], full["test_shifted"]
    test = delong_test(a["labels"], a["scores"], b["scores"])
    return 0 if test.pvalue >= 0.05 else int(np.sign(test.difference))


def table(results: list[dict]) -> str:
    """Markdown: per method, mean ± sd over seeds of target and clean AUROC and the paired gain over ``full``."""
    by = {(r["method"], r["seed"]): r for r in results}
    seeds = sorted({r["seed"] for r in results})
    lines = ["| method | target AUROC (shifted), mean ± sd | gain vs source-only `full` | seeds above `full` (significant / below significant) "
             "| target ECE (calibrated) | clean AUROC | per seed (target) | min/run |",
             "|---|---|---|---|---|---|---|---|"]
    for method in METHODS:
        rows = [by[method, s] for s in seeds if (method, s) in by]
        if not rows:
            continue
        target = np.array([r["test_shifted"]["auroc"] for r in rows])
        clean = np.array([r["test_clean"]["auroc"] for r in rows])
        base = np.array([by["full", r["seed"]]["test_shifted"]["auroc"] for r in rows if ("full", r["seed"]) in by])
        paired = method != "full" and len(base) == len(rows)
        gain = _mean_sd(target - base, signed=True) if paired else ""
        signs = [significant_vs_full(r, by["full", r["seed"]]) for r in rows] if paired else []
        wins = f"{int(np.sum(target > base))}/{len(rows)} ({signs.count(1)} / {signs.count(-1)})" if paired else ""
        ece = np.array([r["test_shifted"]["ece"] for r in rows])
        minutes = np.mean([r["train_seconds"] for r in rows]) / 60
        per_seed = " / ".join(f"{t:.3f}" for t in target)
        lines.append(f"| {method} | {_mean_sd(target)} | {gain} | {wins} | {_mean_sd(ece)} | {_mean_sd(clean)} | {per_seed} | {minutes:.1f} |")
    return "\n".join(lines)


def _mean_sd(values: np.ndarray, signed: bool = False) -> str:
    sd = f" ± {values.std(ddof=1):.3f}" if len(values) > 1 else ""
    return f"{values.mean():{'+' if signed else ''}.3f}{sd}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="the shared data folder")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "da_real", help="data, runs and results")
    parser.add_argument("--source-work", type=Path, default=ROOT / "runs" / "transfer_study",
                        help="transfer_study's work folder holding (or to hold) the MedNIST source bundle")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    npz = args.data / "pneumoniamnist" / "pneumoniamnist_trainval_28.npz"
    if not npz.is_file():
        print(f"{npz}: missing (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    source_args = argparse.Namespace(data=args.data, work=args.source_work, mednist_per_class=2000, epochs=None)
    source_bundle, summary = transfer_study.pretrain_source(source_args)
    manifests = write_data(npz, args.work / "data")
    plot_examples(npz, args.work / "examples.png")
    for seed in args.seeds:
        for method in args.methods:
            r = run(method, seed, manifests, source_bundle.resolve(), args.work)
            t = r["test_shifted"]
            print(f"seed {seed} {method:16s} target AUROC {t['auroc']:.4f} [{t['lo']:.4f}, {t['hi']:.4f}], "
                  f"clean {r['test_clean']['auroc']:.4f}, {r['train_seconds']:.0f} s", flush=True)
    finished = [json.loads(p.read_text()) for p in sorted((args.work / "runs").glob("*_seed*/result.json"))]
    text = table([r for r in finished if r["seed"] in args.seeds])
    (args.work / "results.md").write_text(f"{summary}\n\n{text}\n")
    print(f"\n{summary}\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
