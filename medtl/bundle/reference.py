"""A compact reference of a model's training features, so that inference can tell when new scans
look unlike the data the model was trained and calibrated on.

Stored beside the weights as ``reference.safetensors``:

- ``means`` ``(C, D)``: the per-class mean features of the training scans, and ``precision``
  ``(D, D)``: the inverse of their shared (class-centred) covariance, Ledoit-Wolf shrunk so that
  it is well conditioned with fewer scans than feature dimensions.  A scan's out-of-distribution
  score is its Mahalanobis distance to the nearest class mean (Lee et al. 2018).
- ``val_distances``: the same score of the validation scans (unseen by the weights), sorted; a new
  scan's p-value is the share of validation scans at least as far out (conformal, exact under
  exchangeability).
- ``sample`` ``(<= 500, D)``: validation features, the reference sample of the folder-level
  two-sample test: MMD with a Gaussian kernel (bandwidth by the median heuristic) and a
  permutation p-value (Gretton et al. 2012).

Validation rather than training scans are the reference of both tests because the weights were
fitted to the training scans, whose features are tighter than those of any new scan, in-site or not.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from scipy.spatial.distance import cdist
from sklearn.covariance import LedoitWolf

from medtl.backbones import extract_features
from medtl.bundle_format import REFERENCE_FILE

log = logging.getLogger(__name__)

SAMPLE_SIZE = 500  # reference scans kept for the two-sample test (and scans drawn from a folder)
LEVEL = 0.01  # default level of the folder-level verdict: 1.5-2 % false alarms on in-distribution folders (docs/benchmarks.md)


@dataclass(frozen=True)
class FeatureReference:
    """Training-feature statistics of a bundle (see the module docstring)."""

    means: np.ndarray
    precision: np.ndarray
    val_distances: np.ndarray
    sample: np.ndarray

    @classmethod
    def fit(cls, train: np.ndarray, train_labels: Sequence[int], val: np.ndarray, *, seed: int = 0) -> FeatureReference:
        """Class means and shrunk shared covariance from ``train`` features; validation
        distances and the two-sample reference (at most :data:`SAMPLE_SIZE`) from ``val``.
        Multi-label targets ``(N, L)``: each combination of findings (unknown as its own value) is a class."""
        train, val = np.asarray(train, dtype=np.float64), np.asarray(val, dtype=np.float64)
        labels = np.asarray(train_labels)
        if labels.ndim == 2:
            labels = np.unique(np.nan_to_num(labels, nan=-1.0), axis=0, return_inverse=True)[1].reshape(-1)
        if len(val) < 2 or len(train) < 2:
            raise ValueError("a feature reference needs at least 2 training and 2 validation scans")
        classes = np.unique(labels)
        means = np.stack([train[labels == c].mean(axis=0) for c in classes])
        centred = train - means[np.searchsorted(classes, labels)]
        precision = LedoitWolf(assume_centered=True).fit(centred).precision_
        keep = np.random.default_rng(seed).permutation(len(val))[:SAMPLE_SIZE]
        reference = cls(means, precision, np.zeros(0), val[np.sort(keep)])
        return cls(means, precision, np.sort(reference.distances(val)), reference.sample)

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each feature row to its nearest class mean."""
        features = np.asarray(features, dtype=np.float64)
        return cdist(features, self.means, metric="mahalanobis", VI=self.precision).min(axis=1)

    def pvalues(self, distances: np.ndarray) -> np.ndarray:
        """Share of validation scans at least as far out as each distance, ``(k + 1) / (n + 1)``."""
        beyond = len(self.val_distances) - np.searchsorted(self.val_distances, distances, side="left")
        return (beyond + 1) / (len(self.val_distances) + 1)

    def shift_test(self, features: np.ndarray, *, level: float = LEVEL, permutations: int = 1000, seed: int = 0) -> dict:
        """Folder-level verdict: do ``features`` (at most :data:`SAMPLE_SIZE` drawn) come from the
        reference distribution?  MMD² (biased V-statistic, Gaussian kernel, median-heuristic
        bandwidth on the pooled sample) with a permutation p-value ``(1 + #{perm >= obs}) / (1 + P)``."""
        rng = np.random.default_rng(seed)
        features = np.asarray(features, dtype=np.float64)
        if len(features) < 2:
            return {"test": "mmd", "pvalue": None, "shifted": None, "n_scans": len(features),
                    "message": "too few scans for a folder-level shift test (need 2)"}
        if len(features) > SAMPLE_SIZE:
            features = features[np.sort(rng.permutation(len(features))[:SAMPLE_SIZE])]
        pooled = np.concatenate([self.sample, features])
        sq = cdist(pooled, pooled, "sqeuclidean")
        bandwidth = float(np.median(sq[np.triu_indices(len(pooled), 1)]))
        kernel = np.exp(-sq / max(bandwidth, 1e-12))
        m, n = len(self.sample), len(features)
        weights = np.r_[np.full(m, 1 / m), np.full(n, -1 / n)]
        shuffled = np.stack([weights[rng.permutation(m + n)] for _ in range(permutations)])
        observed = float(weights @ kernel @ weights)
        null = np.sum((shuffled @ kernel) * shuffled, axis=1)
        pvalue = float((1 + np.sum(null >= observed)) / (1 + permutations))
        shifted = pvalue < level
        verdict = "these scans look unlike the training data" if shifted else "no shift detected against the training data"
        return {"test": "mmd", "mmd2": observed, "pvalue": pvalue, "level": level, "shifted": bool(shifted),
                "n_scans": n, "n_reference": m, "permutations": permutations,
                "message": f"{verdict} (MMD permutation test on {n} scans vs {m} reference scans, p = {pvalue:.3g})"}

    def save(self, path: str | Path) -> Path:
        """Write ``reference.safetensors`` into the bundle folder ``path``."""
        path = Path(path) / REFERENCE_FILE
        save_file({k: np.ascontiguousarray(getattr(self, k), dtype=np.float32)
                   for k in ("means", "precision", "val_distances", "sample")}, str(path))
        return path


