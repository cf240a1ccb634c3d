"""Batch inference with a bundle over folders of scans or manifests."""

from medtl.infer.batch import PredictSummary, ScanResult, gather_inputs, iter_logits, predict_to_csv

__all__ = ["PredictSummary", "ScanResult", "gather_inputs", "iter_logits", "predict_to_csv"]
