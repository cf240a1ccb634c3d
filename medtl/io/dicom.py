"""DICOM files and series read right, or refused loudly.

What this reader does that a plain pixel read does not:

- a series folder is sorted by slice position along the slice normal
  (ImageOrientationPatient x ImagePositionPatient), InstanceNumber only as the fallback; the slice
  spacing comes from the positions and is checked (duplicates and mixed sizes or orientations are
  errors, gaps a warning that names the series);
- multi-frame files (enhanced CT/MR per-frame positions included) become volumes;
- the Modality LUT (rescale slope/intercept) is applied, MONOCHROME1 is inverted so that higher
  always means brighter, PALETTE COLOR is mapped through its LUT, and the VOI LUT / window is
  applied only when asked;
- the affine is the patient-space one, converted from DICOM's LPS to RAS like MONAI's NIfTI reader;
- a compressed transfer syntax without a decoder says which syntax and which package to install.

Arrays follow MONAI's convention: the first spatial axis runs along a row (columns), the second
down the image (rows), the third across slices; colour is a trailing channel axis.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from monai.data import ImageReader
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder

from medtl.io.errors import ScanReadError

log = logging.getLogger(__name__)

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
CODECS_HINT = "pip install 'medtl[codecs]' (pylibjpeg with pylibjpeg-libjpeg, pylibjpeg-openjpeg, pylibjpeg-rle)"
_DECODER_PACKAGE = {
    "JPEG 2000": "pylibjpeg-openjpeg",
    "JPEG-LS": "pylibjpeg-libjpeg",
    "JPEG": "pylibjpeg-libjpeg",
    "RLE": "pylibjpeg-rle",
    "Deflate": "none (built into pydicom)",
}


def is_dicom_file(path: str | Path) -> bool:
    """True for a file with the DICOM preamble (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def read_header(path: str | Path, *, pixels: bool = False) -> pydicom.Dataset:
    """A DICOM dataset (without pixel data unless asked), or :class:`ScanReadError`.

    Files without the preamble are accepted when they still parse into a DICOM object (an image
    header, a SOP class or a modality), so that the error for them says what they are."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels)
    except InvalidDicomError:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=not pixels, force=True)
        except Exception as err:
            raise ScanReadError(path, f"not a DICOM file ({type(err).__name__}: {err})") from err
        if not any(keyword in ds for keyword in ("Rows", "SOPClassUID", "Modality")):
            raise ScanReadError(path, "not a DICOM file (no DICM preamble and no DICOM header)") from None
        ds.file_meta = getattr(ds, "file_meta", None) or pydicom.dataset.FileMetaDataset()
        return ds
    except (OSError, EOFError) as err:
        raise ScanReadError(path, f"cannot read the file ({type(err).__name__}: {err})") from err


def is_image(ds: pydicom.Dataset) -> bool:
    """True when a header (read with or without pixels) describes an image."""
    return "Rows" in ds and "Columns" in ds


def describe(ds: pydicom.Dataset) -> str:
    """What a DICOM object is, for messages: modality and SOP class (never patient data)."""
    sop = getattr(ds, "SOPClassUID", None) or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
    parts = [str(getattr(ds, "Modality", "") or ""), getattr(sop, "name", None) or str(sop or "")]
    known = [p for p in parts if p]
    return " ".join([known[0], f"({known[1]})"] if len(known) == 2 else known) or "DICOM object of unknown type"


def _syntax(ds: pydicom.Dataset) -> tuple[str, str]:
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return (str(uid), uid.name) if uid is not None else ("unknown", "unknown transfer syntax")


def decoder_hint(ds: pydicom.Dataset) -> str | None:
    """Why a compressed syntax cannot be decoded here and what to install; None when a decoder
    is installed (then the data itself is the problem)."""
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if uid is None or not uid.is_compressed:
        return None
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return f"pydicom has no decoder for transfer syntax {uid.name} ({uid}); convert the file (e.g. dcmtk's dcmdjpeg)"
    if decoder.is_available:
        return None
    package = next((pkg for key, pkg in _DECODER_PACKAGE.items() if key in uid.name), "a pydicom pixel-data plugin")
    return f"no decoder installed for transfer syntax {uid.name} ({uid}): install {package}, e.g. {CODECS_HINT}"


def _decode(ds: pydicom.Dataset, path: Path) -> np.ndarray:
    """Stored pixel values, with a decoder hint for compressed syntaxes that fail."""
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise ScanReadError(path, f"no pixel data: {describe(ds)}, not an image")
    hint = decoder_hint(ds)
    if hint:
        raise ScanReadError(path, hint)
    try:
        return ds.pixel_array
    except Exception as err:
        uid, name = _syntax(ds)
        message = " ".join(line.strip() for line in str(err).splitlines())
        if getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None) is not None and ds.file_meta.TransferSyntaxUID.is_compressed:
            raise ScanReadError(
                path,
                f"cannot decode transfer syntax {name} ({uid}) with the installed decoders: {message}. "
                "The data may be corrupt, or need another decoder (GDCM: pip install python-gdcm)",
            ) from err
        raise ScanReadError(path, f"pixel data cannot be read ({name}): {message}") from err


def _representable_range(ds: pydicom.Dataset) -> np.ndarray:
    bits = int(getattr(ds, "BitsStored", getattr(ds, "BitsAllocated", 16)))
    if int(getattr(ds, "PixelRepresentation", 0)) == 1:
        return np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1], dtype=np.float64)
    return np.array([0, 2**bits - 1], dtype=np.float64)


def to_display_values(stored: np.ndarray, ds: pydicom.Dataset, *, voi: bool = False) -> np.ndarray:
    """Stored values -> float32 values where higher means brighter.

    Monochrome: Modality LUT (slope/intercept), the VOI LUT or window when ``voi``, then
    MONOCHROME1 inverted within the representable range; PALETTE COLOR: RGB through the LUT;
    other colour images are returned as RGB."""
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        return np.asarray(apply_color_lut(stored, ds), dtype=np.float32)
    if not photometric.startswith("MONOCHROME"):
        return np.asarray(stored, dtype=np.float32)

    def transform(values: np.ndarray) -> np.ndarray:
        out = apply_modality_lut(values, ds)
        return apply_voi_lut(out, ds) if voi else out

    values = np.asarray(transform(stored), dtype=np.float64)
    if photometric == "MONOCHROME1":
        lo, hi = np.sort(np.asarray(transform(_representable_range(ds)), dtype=np.float64))
        values = lo + hi - values
    return values.astype(np.float32)


@dataclass
class _Geometry:
    row_cosine: np.ndarray
    column_cosine: np.ndarray
    pixel_spacing: tuple[float, float]  # (between rows, between columns), as DICOM
    positions: np.ndarray | None  # (n, 3) slice origins in LPS, sorted


def float_values(value, n: int) -> np.ndarray | None:
    """A DICOM multi-value as ``n`` float64 numbers, or None when absent or malformed."""
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return out if out.shape == (n,) else None


def _pixel_spacing(ds: pydicom.Dataset) -> tuple[float, float]:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = float_values(getattr(ds, keyword, None), 2)
        if value is not None and np.all(value > 0):
            return float(value[0]), float(value[1])
    return 1.0, 1.0


def _frame_item(ds: pydicom.Dataset, index: int, sequence: str, keyword: str):
    """A value from an enhanced multi-frame functional group (per-frame first, then shared)."""
    for container, i in ((getattr(ds, "PerFrameFunctionalGroupsSequence", None), index), (getattr(ds, "SharedFunctionalGroupsSequence", None), 0)):
        try:
            return getattr(getattr(container[i], sequence)[0], keyword)
        except (AttributeError, IndexError, TypeError, KeyError):
            continue
    return getattr(ds, keyword, None)


def _orientation(iop) -> tuple[np.ndarray, np.ndarray]:
    value = float_values(iop, 6)
    if value is None:
        return np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    return value[:3], value[3:]


def _affine(geometry: _Geometry, slice_step: np.ndarray) -> np.ndarray:
    """RAS affine of the (columns, rows, slices) array."""
    lps = np.eye(4)
    lps[:3, 0] = geometry.row_cosine * geometry.pixel_spacing[1]
    lps[:3, 1] = geometry.column_cosine * geometry.pixel_spacing[0]
    lps[:3, 2] = slice_step
    if geometry.positions is not None:
        lps[:3, 3] = geometry.positions[0]
    return _LPS_TO_RAS @ lps


def _check_spacing(positions: np.ndarray, normal: np.ndarray, where: str) -> tuple[float, bool]:
    """Slice spacing from sorted positions: duplicates are an error, uneven gaps a warning."""
    steps = np.diff(positions @ normal)
    if np.any(steps < 1e-4):
        count = int(np.sum(steps < 1e-4)) + 1
        raise ScanReadError(where, f"{count} slices share a position along the slice normal (duplicate slices); "
                                   "remove the duplicates or split the series")
    spacing = float(np.median(steps))
    uneven = np.abs(steps - spacing) > max(0.01 * spacing, 1e-3)
    if np.any(uneven):
        gaps = ", ".join(f"{s:.3g} mm after slice {i + 1}" for i, s in zip(np.flatnonzero(uneven)[:5], steps[uneven][:5]))
        log.warning("%s: uneven slice spacing (median %.4g mm; %s): missing slices?", where, spacing, gaps)
    return spacing, not np.any(uneven)


def _meta(ds: pydicom.Dataset, affine: np.ndarray, spatial_shape: Sequence[int], channel_last: bool, **extra) -> dict:
    """Header facts worth carrying; no patient identifiers."""
    uid, name = _syntax(ds)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))[: len(spatial_shape)]
    return {
        "affine": affine,
        "original_affine": affine.copy(),
        "spatial_shape": np.asarray(spatial_shape),
        "original_channel_dim": -1 if channel_last else float("nan"),
        "spacing": spacing,
        "Modality": str(getattr(ds, "Modality", "")),
        "PhotometricInterpretation": str(getattr(ds, "PhotometricInterpretation", "")),
        "TransferSyntaxUID": uid,
        "TransferSyntax": name,
        **extra,
    }


def _frame_positions(ds: pydicom.Dataset, frames: int, normal: np.ndarray) -> np.ndarray | None:
    """(frames, 3) LPS origins of a multi-frame file: enhanced per-frame positions, else
    ImagePositionPatient moved along the normal by GridFrameOffsetVector (RT dose, NM), else None."""
    groups = getattr(ds, "PerFrameFunctionalGroupsSequence", None)
    if groups is not None and len(groups) == frames:
        positions = [float_values(_frame_item(ds, i, "PlanePositionSequence", "ImagePositionPatient"), 3) for i in range(frames)]
        if all(p is not None for p in positions):
            return np.stack(positions)
    origin = float_values(getattr(ds, "ImagePositionPatient", None), 3)
    offsets = float_values(getattr(ds, "GridFrameOffsetVector", None), frames)
    if origin is not None and offsets is not None:
        # relative offsets (first 0) and absolute ones (first = the origin's) alike
        return origin[None] + (offsets - offsets[0])[:, None] * normal[None]
    return None


def _single_file(path: Path, *, voi: bool) -> tuple[np.ndarray, dict]:
    ds = read_header(path, pixels=True)
    values = to_display_values(_decode(ds, path), ds, voi=voi)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    colour = values.ndim == (4 if frames > 1 else 3)
    spacing = _pixel_spacing(ds)
    if frames == 1:
        row, col = _orientation(getattr(ds, "ImageOrientationPatient", None))
        ipp = float_values(getattr(ds, "ImagePositionPatient", None), 3)
        geometry = _Geometry(row, col, spacing, None if ipp is None else ipp[None])
        array = np.swapaxes(values, 0, 1)  # (rows, cols[, 3]) -> (cols, rows[, 3])
        affine = _affine(geometry, np.cross(row, col))
        return array, _meta(ds, affine, array.shape[:2], colour, n_slices=1)
    # multi-frame: (frames, rows, cols[, 3]) -> (cols, rows, frames[, 3]), frames in position order
    row, col = _orientation(_frame_item(ds, 0, "PlaneOrientationSequence", "ImageOrientationPatient"))
    measured = float_values(_frame_item(ds, 0, "PixelMeasuresSequence", "PixelSpacing"), 2)
    spacing = (float(measured[0]), float(measured[1])) if measured is not None else spacing
    normal = np.cross(row, col)
    pos = _frame_positions(ds, frames, normal)
    uniform = True
    if pos is not None:
        order = np.argsort(pos @ normal, kind="stable")
        values, pos = values[order], pos[order]
        step_length, uniform = _check_spacing(pos, normal, str(path))
        geometry = _Geometry(row, col, spacing, pos)
    else:
        step_length = float(getattr(ds, "SpacingBetweenSlices", 0) or getattr(ds, "SliceThickness", 0) or 1.0)
        geometry = _Geometry(row, col, spacing, None)
    array = np.moveaxis(values, 0, 2)
    array = np.swapaxes(array, 0, 1)
    affine = _affine(geometry, normal * step_length)
    return array, _meta(ds, affine, array.shape[:3], colour, n_slices=frames, slice_spacing_uniform=uniform)


def _series_files(folder: Path) -> list[tuple[Path, pydicom.Dataset]]:
    """The DICOM files directly in a folder, headers only; stray files are skipped, two series
    are an error naming both."""
    headers = []
    skipped = 0
    for file in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            ds = read_header(file)
        except ScanReadError:
            log.warning("%s: skipped %s (not a DICOM file)", folder, file.name)
            continue
        if is_image(ds):
            headers.append((file, ds))
        else:
            skipped += 1
            log.warning("%s: skipped %s (%s: not an image)", folder, file.name, describe(ds))
    if not headers:
        found = f" ({skipped} DICOM objects without an image)" if skipped else ""
        raise ScanReadError(folder, f"no DICOM images in this folder{found}")
    series = defaultdict(list)
    for file, ds in headers:
        series[str(getattr(ds, "SeriesInstanceUID", ""))].append(file)
    if len(series) > 1:
        listing = "; ".join(f"{uid or 'no SeriesInstanceUID'}: {len(files)} files" for uid, files in series.items())
        raise ScanReadError(
            folder,
            f"holds {len(series)} DICOM series ({listing}); give each series its own folder "
            "(medtl scan lists the series and their files)",
        )
    return headers


def _series(folder: Path, *, voi: bool) -> tuple[np.ndarray, dict]:
    headers = _series_files(folder)
    if len(headers) == 1:
        return _single_file(headers[0][0], voi=voi)
    first = headers[0][1]
    sizes = {(int(ds.Rows), int(ds.Columns)) for _, ds in headers}
    if len(sizes) > 1:
        raise ScanReadError(folder, f"slices of different sizes {sorted(sizes)} in one series")
    if any(int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 for _, ds in headers):
        raise ScanReadError(folder, "a series of multi-frame files is not supported; give each file on its own")
    orientations = [float_values(getattr(ds, "ImageOrientationPatient", None), 6) for _, ds in headers]
    positions = [float_values(getattr(ds, "ImagePositionPatient", None), 3) for _, ds in headers]
    row, col = _orientation(getattr(first, "ImageOrientationPatient", None))
    normal = np.cross(row, col)
    if all(o is not None for o in orientations) and all(p is not None for p in positions):
        if max(np.abs(o - orientations[0]).max() for o in orientations) > 1e-3:
            raise ScanReadError(folder, "slices with different ImageOrientationPatient (mixed orientations) in one series")
        pos = np.stack(positions)
        order = np.argsort(pos @ normal, kind="stable")
        pos = pos[order]
        step_length, uniform = _check_spacing(pos, normal, str(folder))
        step = (pos[-1] - pos[0]) / (len(pos) - 1)
        sorted_by = "position along the slice normal"
    else:
        numbers = [getattr(ds, "InstanceNumber", None) for _, ds in headers]
        if any(n is None for n in numbers):
            raise ScanReadError(folder, "slices have neither ImagePositionPatient/ImageOrientationPatient nor InstanceNumber: "
                                        "their order is unknown")
        order = np.argsort([int(n) for n in numbers], kind="stable")
        step_length = float(getattr(first, "SpacingBetweenSlices", 0) or getattr(first, "SliceThickness", 0) or 1.0)
        step, pos, uniform = normal * step_length, None, True
        sorted_by = "InstanceNumber (no slice positions)"
        log.warning("%s: no slice positions; slices sorted by InstanceNumber, spacing %.4g from the header", folder, step_length)
    slices = []
    for index in order:
        file = headers[index][0]
        ds = read_header(file, pixels=True)
        slices.append(to_display_values(_decode(ds, file), ds, voi=voi))
    values = np.stack(slices, axis=-1 if slices[0].ndim == 2 else -2)  # (rows, cols, n[, 3])
    array = np.swapaxes(values, 0, 1)
    affine = _affine(_Geometry(row, col, _pixel_spacing(first), pos), step)
    return array, _meta(
        first, affine, array.shape[:3], array.ndim == 4,
        n_slices=len(slices), slice_spacing=step_length, slice_spacing_uniform=uniform, sorted_by=sorted_by,
    )


def load_dicom(path: str | Path, *, voi: bool = False) -> tuple[np.ndarray, dict]:
    """``(array, meta)`` of a DICOM file or a folder holding one series (see the module doc)."""
    path = Path(path)
    if path.is_dir():
        return _series(path, voi=voi)
    if not path.is_file():
        raise ScanReadError(path, "no such file or folder")
    return _single_file(path, voi=voi)


class DicomReader(ImageReader):
    """MONAI reader for DICOM files and series folders, built on :func:`load_dicom`.

    ``voi=True`` applies the VOI LUT or window centre/width stored in the file."""

    def __init__(self, voi: bool = False) -> None:
        super().__init__()
        self.voi = voi

    def verify_suffix(self, filename) -> bool:
        path = Path(filename[0] if isinstance(filename, (list, tuple)) else filename)
        return path.is_dir() or path.suffix.lower() in DICOM_SUFFIXES or is_dicom_file(path)

    def read(self, data, **kwargs):
        paths = data if isinstance(data, (list, tuple)) else [data]
        if len(paths) != 1:
            raise ScanReadError(paths[0], "give a DICOM series as its folder, not as a list of files")
        return load_dicom(paths[0], voi=self.voi)

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        return img
