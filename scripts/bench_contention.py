"""Training and prediction beside a competing busy process, and header scanning in processes.

In one run, each probe in a fresh process (the OpenMP wait policy is read when torch loads):

- train: optimizer steps of the PneumoniaMNIST 28 px recipe (ResNet-18 from scratch, batch 32,
  medtl's ``Trainer``, tensors in memory as the recipe's memory cache has them) from
  ``../shared/data`` (random 28 px images where it is absent); images/s;
- predict: ``predict_scans`` (as ``medtl predict`` runs it, batch size 32, no shift check) over
  synthetic 128 px DICOM radiographs with a random-weight ResNet-18 bundle at 224 px; scans/s;

each quiet and beside one single-threaded busy process (a pure-Python loop; a numpy 256 x 256
matmul loop with one BLAS thread), in three thread settings: ``default`` (torch's own thread
counts and OpenMP wait, as before medtl/threads.py), ``budget`` (what the ``medtl`` command now
does) and ``threads1`` (the budget with ``--threads 1``).  Then ``medtl scan`` on 10,000 local
DICOM headers (100 series x 100 slices) with 1, 2 and N worker processes, against a bare
``pydicom.dcmread(stop_before_pixels=True)`` loop in as many processes.

    .venv/bin/python scripts/bench_contention.py [--steps 100] [--scans 300] [--parts train predict scan]

``--budget-env GOMP_SPINCOUNT=1000`` runs the budget rows with other wait settings (a user's,
which medtl keeps), to compare them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
PNEUMONIA = ROOT.parent / "shared" / "data" / "pneumoniamnist" / "pneumoniamnist_trainval_28.npz"
ROWS = ("default", "budget", "threads1")
CONDITIONS = {
    "quiet": None,
    "python": "while True: pass",
    "numpy": "import numpy as np\na = np.random.default_rng(0).random((256, 256))\nwhile True: a @ a",
}
CLEARED = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MEDTL_NUM_THREADS",
           "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


# ---- probes: run in a fresh process each ----------------------------------------------------------

def _setup(row: str) -> str:
    """Thread settings of ``row`` before and after torch loads; returns them in words."""
    if row == "default":
        import torch

        return f"torch default: {torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op"
    from medtl import threads

    threads.set_wait_policy()
    return threads.apply_budget(1 if row == "threads1" else None).describe()


def train_probe(steps: int) -> float:
    """images/s of ``steps`` optimizer steps of the PneumoniaMNIST 28 px recipe."""
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from medtl.adapt import make_strategy
    from medtl.backbones import create
    from medtl.config import TrainConfig
    from medtl.train import Trainer

    n = steps * 32
    if PNEUMONIA.is_file():
        arrays = np.load(PNEUMONIA)
        images, labels = arrays["train_images"], arrays["train_labels"][:, 0]
    else:
        rng = np.random.default_rng(0)
        images, labels = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 2, n)
    index = np.arange(n) % len(images)
    items = [{"image": torch.from_numpy(images[i][None].astype(np.float32) / 255), "label": int(labels[i])} for i in index]
    train = DataLoader(items, batch_size=32, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(items[:64], batch_size=64)
    torch.manual_seed(0)
    model = create("resnet18", weights="none", in_channels=1, spatial_dims=2, num_classes=2)
    cfg = TrainConfig(epochs=1, batch_size=32, lr=1e-3, device="cpu")
    return Trainer(model, make_strategy("full"), cfg).fit(train, val).history[-1]["images_per_s"]


def predict_probe(work: Path) -> float:
    """scans/s of ``predict_scans`` over ``work/scans`` with ``work/bundle``, as ``medtl predict`` runs it."""
    from medtl.bundle import load
    from medtl.infer import predict_scans

    predictor = load(work / "bundle").accelerate()
    out = Path(tempfile.mkdtemp()) / "preds.csv"
    started = time.perf_counter()
    summary = predict_scans(predictor, work / "scans", out, batch_size=32, shift_check=False, progress=False)
    return summary.predicted / (time.perf_counter() - started)


def probe(args: argparse.Namespace) -> None:
    settings = _setup(args.row)
    rate = train_probe(args.steps) if args.probe == "train" else predict_probe(Path(args.work))
    print(json.dumps({"rate": rate, "settings": settings}))


# ---- the run --------------------------------------------------------------------------------------

def run_probe(kind: str, row: str, condition: str, args: argparse.Namespace, work: Path) -> tuple[float, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    if row != "default":
        env.update(dict(kv.split("=", 1) for kv in args.budget_env))
    competitor = None
    if CONDITIONS[condition]:
        one = {**env, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        competitor = subprocess.Popen([sys.executable, "-c", CONDITIONS[condition]], env=one)
        time.sleep(1.0)
    try:
        cmd = [sys.executable, __file__, "--probe", kind, "--row", row, "--steps", str(args.steps), "--work", str(work)]
        done = subprocess.run(cmd, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, check=True)
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["rate"], result["settings"]


def contention(kind: str, args: argparse.Namespace, work: Path) -> None:
    unit = "images/s" if kind == "train" else "scans/s"
    rates: dict[tuple[str, str], float] = {}
    conditions, rows = ["quiet", *[c for c in args.conditions if c != "quiet"]], args.rows
    for condition in conditions:
        for row in rows:
            rates[row, condition], settings = run_probe(kind, row, condition, args, work)
            print(f"  {kind} {row:8s} {condition:12s} {rates[row, condition]:7.1f} {unit}   [{settings}]", flush=True)
    print(f"\n{kind} ({unit}; ratio vs the same row quiet; load average now {os.getloadavg()[0]:.2f})")
    print("| threads | " + " | ".join(conditions) + " | quiet vs default |")
    print("|---|" + "---|" * (len(conditions) + 1))
    for row in rows:
        quiet = rates[row, "quiet"]
        cells = [f"{quiet:.1f}"] + [f"{rates[row, c]:.1f} ({rates[row, c] / quiet:.2f}x)" for c in conditions[1:]]
        versus = f"{quiet / rates['default', 'quiet']:.2f}x" if "default" in rows else "-"
        print(f"| {row} | " + " | ".join(cells) + f" | {versus} |")
    print(flush=True)


def _bare(paths: list[str]) -> int:
    import pydicom

    for path in paths:
        pydicom.dcmread(path, stop_before_pixels=True)
    return len(paths)


def bare_loop(files: list[Path], workers: int) -> float:
    """Seconds for the bare dcmread loop over ``files`` in ``workers`` processes (chunks of files)."""
    paths = [str(f) for f in files]
    started = time.perf_counter()
    if workers == 1:
        _bare(paths)
    else:
        chunks = [paths[i:i + 256] for i in range(0, len(paths), 256)]
        with ProcessPoolExecutor(workers) as pool:
            sum(pool.map(_bare, chunks))
    return time.perf_counter() - started


def scan(args: argparse.Namespace) -> None:
    from bench_scan import write_tree

    from medtl.io import inventory
    from medtl.threads import usable_cpus

    cpus = usable_cpus()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = write_tree(root, args.series, args.slices)
        bare_loop(files, 1)  # page cache warm
        print(f"scan: {len(files)} DICOM files ({args.series} series x {args.slices}), {cpus} usable CPUs")
        print("| workers | bare dcmread loop | files/s | `medtl scan` | files/s | scan vs bare | scan vs scan 1 |")
        print("|---|---|---|---|---|---|---|")
        first = None
        for workers in sorted({1, 2, cpus, *args.scan_workers}):
            bare = bare_loop(files, workers)
            started = time.perf_counter()
            rows = inventory(root, workers=workers, mode="processes")
            took = time.perf_counter() - started
            assert len(rows) == args.series and not any(r["problems"] for r in rows)
            first = first or took
            print(f"| {workers} process{'es' if workers > 1 else ''} | {bare:.2f} s | {len(files) / bare:,.0f} | {took:.2f} s | "
                  f"{len(files) / took:,.0f} | {bare / took:.2f}x | {first / took:.2f}x |", flush=True)
        started = time.perf_counter()
        inventory(root, workers=8, mode="threads")
        took = time.perf_counter() - started
        print(f"| 8 threads (before: the default) | | | {took:.2f} s | {len(files) / took:,.0f} | | {first / took:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=("train", "predict", "scan"), default=["train", "predict", "scan"])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per training probe")
    parser.add_argument("--scans", type=int, default=300, help="scans per prediction probe")
    parser.add_argument("--series", type=int, default=100)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--scan-workers", type=int, nargs="*", default=[], help="more worker counts to time")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="thread settings to time")
    parser.add_argument("--conditions", nargs="+", choices=list(CONDITIONS), default=list(CONDITIONS),
                        help="competitors to time beside (quiet always runs)")
    parser.add_argument("--budget-env", nargs="*", default=[], metavar="NAME=VALUE", help="environment of the budget rows")
    parser.add_argument("--probe", choices=("train", "predict"), help=argparse.SUPPRESS)
    parser.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        return probe(args)
    print(f"load average at start {' / '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPU cores; "
          f"budget env {args.budget_env or 'medtl default'}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "predict" in args.parts:
            from bench_predict import make_bundle, write_scans

            write_scans(work / "scans", args.scans, 128)
            make_bundle(work / "bundle", 224)
        for kind in ("train", "predict"):
            if kind in args.parts:
                contention(kind, args, work)
    if "scan" in args.parts:
        scan(args)
    print(f"load average at end {' / '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
