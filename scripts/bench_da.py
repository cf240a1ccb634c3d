"""Domain adaptation on the synthetic two-site data: target-site AUROC, source-only vs each method.

Site A (labelled) is the source; site B's training scans are the unlabelled target; the score is
AUROC on site B's held-out labelled scans in ``test/`` (never seen in training).  Every method
trains the same backbone from the same seed; AdaBN and TENT adapt the source-only model after
training.  Prints a mean ± sd table over seeds and each method's gain over source-only.

    .venv/bin/python scripts/bench_da.py --seeds 0 1 2 3 4 --epochs 20 --size 64
    .venv/bin/python scripts/bench_da.py --seeds 0 1 2 3 4 --epochs 10 --size 48 \
        --weights bundle:runs/transfer_study/runs/mednist_source/bundle
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from monai.utils import set_determinism

from medtl.adapt import adapt_normalization, make_domain_loss, make_strategy
from medtl.backbones import create, preprocessing_for
from medtl.config import AdaptConfig, TrainConfig
from medtl.io import assign_splits, read_manifest, write_synthetic
from medtl.metrics import auroc_point
from medtl.train import Trainer, labelled_items, make_loader, predict_logits, softmax
from medtl.transforms import build_transforms, make_preprocessing

TRAINED = ("none", "dann", "cdan", "coral", "mmd")
AFTER = ("adabn", "tent")


def loaders(root: Path, size: int, batch: int, weights: str) -> dict:
    paths = write_synthetic(root, seed=0, test_per_site=100)
    records = read_manifest(paths["manifest"])
    source = assign_splits([r for r in records if r.site == "A"], val_fraction=0.2, seed=0)
    target = [replace(r, label=None) for r in records if r.site == "B"]
    test = [r for r in read_manifest(paths["test_labels"]) if r.site == "B"]
    classes = ["normal", "opacity"]
    pre = make_preprocessing(spatial_dims=2, image_size=size, channels=1, intensity="auto", ct_window=(40.0, 400.0),
                             normalization=preprocessing_for("resnet18", weights))
    train_t, eval_t = build_transforms(pre, train=True), build_transforms(pre, train=False)
    args = dict(batch_size=batch, num_workers=0, cache="memory")
    target_items = [{"image": str(r.image), "label": -1} for r in target]
    return {
        "train": make_loader(labelled_items([r for r in source if r.split == "train"], classes), train_t, shuffle=True, **args),
        "val": make_loader(labelled_items([r for r in source if r.split == "val"], classes), eval_t, shuffle=False, **args),
        "target": make_loader(target_items, train_t, shuffle=True, **args),
        "target_eval": make_loader(target_items, eval_t, shuffle=False, **args),
        "test_b": make_loader(labelled_items(test, classes), eval_t, shuffle=False, **args),
    }


def run(data: dict, method: str, seed: int, epochs: int, weight: float, weights: str) -> tuple[Trainer, float]:
    set_determinism(seed=seed)
    model = create("resnet18", weights=weights, in_channels=1, num_classes=2)
    tcfg = TrainConfig(epochs=epochs, lr=1e-3, head_lr=1e-3, patience=epochs, seed=seed, device="cpu")
    domain = make_domain_loss(method, model.feature_dim, 2, weight=weight)
    trainer = Trainer(model, make_strategy(AdaptConfig()), tcfg, domain=domain)
    trainer.fit(data["train"], data["val"], target_loader=data["target"] if domain else None, target_eval_loader=data["target_eval"])
    return trainer, target_auroc(trainer.model, data["test_b"])


def target_auroc(model, loader) -> float:
    logits, labels = predict_logits(model, loader, "cpu")
    return auroc_point(labels, softmax(logits))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--weight", type=float, default=1.0, help="adapt.domain_weight")
    parser.add_argument("--weights", default="none", help="model.weights of the ResNet-18 (e.g. bundle:PATH); default: from scratch")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[str, list[float]] = {m: [] for m in (*TRAINED, *AFTER)}
    seconds: dict[str, float] = {m: 0.0 for m in results}
    with tempfile.TemporaryDirectory() as tmp:
        data = loaders(Path(tmp), args.size, args.batch, args.weights)
        for seed in args.seeds:
            for method in TRAINED:
                start = time.perf_counter()
                trainer, score = run(data, method, seed, args.epochs, args.weight, args.weights)
                seconds[method] += time.perf_counter() - start
                results[method].append(score)
                print(f"seed {seed} {method:6s} target AUROC {score:.3f}", flush=True)
                if method == "none":
                    for after in AFTER:
                        start = time.perf_counter()
                        model = copy.deepcopy(trainer.model)
                        adapt_normalization(model, after, data["target_eval"], device="cpu")
                        results[after].append(target_auroc(model, data["test_b"]))
                        seconds[after] += time.perf_counter() - start
                        print(f"seed {seed} {after:6s} target AUROC {results[after][-1]:.3f}", flush=True)
    base = np.array(results["none"])
    print(f"\nresnet18 (weights: {args.weights}), {args.size} px, {args.epochs} epochs, seeds {args.seeds}; target = site B test scans")
    print("| method | target AUROC (mean ± sd) | gain vs source-only (mean ± sd) | seeds above source-only | per seed | seconds/seed |")
    print("|---|---|---|---|---|---|")
    for method, scores in results.items():
        s = np.array(scores)
        name = "source-only" if method == "none" else method
        gain = "" if method == "none" else f"{(s - base).mean():+.3f} ± {(s - base).std(ddof=1):.3f}"
        wins = "" if method == "none" else f"{int(np.sum(s > base))}/{len(s)}"
        per_seed = " / ".join(f"{v:.3f}" for v in s)
        print(f"| {name} | {s.mean():.3f} ± {s.std(ddof=1):.3f} | {gain} | {wins} | {per_seed} | {seconds[method] / len(args.seeds):.0f} |")


if __name__ == "__main__":
    main()
