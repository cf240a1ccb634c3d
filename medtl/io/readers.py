"""One entry point for every scan format, as a MONAI reader and a dictionary transform.

:class:`ScanReader` picks the reader by what the file is (DICOM by suffix or preamble, NIfTI,
PNG/JPEG/BMP/TIFF), so a scan never falls through to a reader that half-understands it, and any
failure is a :class:`ScanReadError` naming the file.  :class:`LoadScand` is ``LoadImaged`` with
that reader and nothing else.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from pathlib import Path

import torch
from monai.config import KeysCollection
from monai.data import ImageReader, NibabelReader, PILReader
from monai.transforms import LoadImage, MapTransform
from PIL import Image

from medtl.io.dicom import DICOM_SUFFIXES, DicomReader, is_dicom_file
from medtl.io.errors import ScanReadError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
KINDS = ("dicom", "nifti", "image")


def scan_kind(path: str | Path) -> str | None:
    """``dicom``, ``nifti``, ``image`` or ``None`` (not a scan): by suffix, else by the DICOM
    preamble; a folder is a DICOM series."""
    path = Path(path)
    if path.is_dir():
        return "dicom"
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(IMAGE_SUFFIXES):
        return "image"
    if name.endswith(DICOM_SUFFIXES) or is_dicom_file(path):
        return "dicom"
    return None


def _flatten_pil(img: Image.Image) -> Image.Image:
    """Palette images become their colours (not their indices); CMYK becomes RGB; grey + alpha
    becomes grey."""
    if img.mode in ("P", "PA", "CMYK"):
        return img.convert("RGB")
    if img.mode == "LA":
        return img.convert("L")
    return img


class ScanReader(ImageReader):
    """Reads DICOM files and series folders (:class:`DicomReader`), NIfTI (nibabel) and 2D
    images (PIL); ``voi`` applies DICOM VOI LUTs / windows."""

    def __init__(self, voi: bool = False) -> None:
        super().__init__()
        self.readers: dict[str, ImageReader] = {
            "dicom": DicomReader(voi=voi),
            "nifti": NibabelReader(),
            "image": PILReader(converter=_flatten_pil),
        }

    def verify_suffix(self, filename) -> bool:
        path = filename[0] if isinstance(filename, (list, tuple)) else filename
        return scan_kind(path) is not None

    def read(self, data, **kwargs):
        path = Path(data[0] if isinstance(data, (list, tuple)) else data)
        if not path.exists():
            raise ScanReadError(path, "a broken symbolic link or a symbolic link loop" if path.is_symlink() else "no such file or folder")
        kind = scan_kind(path)
        if kind is None:
            raise ScanReadError(path, "not a scan medtl reads (DICOM, NIfTI .nii/.nii.gz, PNG/JPEG/BMP/TIFF)")
        reader = self.readers[kind]
        try:
            return reader, reader.get_data(reader.read(str(path)))
        except ScanReadError:
            raise
        except Exception as err:  # every reader failure becomes one named, reasoned error
            raise ScanReadError(path, f"cannot read as {kind} ({type(err).__name__}: {err})") from err

    def get_data(self, img):
        return img[1]


def check_finite(image: torch.Tensor, path: str | Path) -> torch.Tensor:
    """``image`` unchanged, or :class:`ScanReadError` when any value is NaN or infinite (one
    such scan would otherwise turn its whole batch's statistics and outputs into NaN)."""
    if image.is_floating_point():
        bad = int((~torch.isfinite(image)).sum())
        if bad:
            raise ScanReadError(path, f"{bad} of {image.numel()} values are NaN or infinite")
    return image


class LoadScand(MapTransform):
    """Load the scan at ``data[key]`` with :class:`ScanReader` into a channel-first MetaTensor,
    refusing scans with NaN or infinite values."""

    def __init__(self, keys: KeysCollection, voi: bool = False) -> None:
        super().__init__(keys)
        self.reader = ScanReader(voi=voi)
        self._load = LoadImage(image_only=True, ensure_channel_first=True)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = check_finite(self._load(d[key], reader=self.reader), d[key])
        return d
