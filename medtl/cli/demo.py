"""``medtl demo``: synthetic scans -> train -> evaluate -> predict, in a few minutes on a CPU."""

from __future__ import annotations

import argparse
import time
from importlib import resources
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="Run the whole pipeline on synthetic data.",
        description="Write a synthetic two-site chest X-ray data set (DICOM, PNG, NIfTI), train a classifier on it, "
        "evaluate the bundle on the held-out DICOM folder and predict that folder, printing where everything is. "
        "With --task multilabel each scan has overlapping findings (opacity, effusion, cardiomegaly) and the model "
        "one calibrated probability and threshold per finding.",
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="Folder for data, run and outputs (default runs/demo).")
    p.add_argument("--seed", type=int, default=0, help="Seed for the data and the training run (default 0).")
    p.add_argument("--task", choices=("binary", "multilabel"), default="binary",
                   help="binary: opacity or normal (default); multilabel: three overlapping findings per scan.")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Override a field of the demo config, e.g. --set train.epochs=3 (repeatable).",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medtl.cli.evaluate import headline
    from medtl.config import load_config
    from medtl.infer import predict_scans
    from medtl.io import write_synthetic, write_synthetic_multilabel
    from medtl.io.synthetic import FINDINGS
    from medtl.bundle import load
    from medtl.pipeline import evaluate, train

    start = time.perf_counter()
    out: Path = args.out
    print(f"[1/4] writing synthetic data to {out / 'data'}")
    multilabel = args.task == "multilabel"
    data = (write_synthetic_multilabel if multilabel else write_synthetic)(out / "data", seed=args.seed)
    task = ["task.type=multilabel", f"data.classes=[{','.join(FINDINGS)}]"] if multilabel else []
    config_file = resources.files("medtl") / "configs" / "demo.yaml"
    with resources.as_file(config_file) as path:
        config = load_config(path, [f"data.manifest={data['manifest']}", f"train.seed={args.seed}", *task, *args.overrides])
    print("[2/4] training")
    outcome = train(config, out / "run")
    print("[3/4] evaluating the bundle on the held-out DICOM folder")
    metrics = evaluate(outcome.bundle, data["test_labels"], out / "evaluation")
    print(f"[4/4] predicting {data['test_dir']}")
    summary = predict_scans(load(outcome.bundle), data["test_dir"], out / "predictions.csv")
    print(
        f"\ndone in {time.perf_counter() - start:.0f}s\n"
        f"  bundle:       {outcome.bundle}\n"
        f"  train report: {outcome.report}\n"
        f"  test report:  {out / 'evaluation' / 'report.html'} ({headline(metrics)})\n"
        f"  predictions:  {summary.out} ({summary.predicted} scans, {summary.failed} failed)"
    )
    return 0
