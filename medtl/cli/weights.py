"""``medtl weights list|verify|import``: which pretrained file goes where, and getting it there offline.

Only the parser lives here, so ``medtl --help`` does not import torch; the actions are in
:mod:`medtl.cli.weights_files`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

IMPORTABLE = ("imagenet:BACKBONE", "medicalnet", "radimagenet", "torchxrayvision")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "weights",
        help="Pretrained weights: what to put where for offline use; verify and import files.",
        description="List the registry's backbones and the weight files each source reads offline (file name, "
        "folder, sha256, origin); verify a file; import one into the local weights folder "
        "($MEDTL_WEIGHTS_DIR, default ~/.cache/medtl/weights) or, for ImageNet, torchvision's cache.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="Backbones, weight sources and where each file goes.")
    listing.add_argument("--source", help="Only this source (imagenet, medicalnet, radimagenet, torchxrayvision).")
    listing.add_argument("--backbone", help="Only this backbone.")
    verify = actions.add_parser("verify", help="Check a weights file: sha256, readable as a state dict, fits its backbone.")
    verify.add_argument("file", type=Path)
    importing = actions.add_parser("import", help="Check a downloaded weights file and put it where medtl looks for it.")
    importing.add_argument("source", help=f"One of: {', '.join(IMPORTABLE)}.")
    importing.add_argument("file", type=Path)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medtl.cli import weights_files as actions  # torch and torchvision: only when a weights command runs

    if args.action == "list":
        return actions.list_files(args.source, args.backbone)
    try:
        return actions.verify(args.file) if args.action == "verify" else actions.import_file(args.source, args.file)
    except actions.LOAD_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
