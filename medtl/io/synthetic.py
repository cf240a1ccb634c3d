"""The embedded synthetic data set: two-site chest-radiograph-like scans written as real files.

Each image is a smooth chest phantom (body, two dark lungs with rib shadows, mediastinum, spine)
with random anatomy; ``opacity`` cases carry a soft consolidation blob inside one lung.  The
sites differ the way real sites do:

- site A: a 12-bit DX detector, linear response, written as DICOM (MONOCHROME2, rescale
  slope 0.5 / intercept 100, 128 x 128 at 0.35 mm);
- site B: a gamma-compressed, noisier, lower-resolution system, written as 8-bit PNG and
  single-slice NIfTI (96 x 96).

The held-out ``test/`` folder holds DICOM files of other patients from both sites, site B's as
MONOCHROME1 (stored inverted), with ``test/labels.csv``.  :func:`write_synthetic_multilabel` writes
the same sites with several overlapping findings per scan (opacity, effusion, cardiomegaly).  Patient names and IDs in the DICOM
headers are synthetic; medtl never copies them into its outputs.  Deterministic by ``seed``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

CLASSES = ("normal", "opacity")
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
_SLOPE, _INTERCEPT = 0.5, 100.0


def chest_phantom(rng: np.random.Generator, size: int, opacity: bool, *, effusion: bool = False,
                  cardiomegaly: bool = False) -> np.ndarray:
    """A (size, size) float image in [0, 1], rows top to bottom; bright = dense.  ``effusion``
    fills the base of one lung with fluid density; ``cardiomegaly`` widens the heart shadow (both
    draw no random numbers when off, so the plain phantom's stream is unchanged)."""
    y, x = np.mgrid[0:size, 0:size] / size

    def ellipse(cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
        return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1

    def jitter(scale: float) -> float:
        return rng.uniform(-scale, scale)

    img = np.zeros((size, size))
    img[ellipse(0.55 + jitter(0.02), 0.5, 0.5, 0.44 + jitter(0.03))] = 0.55
    lungs = []
    for side in (-1, 1):
        lung = ellipse(0.45 + jitter(0.03), 0.5 + side * (0.18 + jitter(0.02)), 0.3 + jitter(0.03), 0.14 + jitter(0.015))
        lungs.append(lung)
        img[lung] = 0.18
    ribs = 0.06 * (np.sin(2 * np.pi * (y * (9 + jitter(1)) + 0.3 * np.abs(x - 0.5))) > 0.6)
    img += ribs * (lungs[0] | lungs[1])
    heart = 1.6 if cardiomegaly else 1.0
    img[ellipse(0.62 + jitter(0.02), 0.54 + jitter(0.02), 0.14 * heart ** 0.5, (0.11 + jitter(0.02)) * heart)] = 0.72
    img[(np.abs(x - 0.5) < 0.035) & (y > 0.1)] = 0.68
    if opacity:
        lung = lungs[int(rng.integers(2))]
        cy, cx = rng.choice(np.argwhere(lung)) / size
        sigma = rng.uniform(0.05, 0.09)
        blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma**2))
        img += rng.uniform(0.3, 0.45) * blob * ndimage.gaussian_filter(lung.astype(float), size * 0.03)
    if effusion:
        lung = lungs[int(rng.integers(2))]
        rows = np.flatnonzero(lung.any(axis=1))
        level = rows[-1] - rng.uniform(0.25, 0.4) * (rows[-1] - rows[0])  # a meniscus over the lung base
        img[lung & (y * size >= level)] = 0.5
    img = ndimage.gaussian_filter(img, size * 0.012)
    return np.clip(img + rng.normal(0, 0.01, img.shape), 0, 1)


def _site_image(rng: np.random.Generator, site: str, opacity: bool, **findings: bool) -> np.ndarray:
    """The phantom as site ``site`` acquires it, in [0, 1] (``findings``: of :func:`chest_phantom`)."""
    if site == "A":
        img = chest_phantom(rng, 128, opacity, **findings)
        return np.clip(img + rng.normal(0, 0.025, img.shape), 0, 1)
    img = chest_phantom(rng, 64, opacity, **findings) ** 0.6  # gamma-compressed detector, lower resolution
    img = ndimage.zoom(img, 96 / 64, order=1)
    return np.clip(img + rng.normal(0, 0.05, img.shape), 0, 1)


