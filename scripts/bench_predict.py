"""Batch-inference benchmark: the naive one-file-at-a-time loop vs ``medtl predict`` vs the
machine limit from its parts, on N synthetic DICOM files and a random-weight ResNet-18 bundle.

    .venv/bin/python scripts/bench_predict.py --n 2000

The limit is ``1 / (t_decode + t_prep + t_forward)`` per scan: decode-only time per file and
preprocessing time per file (intensity, resize, normalisation), both in one thread as in a
decode worker, and forward-only time per item at the best batch size (channels-last, as
``medtl predict`` runs it), all measured in this run on this machine.  Forward times in the
default memory layout are printed beside them.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medtl.backbones import create, preprocessing_for
from medtl.bundle import load, save
from medtl.calibrate import TemperatureScaling
from medtl.infer import predict_scans
from medtl.io import LoadScand
from medtl.io.synthetic import chest_phantom, write_dicom
from medtl.metrics import choose_operating_point
from medtl.transforms import IMAGE, make_preprocessing


def write_scans(folder: Path, n: int, size: int) -> list[Path]:
    """N DICOM chest phantoms (one template pixel array per 50 files keeps writing fast)."""
    rng = np.random.default_rng(0)
    templates = [chest_phantom(rng, size, bool(i % 2)) for i in range(min(n, 50))]
    paths = []
    for i in range(n):
        path = folder / f"p{i // 100:03d}" / f"scan{i:05d}.dcm"
        write_dicom(path, templates[i % len(templates)], patient=f"{i:05d}", uid_seed=str(i))
        paths.append(path)
    return paths


def make_bundle(folder: Path, image_size: int) -> Path:
    """A ResNet-18 bundle with random weights: temperature scaling and a Youden threshold fitted
    on random logits and labels."""
    torch.manual_seed(0)
    model = create("resnet18", weights="none", in_channels=1, spatial_dims=2, num_classes=2)
    pre = make_preprocessing(spatial_dims=2, image_size=image_size, channels=1, intensity="auto", ct_window=(40, 400),
                             normalization=preprocessing_for("resnet18", "none", in_channels=1))
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(200, 2)), rng.integers(0, 2, 200)
    calibrator = TemperatureScaling().fit(logits, labels)
    op = choose_operating_point(labels, calibrator.transform(logits)[:, 1], "youden")
    spec = {"backbone": "resnet18", "in_channels": 1, "spatial_dims": 2, "num_classes": 2, "weights": "none"}
    return save(folder, model, model_spec=spec, classes=["normal", "opacity"], positive_index=1, preprocessing=pre,
                calibrator=calibrator, operating_point=op)


def naive(bundle: Path, paths: list[Path], out: Path) -> float:
    """Seconds for the plain loop: one file through the transforms, batch size 1, one row appended."""
    start = time.perf_counter()
    predictor = load(bundle)
    chain = predictor.transforms()
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", *predictor.classes, "pred"])
        for path in paths:
            probs = predictor.calibrate(predictor.logits(chain({IMAGE: str(path)})[IMAGE][None]))
            writer.writerow([path.name, *probs[0].round(6), predictor.classes[int(predictor.decide(probs)[0])]])
            handle.flush()
    return time.perf_counter() - start


def forward_times(predictor, images: list[torch.Tensor], batch_sizes: list[int]) -> dict[int, float]:
    """Seconds per item of ``predictor.logits`` at each batch size (after one warm-up call)."""
    timings = {}
    for bs in batch_sizes:
        batch = torch.stack(images[:bs])
        predictor.logits(batch)
        reps = max(2, 64 // bs)
        start = time.perf_counter()
        for _ in range(reps):
            predictor.logits(batch)
        timings[bs] = (time.perf_counter() - start) / (reps * bs)
    return timings


def parts(bundle: Path, paths: list[Path], batch_sizes: list[int]) -> tuple[float, float, float, int]:
    """Per-scan decode, preprocessing and best forward times (s), and the best batch size."""
    predictor = load(bundle)
    decode, chain = LoadScand(IMAGE), predictor.transforms()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    start = time.perf_counter()
    for path in paths:
        decode({IMAGE: str(path)})
    t_decode = (time.perf_counter() - start) / len(paths)
    start = time.perf_counter()
    images = [chain({IMAGE: str(path)})[IMAGE] for path in paths]
    t_prep = (time.perf_counter() - start) / len(paths) - t_decode  # the whole chain less decoding
    torch.set_num_threads(threads)
    plain = forward_times(predictor, images, batch_sizes)
    fast = forward_times(predictor.accelerate(), images, batch_sizes)
    for label, timings in (("contiguous", plain), ("channels-last", fast)):
        print(f"forward ms/item, {label:13s} " + "  ".join(f"bs {bs}: {t * 1000:.1f}" for bs, t in timings.items()))
    best = min(fast, key=fast.get)
    return t_decode, t_prep, fast[best], best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="DICOM files (default 2000).")
    parser.add_argument("--size", type=int, default=128, help="Stored image size in pixels (default 128).")
    parser.add_argument("--image-size", type=int, default=224, help="Network input size (default 224).")
    parser.add_argument("--batch-size", default="auto", help="medtl predict batch size (default auto).")
    parser.add_argument("--workers", type=int, default=None, help="medtl predict decode workers (default: its own).")
    parser.add_argument("--naive-n", type=int, default=None, help="Files timed in the naive loop (default all).")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_scans(tmp / "scans", args.n, args.size)
        bundle = make_bundle(tmp / "bundle", args.image_size)
        print(f"{args.n} DICOM files {args.size}x{args.size}, resnet18 at {args.image_size} px, "
              f"{os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads)")

        naive_paths = paths[: args.naive_n] if args.naive_n else paths
        naive_rate = len(naive_paths) / naive(bundle, naive_paths, tmp / "naive.csv")

        predictor = load(bundle).accelerate()  # as the medtl predict command does
        batch_size = int(args.batch_size) if args.batch_size != "auto" else "auto"
        options = {} if args.workers is None else {"num_workers": args.workers}
        start = time.perf_counter()
        summary = predict_scans(predictor, tmp / "scans", tmp / "preds.csv", batch_size=batch_size, progress=False, **options)
        predict_rate = args.n / (time.perf_counter() - start)
        assert summary.predicted == args.n, summary

        sample = paths[: min(len(paths), 256)]
        t_decode, t_prep, t_forward, best = parts(bundle, sample, [1, 8, 16, 32, 64])
        limit = 1 / (t_decode + t_prep + t_forward)

    print(f"decode {t_decode * 1000:.2f} ms/file, preprocess {t_prep * 1000:.2f} ms/file, "
          f"forward {t_forward * 1000:.2f} ms/item (batch {best})")
    print(f"naive loop      {naive_rate:8.1f} scans/s")
    print(f"medtl predict   {predict_rate:8.1f} scans/s")
    print(f"machine limit   {limit:8.1f} scans/s")
    print(f"predict/naive   {predict_rate / naive_rate:8.2f}x")
    print(f"predict/limit   {predict_rate / limit:8.2f}")


if __name__ == "__main__":
    main()
