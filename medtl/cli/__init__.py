"""The ``medtl`` command: one sub-command per module in this package, each with ``register``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback

from medtl import __version__
from medtl.threads import add_threads_option, apply_budget, set_wait_policy

# Each name is a module ``medtl.cli.<name>`` exposing ``register(subparsers)``; the order is
# the order ``medtl --help`` lists them in.
COMMANDS = ("synth", "scan", "train", "evaluate", "predict", "recalibrate", "adapt", "weights", "rank", "demo")
# The commands that run a model: they take --threads, and medtl sets torch's thread pools for them
# (medtl/threads.py); scan takes its worker processes from the same CPU count.
MODEL_COMMANDS = ("train", "evaluate", "predict", "recalibrate", "adapt", "rank", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medtl",
        description="Transfer learning for medical imaging: train, calibrate, evaluate and deploy scan classifiers.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logs from medtl, and the traceback of an error.")
    parser.add_argument("--version", action="version", version=f"medtl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"medtl.cli.{name}").register(sub)
    for name in MODEL_COMMANDS:
        add_threads_option(sub.choices[name])
    for command in sub.choices.values():  # -v also after the command; SUPPRESS keeps one given before it
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def configure_logging(verbose: bool) -> None:
    """INFO for everything; with ``verbose``, DEBUG for medtl's own loggers only (third-party
    DEBUG output, e.g. pylibjpeg's per-frame lines, would drown it)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("medtl").setLevel(logging.DEBUG if verbose else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # the parsers import no torch
    configure_logging(args.verbose)
    try:
        if args.command in MODEL_COMMANDS:
            set_wait_policy()  # before the command imports torch, whose OpenMP runtime reads it once
            apply_budget(args.threads)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:  # bad input: configs, manifests, scans, bundles, weights, files
        if args.verbose:
            traceback.print_exc()
        lines = str(err).splitlines() or [type(err).__name__]
        print("\n".join(f"error: {line}" if i == 0 or not line.startswith(" ") else line for i, line in enumerate(lines)),
              file=sys.stderr)
        if not args.verbose:
            print("(run with -v for the traceback)", file=sys.stderr)
        return 2
