"""A scan inventory from headers only: what is in a folder, and what is wrong with it.

Headers are read in parallel without pixel data (pydicom stops at the pixel data tag,
nibabel and PIL read their headers lazily).  DICOM files are grouped by StudyInstanceUID and
SeriesInstanceUID across the whole tree (not by folder); a cross-sectional series is one row, a
projection image (no slice position) one row per file.  Problems are the ones the reader would
meet later: a folder holding two series, missing or duplicate slices, mixed sizes or
orientations, no pixel data, a compressed syntax without a decoder, an unreadable file.

Header parsing is pure Python and holds the GIL, so it scales with cores only in worker
processes (``mode="processes"``, the default on local disks); on a network share, where each
file costs a round trip, threads overlap the waiting at less cost (``mode="threads"``, chosen
there by ``mode="auto"``).

Rows carry no patient identifiers: no names, IDs, dates or UIDs (series are told apart by a
short hash of their UID).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import multiprocessing
import os
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from tqdm.auto import tqdm

from medtl.io.dicom import decoder_hint, describe, float_values, is_image
from medtl.io.discover import list_files
from medtl.io.readers import scan_kind
from medtl.threads import usable_cpus

log = logging.getLogger(__name__)

COLUMNS = ("image", "kind", "modality", "dimensions", "spacing", "slices", "transfer_syntax", "series", "files", "problems")
_PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}
SCAN_MODES = ("auto", "processes", "threads")
NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "afs", "9p", "ceph", "glusterfs", "lustre", "gpfs",
                                 "beegfs", "fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.rclone", "fuse.glusterfs"})
THREAD_WORKERS = 8  # threads overlapping network round trips


@dataclass
class Header:
    """What one file's header says, or why it could not be read."""

    path: Path
    kind: str
    error: str | None = None
    modality: str = ""
    shape: tuple[int, ...] = ()  # (columns, rows[, slices or frames]) as the reader returns
    spacing: tuple[float, ...] = ()
    syntax: str = ""
    series: str = ""  # hash of Study + Series UID
    orientation: np.ndarray | None = None
    position: np.ndarray | None = None
    problems: list[str] = field(default_factory=list)


def _uid_hash(*uids: str) -> str:
    return hashlib.blake2b("/".join(uids).encode(), digest_size=5).hexdigest()


def _dicom_dataset(path: Path) -> tuple[pydicom.Dataset, bool]:
    """The header up to the pixel data, and whether the file has pixel data after it."""
    seen = []

    def stop(tag, vr, length) -> bool:
        if tag in _PIXEL_TAGS:
            seen.append(True)
            return True
        return False

    with open(path, "rb") as handle:
        try:
            ds = read_partial(handle, stop_when=stop)
        except InvalidDicomError:
            handle.seek(0)
            ds = read_partial(handle, stop_when=stop, force=True)
            if not any(k in ds for k in ("Rows", "SOPClassUID", "Modality")):
                raise InvalidDicomError("no DICM preamble and no DICOM header") from None
    return ds, bool(seen)


def _dicom_header(path: Path) -> Header:
    try:
        ds, has_pixels = _dicom_dataset(path)
    except Exception as err:  # reported as the file's problem
        return Header(path, "dicom", error=f"not a readable DICOM file ({type(err).__name__}: {err})")
    try:
        return _interpret(path, ds, has_pixels)
    except Exception as err:  # a malformed value (e.g. NumberOfFrames '1A')
        return Header(path, "dicom", error=f"not a readable DICOM header ({type(err).__name__}: {err})")


def _interpret(path: Path, ds: pydicom.Dataset, has_pixels: bool) -> Header:
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    header = Header(path, "dicom", modality=str(getattr(ds, "Modality", "") or ""), syntax=getattr(uid, "name", "") or "")
    if not is_image(ds) or not has_pixels:
        header.error = f"no pixel data: {describe(ds)}, not an image"
        return header
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    header.shape = (int(ds.Columns), int(ds.Rows)) + ((frames,) if frames > 1 else ())
    pixel = float_values(getattr(ds, "PixelSpacing", None) or getattr(ds, "ImagerPixelSpacing", None), 2)
    if pixel is not None:
        header.spacing = (float(pixel[1]), float(pixel[0]))
    header.series = _uid_hash(str(getattr(ds, "StudyInstanceUID", "")), str(getattr(ds, "SeriesInstanceUID", "")))
    header.orientation = float_values(getattr(ds, "ImageOrientationPatient", None), 6)
    header.position = float_values(getattr(ds, "ImagePositionPatient", None), 3)
    hint = decoder_hint(ds)
    if hint:
        header.problems.append(hint)
    return header


def _nifti_header(path: Path) -> Header:
    try:
        image = nib.load(str(path))
    except Exception as err:  # reported as the file's problem
        return Header(path, "nifti", error=f"not a readable NIfTI file ({type(err).__name__}: {err})")
    header = Header(path, "nifti", shape=tuple(int(s) for s in image.shape))
    header.spacing = tuple(round(float(z), 4) for z in image.header.get_zooms()[:3])
    if len(image.shape) > 3 and image.shape[3] > 1:
        header.problems.append(f"4D: {image.shape[3]} volumes (read as channels)")
    return header


