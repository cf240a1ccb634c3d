"""Scans in: manifests, readers for DICOM / NIfTI / 2D images, scan discovery and inventory,
synthetic data."""

from medtl.io.dicom import DicomReader, load_dicom, read_header
from medtl.io.discover import FoundScan, find_scans
from medtl.io.errors import ScanReadError
from medtl.io.inventory import COLUMNS as INVENTORY_COLUMNS
from medtl.io.inventory import inventory, unreadable_scans, write_inventory
from medtl.io.manifest import ManifestError, ScanRecord, assign_splits, read_manifest
from medtl.io.readers import LoadScand, ScanReader, scan_kind
from medtl.io.synthetic import write_synthetic, write_synthetic_3d, write_synthetic_multilabel

__all__ = [
    "DicomReader",
    "FoundScan",
    "INVENTORY_COLUMNS",
    "LoadScand",
    "ManifestError",
    "ScanReadError",
    "ScanReader",
    "ScanRecord",
    "assign_splits",
    "find_scans",
    "inventory",
    "load_dicom",
    "read_header",
    "read_manifest",
    "scan_kind",
    "unreadable_scans",
    "write_inventory",
    "write_synthetic",
    "write_synthetic_3d",
    "write_synthetic_multilabel",
]