def write_dicom(path: Path, image: np.ndarray, *, patient: str, uid_seed: str, monochrome1: bool = False,
                pixel_spacing: float = 0.35) -> None:
    """A DX For Presentation file: 12 bits stored, rescale slope/intercept, synthetic patient."""
    raw = 150.0 + 1800.0 * image  # detector units
    stored = np.round((raw - _INTERCEPT) / _SLOPE)
    if monochrome1:
        stored = 4095 - stored
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[uid_seed, "instance"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[uid_seed, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[uid_seed, "series"])
    ds.PatientName = f"SYNTHETIC^{patient}"
    ds.PatientID = f"SYN-{patient}"
    ds.PatientBirthDate = "19700101"
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = image.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [pixel_spacing, pixel_spacing]
    ds.ImagerPixelSpacing = [pixel_spacing, pixel_spacing]
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = _SLOPE, _INTERCEPT, "US"
    ds.PixelData = stored.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _write_nifti(path: Path, image: np.ndarray) -> None:
    """A single-slice NIfTI, x along columns (MONAI's axis order), 0.5 mm pixels."""
    volume = np.ascontiguousarray(image.T[:, :, None].astype(np.float32))
    nib.save(nib.Nifti1Image(volume, np.diag([0.5, 0.5, 1.0, 1.0])), str(path))


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _write_scan(out: Path, rng: np.random.Generator, site: str, patient: str, visit: int, image: np.ndarray, seed: int) -> str:
    """Write one training scan as its site stores them (A: DICOM; B: PNG, a quarter NIfTI); its manifest name."""
    if site == "A":
        name = f"site_a/{patient}_{visit}.dcm"
        write_dicom(out / name, image, patient=patient, uid_seed=f"{seed}-{patient}-{visit}")
    elif rng.random() < 0.25:
        name = f"site_b/{patient}_{visit}.nii.gz"
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        _write_nifti(out / name, image)
    else:
        name = f"site_b/{patient}_{visit}.png"
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(image * 255).astype(np.uint8)).save(out / name)
    return name


def write_synthetic(out: str | Path, *, seed: int = 0, patients_per_site: int = 110, test_per_site: int = 50,
                    prevalence: float = 0.4) -> dict[str, Path]:
    """Write the data set under ``out``; returns the paths of ``manifest``, ``test_dir`` and
    ``test_labels``.  About 30 % of training patients have a second scan."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    rows, test_rows = [], []
    for site in ("A", "B"):
        for p in range(patients_per_site):
            patient = f"{site}{p:04d}"
            label = CLASSES[int(rng.random() < prevalence)]
            for visit in range(1 + int(rng.random() < 0.3)):
                image = _site_image(rng, site, label == "opacity")
                name = _write_scan(out, rng, site, patient, visit, image, seed)
                rows.append({"image": name, "label": label, "site": site, "patient_id": patient})
        for p in range(test_per_site):
            patient = f"T{site}{p:04d}"
            label = CLASSES[int(rng.random() < prevalence)]
            name = f"{patient}.dcm"
            write_dicom(out / "test" / name, _site_image(rng, site, label == "opacity"), patient=patient,
                        uid_seed=f"{seed}-{patient}", monochrome1=site == "B")
            test_rows.append({"image": name, "label": label, "site": site})
    _write_csv(out / "manifest.csv", rows)
    _write_csv(out / "test" / "labels.csv", test_rows)
    return {"manifest": out / "manifest.csv", "test_dir": out / "test", "test_labels": out / "test" / "labels.csv"}


FINDINGS = ("opacity", "effusion", "cardiomegaly")
UNREPORTED_AT_B = 0.2  # share of site B's scans whose report does not mention effusion (an unknown cell)


def _findings(rng: np.random.Generator) -> dict[str, bool]:
    """Overlapping findings: opacity 35 %, cardiomegaly 20 %, effusion 15 % alone and 50 % with cardiomegaly."""
    cardiomegaly = rng.random() < 0.2
    return {"opacity": rng.random() < 0.35, "effusion": rng.random() < (0.5 if cardiomegaly else 0.15), "cardiomegaly": cardiomegaly}


def _finding_cells(rng: np.random.Generator, site: str, findings: dict[str, bool]) -> dict[str, str]:
    """Manifest cells: 1 / 0, and blank (unknown) for effusion on a share of site B's scans."""
    cells = {name: str(int(present)) for name, present in findings.items()}
    if site == "B" and rng.random() < UNREPORTED_AT_B:
        cells["effusion"] = ""
    return cells