def _image_header(path: Path) -> Header:
    try:
        with Image.open(path) as image:
            return Header(path, "image", shape=image.size, modality=image.mode)
    except Exception as err:  # reported as the file's problem
        return Header(path, "image", error=f"not a readable image ({type(err).__name__}: {err})")


def read_file_header(path: str | Path) -> Header | None:
    """The header of one scan file, or None for a file that is no scan at all."""
    path = Path(path)
    kind = scan_kind(path)
    readers = {"dicom": _dicom_header, "nifti": _nifti_header, "image": _image_header}
    return readers[kind](path) if kind else None


def _fmt(values: Iterable[float]) -> str:
    return " x ".join(f"{v:.4g}" for v in values)


def _row(path: Path, kind: str, first: Header, *, shape=None, spacing=None, slices: int = 1, files: int = 1,
         problems: Sequence[str] = ()) -> dict:
    return {
        "image": str(path),
        "kind": kind,
        "modality": first.modality,
        "dimensions": " x ".join(str(s) for s in (shape or first.shape)),
        "spacing": _fmt(spacing or first.spacing),
        "slices": slices,
        "transfer_syntax": first.syntax,
        "series": first.series,
        "files": files,
        "problems": "; ".join(dict.fromkeys(problems)),
    }


def _series_problems(members: list[Header]) -> tuple[list[str], float | None]:
    """Geometry problems of one series' slices and its median slice spacing."""
    problems = []
    if len({m.shape for m in members}) > 1:
        problems.append(f"slices of different sizes {sorted({m.shape for m in members})}")
    orientations = np.stack([m.orientation if m.orientation is not None else np.full(6, np.nan) for m in members])
    if np.isnan(orientations).any() or np.abs(orientations - orientations[0]).max() > 1e-3:
        problems.append("mixed or missing slice orientations")
        return problems, None
    normal = np.cross(orientations[0][:3], orientations[0][3:])
    steps = np.diff(np.sort(np.stack([m.position for m in members]) @ normal))
    spacing = float(np.median(steps))
    duplicates = int(np.sum(steps < 1e-4))
    if duplicates:
        problems.append(f"{duplicates} duplicate slice positions")
    uneven = np.abs(steps - spacing) > max(0.01 * spacing, 1e-3)
    if spacing > 0 and np.any(uneven & (steps > spacing)):
        missing = int(np.sum(np.round(steps[steps > spacing] / spacing) - 1))
        problems.append(f"missing slices: {missing} gap(s) in spacing {spacing:.4g} mm")
    elif np.any(uneven & (steps >= 1e-4)):
        problems.append(f"uneven slice spacing around {spacing:.4g} mm")
    return problems, spacing


def _dicom_rows(headers: list[Header]) -> list[dict]:
    rows = []
    series: dict[str, list[Header]] = defaultdict(list)
    for h in headers:
        if h.error:
            rows.append(_row(h.path, "unreadable" if "no pixel data" not in h.error else "dicom", h, problems=[h.error]))
        elif h.position is None or len(h.shape) == 3:  # projection image or multi-frame file: a scan on its own
            rows.append(_row(h.path, "dicom", h, slices=h.shape[2] if len(h.shape) == 3 else 1, problems=h.problems))
        else:
            series[h.series].append(h)
    per_folder: dict[Path, set[str]] = defaultdict(set)
    for key, members in series.items():
        for m in members:
            per_folder[m.path.parent].add(key)
    for key, members in series.items():
        members.sort(key=lambda m: str(m.path))
        first = members[0]
        if len(members) == 1:
            rows.append(_row(first.path, "dicom", first, problems=first.problems))
            continue
        folders = sorted({m.path.parent for m in members})
        problems = [p for m in members for p in m.problems]
        geometry, spacing = _series_problems(members)
        problems += geometry
        if len(folders) > 1:
            problems.append(f"series spread over {len(folders)} folders")
        shared = max(len(per_folder[f]) for f in folders)
        if shared > 1:
            problems.append(f"folder holds {shared} series (the reader needs one series per folder)")
        rows.append(_row(folders[0] if len(folders) == 1 else Path(*np.commonprefix([f.parts for f in folders])),
                         "dicom-series", first, shape=(*first.shape, len(members)),
                         spacing=(*first.spacing, spacing) if spacing else first.spacing,
                         slices=len(members), files=len(members), problems=problems))
    return rows


def filesystem_type(path: str | Path, mounts: str | Path = "/proc/mounts") -> str:
    """The file system type of the mount holding ``path`` ("" where the mount table is unreadable)."""
    target = os.path.realpath(path)
    best, kind = "", ""
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def scan_mode(path: str | Path, mode: str = "auto") -> str:
    """``processes`` or ``threads`` for reading the headers under ``path``: ``auto`` takes threads
    on a network file system (:data:`NETWORK_FILESYSTEMS`), processes otherwise."""
    if mode not in SCAN_MODES:
        raise ValueError(f"scan mode '{mode}': expected one of {', '.join(SCAN_MODES)}")
    if mode != "auto":
        return mode
    return "threads" if filesystem_type(path) in NETWORK_FILESYSTEMS else "processes"