@torch.inference_mode()
def reference_of(model: torch.nn.Module, train: Iterable, val: Iterable, *, device: torch.device | str = "cpu",
                 seed: int = 0) -> FeatureReference | None:
    """The :class:`FeatureReference` of ``model`` from its training and validation batches
    (dicts with ``image`` and ``label``, un-augmented), features by ``model.forward_features``;
    None (with a warning: the bundle then has no shift alarm) with fewer than 2 scans in either."""

    (train_x, train_y), (val_x, _) = extract_features(model, train, device), extract_features(model, val, device)
    if min(len(train_x), len(val_x)) < 2:
        log.warning("no feature reference (and no shift alarm at prediction time): fewer than 2 training or validation scans")
        return None
    return FeatureReference.fit(train_x, train_y, val_x, seed=seed)


class Reservoir:
    """A uniform random sample of at most ``size`` rows of a stream of feature batches
    (reservoir sampling, Algorithm R), so a folder-level test needs bounded memory."""

    def __init__(self, size: int = SAMPLE_SIZE, seed: int = 0) -> None:
        self.size, self.seen, self.rows = size, 0, []
        self.rng = np.random.default_rng(seed)

    def add(self, features: np.ndarray) -> None:
        for row in features:
            if len(self.rows) < self.size:
                self.rows.append(row)
            else:
                slot = self.rng.integers(0, self.seen + 1)
                if slot < self.size:
                    self.rows[slot] = row
            self.seen += 1

    def array(self) -> np.ndarray:
        return np.stack(self.rows) if self.rows else np.empty((0, 0))


def read_reference(bundle: str | Path) -> FeatureReference | None:
    """The bundle's feature reference, or None when it has none (bundles made before it existed)."""
    path = Path(bundle) / REFERENCE_FILE
    if not path.is_file():
        return None
    tensors = load_file(str(path))
    return FeatureReference(**{k: tensors[k].astype(np.float64) for k in ("means", "precision", "val_distances", "sample")})


@torch.inference_mode()
def scan_features(predictor, images: torch.Tensor) -> np.ndarray:
    """Pooled features ``(B, D)`` of a preprocessed batch through the predictor's
    ``model.forward_features`` (the features the reference was made of)."""
    return predictor.model.forward_features(images.to(predictor.device)).float().cpu().numpy()
