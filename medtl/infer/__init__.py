"""Batch inference with a bundle over folders of scans or manifests: fast, resumable, sharded."""

from medtl.infer.autobatch import auto_batch_size
from medtl.infer.batch import (
    Batch,
    ScanResult,
    default_workers,
    gather_inputs,
    iter_batches,
    iter_logits,
    load_batches,
    quick_fingerprint,
)
from medtl.infer.cam import CamWriter
from medtl.infer.predict import ERROR_COLUMNS, PredictSummary, predict_scans, uncertain
from medtl.infer.table import FORMATS, ResultTable, read_rows, write_table
from medtl.infer.tta import tta_logits, tta_probabilities

__all__ = [
    "ERROR_COLUMNS",
    "FORMATS",
    "Batch",
    "CamWriter",
    "PredictSummary",
    "ResultTable",
    "ScanResult",
    "auto_batch_size",
    "default_workers",
    "gather_inputs",
    "iter_batches",
    "iter_logits",
    "load_batches",
    "predict_scans",
    "quick_fingerprint",
    "read_rows",
    "tta_logits",
    "tta_probabilities",
    "uncertain",
    "write_table",
]
