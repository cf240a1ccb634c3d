"""Batch inference with a bundle over folders of scans or manifests: fast, resumable, sharded."""

from medtl.infer.batch import ScanResult, fingerprint, gather_inputs, iter_batches, iter_logits
from medtl.infer.predict import ERROR_COLUMNS, PredictSummary, predict_scans, uncertain
from medtl.infer.table import FORMATS, ResultTable, read_rows, write_table

__all__ = [
    "ERROR_COLUMNS",
    "FORMATS",
    "PredictSummary",
    "ResultTable",
    "ScanResult",
    "fingerprint",
    "gather_inputs",
    "iter_batches",
    "iter_logits",
    "predict_scans",
    "read_rows",
    "uncertain",
    "write_table",
]
