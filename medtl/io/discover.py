"""Find the scans under a folder: images and NIfTI files one by one, DICOM grouped into series.

DICOM files are grouped by SeriesInstanceUID within their folder, reading headers only.  Slices
of a cross-sectional series (files with ImagePositionPatient) make one scan, the folder; a
projection image (radiograph, no slice position) is a scan on its own even when it shares a
series with others, since stacking a PA and a lateral view would make no sense.
"""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pydicom
from tqdm.auto import tqdm

from medtl.io.readers import scan_kind

_SERIES_TAGS = ["SeriesInstanceUID", "ImagePositionPatient", "NumberOfFrames"]


@dataclass(frozen=True)
class FoundScan:
    """One scan: a file, or a folder holding one DICOM series of ``n_files`` slices."""

    path: Path
    kind: str
    n_files: int = 1


def _series_key(path: Path) -> tuple[str, bool] | None:
    """(SeriesInstanceUID, has a slice position), or None when the header cannot be read."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_SERIES_TAGS, force=True)
    except Exception:  # an unreadable file is still a scan: the reader will say why
        return None
    return str(getattr(ds, "SeriesInstanceUID", "")), "ImagePositionPatient" in ds


def list_files(root: Path) -> tuple[list[Path], list[Path]]:
    """The files under ``root`` (recursively, sorted; hidden ones skipped), and the symbolic
    links that lead nowhere (broken, or a loop), which a walk would otherwise pass over silently."""
    files, broken = [], []
    for p in sorted(root.rglob("*")):
        if any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        if p.is_file():
            files.append(p)
        elif p.is_symlink() and not p.exists():
            broken.append(p)
    return files, broken


def find_scans(root: str | Path, *, workers: int = 8, progress: bool = False) -> list[FoundScan]:
    """Every scan under ``root`` (recursively; hidden files skipped), sorted by path.  Symbolic
    links that lead nowhere are listed as ``unreadable``, so that the reader says why."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder")
    files, broken = list_files(root)
    kinds = {f: scan_kind(f) for f in files}
    scans = [FoundScan(f, k) for f, k in kinds.items() if k in ("nifti", "image")]
    scans += [FoundScan(link, "unreadable") for link in broken]
    dicom = [f for f, k in kinds.items() if k == "dicom"]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        keys = list(tqdm(pool.map(_series_key, dicom), total=len(dicom), desc="reading DICOM headers", unit="file", disable=not progress))
    slices: dict[tuple[Path, str], list[Path]] = defaultdict(list)
    for file, key in zip(dicom, keys):
        if key is None or not key[1] or not key[0]:
            scans.append(FoundScan(file, "dicom"))
        else:
            slices[file.parent, key[0]].append(file)
    for (folder, _), members in slices.items():
        if len(members) == 1:
            scans.append(FoundScan(members[0], "dicom"))
        else:
            scans.append(FoundScan(folder, "dicom", len(members)))
    unique = {s.path: s for s in scans}  # a folder holding two series appears once; reading it says why it fails
    return sorted(unique.values(), key=lambda s: str(s.path))
