"""``medtl scan INPUT_DIR [--out inventory.csv] [--workers N] [--mode auto|processes|threads]``: inventory a
folder of scans from headers only."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "scan",
        help="Inventory a folder of scans: series, sizes, spacing, problems.",
        description="Walk INPUT_DIR and list one row per DICOM series (grouped by study and series UID) or scan file: "
        "image (the path; in the CSV relative to its folder, so 'medtl predict' takes the inventory as input), kind, "
        "modality, dimensions, spacing, slices or frames, transfer syntax, and the problems the reader would meet "
        "(two series in one folder, missing slices, no pixel data, missing decoder, unreadable files). "
        "Reads headers only, in parallel; writes no patient identifiers.",
    )
    p.add_argument("input_dir", type=Path, help="Folder to scan (recursively; hidden files skipped).")
    p.add_argument("--out", type=Path, default=None, help="Inventory CSV to write (default: print a summary only).")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="Header-reading workers (default: the CPUs this process may use for processes, 8 for threads; "
                   "1 reads in this process).")
    p.add_argument("--mode", choices=("auto", "processes", "threads"), default="auto",
                   help="processes: parse headers on every core (local disks); threads: overlap the round trips of a "
                   "network share; auto (default): threads on a network file system (NFS, SMB/CIFS, ...), else processes.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medtl.io import inventory, write_inventory

    rows = inventory(args.input_dir, workers=args.workers, mode=args.mode, progress=True)
    kinds = Counter(r["kind"] for r in rows)
    flagged = [r for r in rows if r["problems"]]
    print(f"{len(rows)} scans under {args.input_dir}: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
    for row in flagged[:20]:
        print(f"  {row['image']}: {row['problems']}")
    if len(flagged) > 20:
        print(f"  ... and {len(flagged) - 20} more with problems")
    if args.out:
        print(f"inventory: {write_inventory(rows, args.out)}")
    return 0
