"""Time ``medtl scan`` (medtl.io.inventory) on 10,000 small synthetic DICOM files.

Writes 100 CT series of 100 slices (16 x 16 pixels) under a temporary folder, then times, in
the same run: a baseline (a plain sequential ``pydicom.dcmread(stop_before_pixels=True)`` of
every file, no grouping or checks) and the inventory with 1, 2, 4 and 8 threads.

    .venv/bin/python scripts/bench_scan.py [--series 100] [--slices 100]
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

from medtl.io import inventory
from medtl.io.synthetic import write_dicom_series


def write_tree(root: Path, series: int, slices: int) -> list[Path]:
    """One series written properly, then copied with new UIDs and positions (fast to generate)."""
    template = write_dicom_series(root / "s0000", np.zeros((16, 16, slices)), spacing=(1, 1, 2), uid_seed="s0")
    headers = [pydicom.dcmread(p) for p in sorted(template.iterdir())]
    for s in range(1, series):
        folder = root / f"s{s:04d}"
        folder.mkdir()
        uid = pydicom.uid.generate_uid()
        for k, ds in enumerate(headers):
            copy_ = copy.copy(ds)
            copy_.SeriesInstanceUID = uid
            copy_.SOPInstanceUID = f"{uid[:58]}.{k}"
            copy_.save_as(folder / f"slice{k:04d}.dcm")
    return sorted(root.rglob("*.dcm"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=100)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8], help="header-reading threads to time")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        files = write_tree(root, args.series, args.slices)
        print(f"wrote {len(files)} DICOM files ({args.series} series x {args.slices}) in {time.perf_counter() - started:.1f} s; "
              f"{os.cpu_count()} CPU cores")
        started = time.perf_counter()
        for f in files:
            pydicom.dcmread(f, stop_before_pixels=True)
        baseline = time.perf_counter() - started
        print(f"baseline  sequential dcmread(stop_before_pixels): {baseline:6.2f} s  {len(files) / baseline:7.0f} files/s")
        for workers in args.threads:
            started = time.perf_counter()
            rows = inventory(root, workers=workers)
            took = time.perf_counter() - started
            assert len(rows) == args.series and not any(r["problems"] for r in rows)
            print(f"medtl scan, {workers} thread(s): {took:6.2f} s  {len(files) / took:7.0f} files/s  "
                  f"({baseline / took:.2f}x the baseline; {len(rows)} series rows)")


if __name__ == "__main__":
    main()
