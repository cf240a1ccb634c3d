"""Clinical statistics: discrimination with DeLong CIs, threshold metrics with exact intervals,
operating points, calibration, decision curves and bootstrap CIs for any metric.

Conventions (positive class, decision rule, bin edges) are stated in each module's docstring and
travel with every result's ``to_dict()``.
"""

from medtl.metrics.bootstrap import BootstrapResult, bootstrap_ci, bootstrap_weighted
from medtl.metrics.calibration import (
    CalibrationMetrics,
    CalibrationSlope,
    ReliabilityCurve,
    adaptive_calibration_error,
    brier_score,
    calibration_metrics,
    calibration_slope_intercept,
    expected_calibration_error,
    maximum_calibration_error,
    reliability_curve,
)
from medtl.metrics.decision import DecisionCurve, decision_curve
from medtl.metrics.discrimination import (
    AucResult,
    DelongTestResult,
    MultiAucResult,
    auroc_point,
    delong_test,
    delong_test_unpaired,
    roc_auc,
    roc_auc_multilabel,
    roc_auc_ovr,
)
from medtl.metrics.operating import DECISION_RULE, OperatingPoint, RocCurve, choose_operating_point, roc_curve
from medtl.metrics.threshold import Estimate, ThresholdMetrics, decision_metrics, proportion_ci, threshold_metrics

__all__ = [
    "DECISION_RULE",
    "AucResult",
    "BootstrapResult",
    "CalibrationMetrics",
    "CalibrationSlope",
    "DecisionCurve",
    "DelongTestResult",
    "Estimate",
    "MultiAucResult",
    "OperatingPoint",
    "ReliabilityCurve",
    "RocCurve",
    "ThresholdMetrics",
    "adaptive_calibration_error",
    "auroc_point",
    "bootstrap_ci",
    "bootstrap_weighted",
    "brier_score",
    "calibration_metrics",
    "calibration_slope_intercept",
    "choose_operating_point",
    "decision_curve",
    "decision_metrics",
    "delong_test",
    "delong_test_unpaired",
    "expected_calibration_error",
    "maximum_calibration_error",
    "proportion_ci",
    "reliability_curve",
    "roc_auc",
    "roc_auc_multilabel",
    "roc_auc_ovr",
    "roc_curve",
    "threshold_metrics",
]