def _read_headers(files: Sequence[Path], workers: int, mode: str, progress: bool) -> list[Header | None]:
    """Every file's header, in order: in this process (one worker), in ``workers`` threads, or in
    ``workers`` processes that each take chunks of files (fewer round trips between processes)."""
    bar = dict(total=len(files), desc="reading headers", unit="file", disable=not progress)
    workers = max(1, min(workers, len(files)))
    if workers == 1:
        return list(tqdm(map(read_file_header, files), **bar))
    pool: Executor
    if mode == "threads":
        pool, chunk = ThreadPoolExecutor(max_workers=workers), 1
    else:  # fork where it is safe: a spawned worker would re-import torch and MONAI (seconds each)
        context = multiprocessing.get_context("fork") if sys.platform.startswith("linux") else None
        pool, chunk = ProcessPoolExecutor(max_workers=workers, mp_context=context), max(1, min(256, len(files) // (8 * workers)))
    with pool:
        return list(tqdm(pool.map(read_file_header, files, chunksize=chunk), **bar))


def inventory(root: str | Path, *, workers: int | None = None, mode: str = "auto", progress: bool = False) -> list[dict]:
    """One row per series or scan file under ``root`` (see the module doc), sorted by path.

    ``mode`` (:func:`scan_mode`): ``processes`` reads headers in ``workers`` processes (default:
    the CPUs this process may use, :func:`medtl.threads.usable_cpus`), ``threads`` in ``workers``
    threads (default 8); ``workers=1`` reads them in this process."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder")
    mode = scan_mode(root, mode)
    if workers is None:
        workers = usable_cpus()[0] if mode == "processes" else THREAD_WORKERS
    if workers < 1:
        raise ValueError(f"workers={workers}: expected at least 1")
    files, broken = list_files(root)
    log.info("reading %d headers in %s", len(files), "this process" if min(workers, len(files)) <= 1 else f"{workers} {mode}")
    headers = _read_headers(files, workers, mode, progress)
    found = [h for h in headers if h is not None]
    found += [Header(link, "unreadable", error="a broken symbolic link or a symbolic link loop") for link in broken]
    rows = _dicom_rows([h for h in found if h.kind == "dicom"])
    for h in found:
        if h.kind != "dicom":
            rows.append(_row(h.path, h.kind if not h.error else "unreadable", h,
                             slices=h.shape[2] if len(h.shape) > 2 else 1, problems=[h.error] if h.error else h.problems))
    return sorted(rows, key=lambda r: r["image"])


def write_inventory(rows: Sequence[dict], out: str | Path) -> Path:
    """Write inventory rows as CSV, each ``image`` relative to the CSV's folder as in a manifest,
    so that the inventory is an input ``medtl predict`` takes as it is."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = out.resolve().parent
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({**row, "image": os.path.relpath(Path(row["image"]).resolve(), base)} for row in rows)
    return out


_FATAL = ("no pixel data", "not a readable", "no decoder", "different sizes", "mixed or missing", "duplicate", "holds")


def _scan_problems(path: Path) -> list[str]:
    """Why the reader would refuse ``path`` (a file, or a folder holding one DICOM series), from headers."""
    if not path.exists():
        return ["no such file or folder"]
    if path.is_file():
        header = read_file_header(path)
        if header is None:
            return ["not a scan medtl reads (DICOM, NIfTI .nii/.nii.gz, PNG/JPEG/BMP/TIFF)"]
        return [header.error] if header.error else [p for p in header.problems if p.startswith("no decoder")]
    headers = [h for h in map(read_file_header, sorted(p for p in path.iterdir() if p.is_file())) if h and h.kind == "dicom"]
    images = [h for h in headers if not h.error]
    if not images:
        return ["no DICOM images in this folder"]
    rows = _dicom_rows(images)
    if len(rows) > 1 and any(r["kind"] == "dicom-series" for r in rows):
        return [f"holds {len(rows)} DICOM series or images; give each series its own folder"]
    problems = [p for r in rows for p in r["problems"].split("; ") if p]
    return [p for p in problems if p.startswith(_FATAL)]


def unreadable_scans(paths: Sequence[str | Path], *, workers: int = 8, progress: bool = False) -> list[tuple[str, str]]:
    """``(path, reason)`` for each scan the reader would refuse, judged from headers only: cheap
    enough to run on every training scan before the first epoch."""
    paths = [Path(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = list(tqdm(pool.map(_scan_problems, paths), total=len(paths), desc="checking scans", unit="scan",
                          disable=not progress))
    return [(str(p), "; ".join(problems)) for p, problems in zip(paths, found) if problems]
