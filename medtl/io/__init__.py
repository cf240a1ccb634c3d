"""Scans in: manifests, readers for DICOM / NIfTI / 2D images, scan discovery, synthetic data."""

from medtl.io.dicom import DicomReader, load_dicom, read_header
from medtl.io.discover import FoundScan, find_scans
from medtl.io.errors import ScanReadError
from medtl.io.manifest import ManifestError, ScanRecord, assign_splits, read_manifest
from medtl.io.readers import LoadScand, ScanReader, scan_kind
from medtl.io.synthetic import write_synthetic

__all__ = [
    "DicomReader",
    "FoundScan",
    "LoadScand",
    "ManifestError",
    "ScanReadError",
    "ScanReader",
    "ScanRecord",
    "assign_splits",
    "find_scans",
    "load_dicom",
    "read_header",
    "read_manifest",
    "scan_kind",
    "write_synthetic",
]
