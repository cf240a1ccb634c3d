"""The dataset fingerprint: what the manifest and a sample of its scans say about a task.

Counts come from the whole manifest; geometry, colour, modality and intensity from up to
``sample`` scans read with the project's own reader (:class:`medtl.io.LoadScand`), chosen at
random with a fixed seed so a run's recipe is reproducible.  No patient identifier is kept.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from medtl.io import LoadScand, ScanReadError, ScanRecord

IMAGE = "image"


@dataclass
class Fingerprint:
    """Summary of a labelled data set that the recipe rules read (all JSON-able)."""

    scans: int
    patients: int
    per_class: dict[str, int]
    sites: int
    spatial_dims: int
    median_size: list[int]
    channels: int
    colour: bool
    median_spacing: list[float] | None
    modality: str
    intensity_range: list[float]
    sampled: int
    unreadable_in_sample: int = 0
    formats: dict[str, int] = field(default_factory=dict)
    splits: dict[str, int] = field(default_factory=dict)

    @property
    def classes(self) -> int:
        return len(self.per_class)

    @property
    def minority(self) -> int:
        """Scans of the rarest class (the events of a binary task)."""
        return min(self.per_class.values())

    @property
    def imbalance(self) -> float:
        """Largest over smallest class count."""
        return max(self.per_class.values()) / max(self.minority, 1)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "classes": self.classes, "minority": self.minority, "imbalance": round(self.imbalance, 3)}


def _spatial_shape(img) -> list[int]:
    """Spatial axes of a channel-first image, singleton axes (a 2D slice stored as a volume) dropped."""
    return [int(s) for s in img.shape[1:] if s > 1]


def _is_colour(img) -> bool:
    """Three or four channels that differ: RGB photographs (fundus, dermoscopy, pathology), not
    grey images saved as RGB."""
    if img.shape[0] < 3:
        return False
    rgb = np.asarray(img[:3], dtype=np.float32)
    spread = float(rgb.max() - rgb.min()) or 1.0
    return float(np.abs(rgb - rgb.mean(axis=0, keepdims=True)).mean()) > 0.01 * spread


def _spacing(img, dims: int) -> list[float] | None:
    meta = getattr(img, "meta", {}) or {}
    pixdim = meta.get("pixdim")
    if pixdim is not None:
        values = [float(v) for v in np.asarray(pixdim).ravel()[1 : dims + 1]]
        return values if len(values) == dims and all(v > 0 for v in values) else None
    return None


def _format(path) -> str:
    name = str(path).lower()
    for suffix, kind in ((".nii.gz", "nifti"), (".nii", "nifti"), (".dcm", "dicom"), (".png", "png"), (".jpg", "jpeg"),
                         (".jpeg", "jpeg"), (".bmp", "bmp"), (".tif", "tiff"), (".tiff", "tiff")):
        if name.endswith(suffix):
            return kind
    return "dicom"


def fingerprint(records: Sequence[ScanRecord], *, sample: int = 64, seed: int = 0) -> Fingerprint:
    """Fingerprint the labelled ``records``, reading at most ``sample`` of their scans."""
    labelled = [r for r in records if r.label]
    if not labelled:
        raise ValueError("no labelled scans to fingerprint")
    rng = np.random.default_rng(seed)
    chosen = [labelled[i] for i in sorted(rng.permutation(len(labelled))[:sample])]
    load = LoadScand(IMAGE)
    shapes, spacings, channels, colour, modalities, lows, highs, bad = [], [], [], [], Counter(), [], [], 0
    for record in chosen:
        try:
            img = load({IMAGE: str(record.image)})[IMAGE]
        except ScanReadError:
            bad += 1
            continue
        shape = _spatial_shape(img)
        shapes.append(shape)
        channels.append(int(img.shape[0]))
        colour.append(_is_colour(img))
        spacings.append(_spacing(img, len(shape)))
        modalities[str((getattr(img, "meta", {}) or {}).get("Modality", "") or "").upper() or "unknown"] += 1
        values = np.asarray(img, dtype=np.float32)
        lows.append(float(np.percentile(values, 0.5)))
        highs.append(float(np.percentile(values, 99.5)))
    if not shapes:
        raise ScanReadError(chosen[0].image, f"none of the {len(chosen)} sampled scans could be read")
    dims = Counter(len(s) for s in shapes).most_common(1)[0][0]
    # 2D readers give (columns, rows); sizes are stated as displayed, rows x columns, as image_size is
    same_dims = [s[::-1] if dims == 2 else s for s in shapes if len(s) == dims]
    kept_spacings = [s for s in spacings if s is not None and len(s) == dims]
    return Fingerprint(
        scans=len(labelled),
        patients=len({r.patient for r in labelled}),
        per_class=dict(sorted(Counter(r.label for r in labelled).items())),
        sites=len({r.site for r in labelled if r.site}),
        spatial_dims=3 if dims >= 3 else 2,
        median_size=[int(v) for v in np.median(np.array(same_dims), axis=0)][:3],
        channels=Counter(channels).most_common(1)[0][0],
        colour=sum(colour) > len(colour) / 2,
        median_spacing=[round(float(v), 4) for v in np.median(np.array(kept_spacings), axis=0)] if kept_spacings else None,
        modality=modalities.most_common(1)[0][0],
        intensity_range=[round(float(np.median(lows)), 4), round(float(np.median(highs)), 4)],
        sampled=len(shapes),
        unreadable_in_sample=bad,
        formats=dict(Counter(_format(r.image) for r in labelled)),
        splits=dict(Counter(r.split or "unassigned" for r in labelled)),
    )
