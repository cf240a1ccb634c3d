"""The clinical report of a model's predictions: ``metrics.json`` (every figure with its CI and
conventions), PNG figures, and one self-contained ``report.html`` with a TRIPOD+AI / CLAIM
reporting checklist.

:func:`summarize` computes the figures (all statistics from :mod:`medtl.metrics`);
:func:`write_report` writes the files; :func:`summarize_multilabel` and :func:`write_multilabel_report`
do the same per finding for multi-label tasks (``report_layout = "per_label"``); a multi-task model
gets one report per head and :func:`write_head_index` (``per_head``).  No patient identifiers are taken or written.
"""

from medtl.report.info import RunInfo
from medtl.report.multilabel import summarize_multilabel, write_multilabel_report
from medtl.report.multitask import write_head_index
from medtl.report.rocband import roc_band
from medtl.report.summary import summarize
from medtl.report.writer import write_report

__all__ = ["RunInfo", "roc_band", "summarize", "summarize_multilabel", "write_head_index", "write_multilabel_report", "write_report"]