def write_synthetic_multilabel(out: str | Path, *, seed: int = 0, patients_per_site: int = 110,
                               test_per_site: int = 50) -> dict[str, Path]:
    """The two-site data set with several findings per scan (:data:`FINDINGS`: opacity, effusion,
    cardiomegaly, overlapping): ``manifest.csv`` has one 0/1 column per finding, blank where site
    B's report did not mention effusion (unknown); ``test/labels.csv`` the same for the held-out
    DICOM files.  Returns the paths as :func:`write_synthetic` does."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    rows, test_rows = [], []
    for site in ("A", "B"):
        for p in range(patients_per_site):
            patient = f"{site}{p:04d}"
            for visit in range(1 + int(rng.random() < 0.3)):
                findings = _findings(rng)
                image = _site_image(rng, site, findings["opacity"], effusion=findings["effusion"],
                                    cardiomegaly=findings["cardiomegaly"])
                name = _write_scan(out, rng, site, patient, visit, image, seed)
                rows.append({"image": name, **_finding_cells(rng, site, findings), "site": site, "patient_id": patient})
        for p in range(test_per_site):
            patient = f"T{site}{p:04d}"
            findings = _findings(rng)
            name = f"{patient}.dcm"
            image = _site_image(rng, site, findings["opacity"], effusion=findings["effusion"], cardiomegaly=findings["cardiomegaly"])
            write_dicom(out / "test" / name, image, patient=patient, uid_seed=f"{seed}-{patient}", monochrome1=site == "B")
            test_rows.append({"image": name, **{k: str(int(v)) for k, v in findings.items()}, "site": site})
    _write_csv(out / "manifest.csv", rows)
    _write_csv(out / "test" / "labels.csv", test_rows)
    return {"manifest": out / "manifest.csv", "test_dir": out / "test", "test_labels": out / "test" / "labels.csv"}


CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def write_dicom_series(folder: str | Path, volume: np.ndarray, *, spacing=(1.0, 1.0, 1.0), patient: str = "X",
                       uid_seed: str = "series", modality: str = "CT", shuffle_instances: bool = True) -> Path:
    """Write a (x, y, z) volume of Hounsfield-like values as a CT series, one file per slice:
    axial orientation, positions along z, rescale intercept -1024, InstanceNumbers shuffled (the
    reader must sort by position).  Synthetic patient name and ID."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stored = np.clip(np.round(np.asarray(volume, dtype=np.float64) + 1024), 0, 4095).astype(np.uint16)
    study = generate_uid(entropy_srcs=[uid_seed, "study"])
    series = generate_uid(entropy_srcs=[uid_seed, "series"])
    n = stored.shape[2]
    instances = np.random.default_rng(n).permutation(n) + 1 if shuffle_instances else np.arange(n) + 1
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[uid_seed, str(k)])
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = f"SYNTHETIC^{patient}", f"SYN-{patient}", "19700101"
        ds.Modality = modality
        ds.InstanceNumber = int(instances[k])
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, float(k * spacing[2])]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # (between rows, between columns)
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1.0, -1024.0
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        ds.save_as(folder / f"slice{k:04d}.dcm", enforce_file_format=True)
    return folder


def phantom_3d(rng: np.random.Generator, size: int, lesion: bool) -> np.ndarray:
    """A (size,)*3 volume in Hounsfield-like units: air, a soft-tissue ellipsoid (40 HU) with a
    darker core, and for ``lesion`` cases a bright blob (+120 HU) at a random place inside."""
    grid = np.stack(np.mgrid[0:size, 0:size, 0:size]) / size - 0.5
    radii = np.array([0.42, 0.36, 0.45]) + rng.uniform(-0.03, 0.03, 3)
    body = ((grid / radii[:, None, None, None]) ** 2).sum(0) <= 1
    volume = np.where(body, 40.0, -1000.0)
    volume[((grid / (radii[:, None, None, None] * 0.4)) ** 2).sum(0) <= 1] = 10.0
    if lesion:
        centre = rng.uniform(-0.18, 0.18, 3)
        blob = np.exp(-((grid - centre[:, None, None, None]) ** 2).sum(0) / (2 * rng.uniform(0.06, 0.09) ** 2))
        volume += 120.0 * blob * body
    volume = ndimage.gaussian_filter(volume, 0.6)
    return volume + rng.normal(0, 8.0, volume.shape)


def write_synthetic_3d(out: str | Path, *, n: int = 24, size: int = 24, fmt: str = "nifti", seed: int = 0) -> Path:
    """Write ``n`` small CT-like volumes, alternately normal and lesion, under ``out`` as NIfTI files
    (``fmt="nifti"``, 1.5 mm voxels, RAS) or DICOM series folders (``fmt="dicom"``), with
    ``out/manifest.csv``; returns the manifest path.  Deterministic by ``seed``."""
    if fmt not in ("nifti", "dicom"):
        raise ValueError(f"fmt must be 'nifti' or 'dicom', got '{fmt}'")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = ("normal", "lesion")[i % 2]
        volume = phantom_3d(rng, size, label == "lesion")
        patient = f"V{i:04d}"
        if fmt == "nifti":
            name = f"{patient}.nii.gz"
            nib.save(nib.Nifti1Image(volume.astype(np.float32), np.diag([1.5, 1.5, 1.5, 1.0])), str(out / name))
        else:
            name = patient
            write_dicom_series(out / name, volume, spacing=(1.5, 1.5, 1.5), patient=patient, uid_seed=f"{seed}-{patient}")
        rows.append({"image": name, "label": label, "patient_id": patient})
    _write_csv(out / "manifest.csv", rows)
    return out / "manifest.csv"
