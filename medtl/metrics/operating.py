"""The empirical ROC curve with pROC's thresholds, and operating points chosen on it.

Decision rule everywhere: a case is predicted positive when ``score >= threshold``.

Thresholds follow pROC: between consecutive distinct observed scores ``u_(k-1) < u_k`` the
threshold is their midpoint, so ``score >= threshold`` classifies the data exactly as
``score >= u_k`` while leaving a margin on both sides for new cases.  The two ends of the curve
are stored as finite numbers (JSON has no infinity): "all positive" as the lowest observed score,
"none positive" as the next float above the highest.

Operating points:
- ``youden``: maximises sensitivity + specificity - 1; ties go to the higher sensitivity.
- ``most_probable``: 0.5 on a calibrated probability, i.e. the more probable class (as argmax
  for several classes): the fewest expected errors where the calibration holds, and no search
  over a small sample's ROC curve.
- ``sensitivity`` with ``target``: the reachable threshold with sensitivity >= target and the
  highest specificity; also the specificity at exactly the target sensitivity, interpolated
  linearly between the two neighbouring ROC points as pROC's ``coords(input="sensitivity")``
  does (for an exact match, pROC's choice: the highest specificity with that sensitivity).
- ``specificity`` with ``target``: symmetrically.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from medtl.metrics._checks import binary_outcome, scores_1d

DECISION_RULE = "predicted positive when score >= threshold"
METHODS = ("youden", "most_probable", "sensitivity", "specificity")


@dataclass(frozen=True)
class RocCurve:
    """ROC points ordered by increasing threshold (sensitivity falls from 1 to 0)."""

    thresholds: np.ndarray
    sensitivity: np.ndarray
    specificity: np.ndarray
    n_positive: int
    n_negative: int

    @property
    def fpr(self) -> np.ndarray:
        return 1.0 - self.specificity


def roc_curve(y_true, y_score, *, positive=1) -> RocCurve:
    """All ROC points of the data at pROC's midpoint thresholds (one per distinct score, plus
    "none positive")."""
    scores = scores_1d(y_score)
    is_pos = binary_outcome(y_true, positive, len(scores))
    distinct, group = np.unique(scores, return_inverse=True)
    pos_per = np.bincount(group, weights=is_pos, minlength=len(distinct))
    neg_per = np.bincount(group, weights=~is_pos, minlength=len(distinct))
    m, n = pos_per.sum(), neg_per.sum()
    # at threshold k (k = 0..G-1) the positives are the groups k..G-1; k = G: none positive
    pos_at_or_above = np.r_[np.cumsum(pos_per[::-1])[::-1], 0.0]
    neg_below = np.r_[0.0, np.cumsum(neg_per)]
    midpoints = (distinct[:-1] + distinct[1:]) / 2
    # a midpoint that rounds onto the lower score would misclassify it: fall back to the upper score
    midpoints = np.where(midpoints > distinct[:-1], midpoints, distinct[1:])
    thresholds = np.r_[distinct[0], midpoints, np.nextafter(distinct[-1], np.inf)]
    return RocCurve(thresholds, pos_at_or_above / m, neg_below / n, int(m), int(n))


@dataclass(frozen=True)
class OperatingPoint:
    """A decision threshold on the positive-class score, and how it was chosen.

    ``sensitivity`` / ``specificity`` are the empirical values at ``threshold`` on the data it
    was chosen on; ``interpolated_*`` is pROC's interpolated value at exactly ``target``.
    ``scores_around`` are the observed scores just below and at/above the threshold.
    """

    method: str
    threshold: float
    sensitivity: float
    specificity: float
    target: float | None = None
    interpolated_sensitivity: float | None = None
    interpolated_specificity: float | None = None
    youden_index: float | None = None
    scores_around: tuple[float | None, float | None] | None = None
    n_positive: int | None = None
    n_negative: int | None = None
    rule: str = DECISION_RULE
    description: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scores_around"] = list(self.scores_around) if self.scores_around is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> OperatingPoint:
        """Rebuild from :meth:`to_dict` output (e.g. a bundle's ``bundle.json``)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown operating point fields {unknown}")
        for key in ("method", "threshold", "sensitivity", "specificity"):
            if key not in d:
                raise ValueError(f"operating point is missing '{key}'")
        if d.get("rule", DECISION_RULE) != DECISION_RULE:
            raise ValueError(f"unsupported decision rule {d['rule']!r}; medtl uses '{DECISION_RULE}'")
        values = dict(d)
        if values.get("scores_around") is not None:
            values["scores_around"] = tuple(values["scores_around"])
        values["threshold"] = float(values["threshold"])
        return cls(**values)


def _interpolate(along: np.ndarray, other: np.ndarray, target: float, *, increasing: bool) -> float:
    """pROC's coords interpolation: value of ``other`` where ``along`` equals ``target``.

    ``along`` is monotone over the curve (increasing for specificity, decreasing for
    sensitivity); an exact match takes, like pROC, the point with the best ``other``.
    """
    exact = np.flatnonzero(along == target)
    if exact.size:
        return float(other[exact[0] if increasing else exact[-1]])
    nxt = int(np.argmax(along > target)) if increasing else int(np.argmax(along < target))
    prev = nxt - 1
    share = (target - along[prev]) / (along[nxt] - along[prev])
    return float(other[prev] + share * (other[nxt] - other[prev]))


def choose_operating_point(
    y_true,
    y_score,
    method: str = "youden",
    target: float | None = None,
    *,
    positive=1,
) -> OperatingPoint:
    """Choose a threshold on ``y_score`` for ``y_true == positive`` (see the module docstring)."""
    if method not in METHODS:
        raise ValueError(f"unknown operating point method {method!r}; choose one of {METHODS}")
    if method in ("sensitivity", "specificity") and (target is None or not 0 < target <= 1):
        raise ValueError(f"method '{method}' needs a target in (0, 1], got {target}")
    if method in ("youden", "most_probable") and target is not None:
        raise ValueError(f"method '{method}' takes no target")
    scores = scores_1d(y_score)
    curve = roc_curve(y_true, scores, positive=positive)
    se, sp = curve.sensitivity, curve.specificity
    interp_se = interp_sp = None
    if method == "most_probable":  # a fixed threshold: its own ROC point
        is_pos = binary_outcome(y_true, positive, len(scores))
        k, se, sp = 0, np.array([np.mean(scores[is_pos] >= 0.5)]), np.array([np.mean(scores[~is_pos] < 0.5)])
        how = ("the more probable class: threshold 0.5 on the calibrated probability (the fewest expected errors "
               "while the probabilities hold)")
    elif method == "youden":
        k = int(np.argmax(se + sp))  # first maximum: lowest threshold, highest sensitivity
        how = "maximises Youden's J = sensitivity + specificity - 1"
    elif method == "sensitivity":
        k = int(np.flatnonzero(se >= target)[-1])  # highest threshold still reaching the target
        interp_sp = _interpolate(se, sp, target, increasing=False)
        how = f"highest specificity with sensitivity >= {target:g}"
    else:
        k = int(np.flatnonzero(sp >= target)[0])  # lowest threshold still reaching the target
        interp_se = _interpolate(sp, se, target, increasing=True)
        how = f"highest sensitivity with specificity >= {target:g}"
    threshold = 0.5 if method == "most_probable" else float(curve.thresholds[k])
    below = scores[scores < threshold]
    above = scores[scores >= threshold]
    around = (float(below.max()) if below.size else None, float(above.min()) if above.size else None)
    return OperatingPoint(
        method=method,
        threshold=threshold,
        sensitivity=float(se[k]),
        specificity=float(sp[k]),
        target=target,
        interpolated_sensitivity=interp_se,
        interpolated_specificity=interp_sp,
        youden_index=float(se[k] + sp[k] - 1),
        scores_around=around,
        n_positive=curve.n_positive,
        n_negative=curve.n_negative,
        description=(
            f"{how} on {curve.n_positive + curve.n_negative} cases ({curve.n_positive} positive); "
            f"threshold midway between consecutive observed scores; {DECISION_RULE}"
        ),
    )
