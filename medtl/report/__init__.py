"""The clinical report of a model's predictions: ``metrics.json`` (every figure with its CI and
conventions), PNG figures, and one self-contained ``report.html`` with a TRIPOD+AI / CLAIM
reporting checklist.

:func:`summarize` computes the figures (all statistics from :mod:`medtl.metrics`);
:func:`write_report` writes the files.  No patient identifiers are taken or written.
"""

from medtl.report.info import run_info
from medtl.report.rocband import roc_band
from medtl.report.summary import summarize
from medtl.report.writer import write_report

__all__ = ["roc_band", "run_info", "summarize", "write_report"]
