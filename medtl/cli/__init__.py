"""The ``medtl`` command: one sub-command per module in this package, each with ``register``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Each name is a module ``medtl.cli.<name>`` exposing ``register(subparsers)``; the order is
# the order ``medtl --help`` lists them in.
COMMANDS = ("synth", "scan", "train", "evaluate", "predict", "recalibrate", "adapt", "weights", "rank", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medtl",
        description="Transfer learning for medical imaging: train, calibrate, evaluate and deploy scan classifiers.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="More log output.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"medtl.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:  # bad input: configs, manifests, scans, bundles, weights, files
        if args.verbose:
            raise
        print(f"error: {err}\n(run with -v for the traceback)", file=sys.stderr)
        return 2
