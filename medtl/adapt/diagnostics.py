"""Site-shift diagnostics: how far apart the sites are in the model's feature space.

- **Proxy A-distance** (Ben-David et al. 2007): train a linear classifier to tell two sites'
  features apart; with its cross-validated error ``err``, ``PAD = 2 (1 - 2 err)``.  0 means the
  sites are indistinguishable, 2 perfectly separable.  Computed for each pair of sites.
- **2D embedding**: the features projected on their first two principal components, to be
  plotted coloured by site.

Both are computed on the same scans with the pretrained backbone (before) and the trained model
(after), so the report shows whether fine-tuning and adaptation brought the sites together.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import numpy as np
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def proxy_a_distance(features_a: np.ndarray, features_b: np.ndarray, *, folds: int = 5, seed: int = 0) -> float:
    """``2 (1 - 2 err)`` with ``err`` the cross-validated error of a linear site classifier
    (standardised features, L2 logistic regression, balanced classes), clipped at 0."""
    x = np.concatenate([features_a, features_b])
    y = np.r_[np.zeros(len(features_a)), np.ones(len(features_b))]
    folds = min(folds, len(features_a), len(features_b))
    if folds < 2:
        raise ValueError("proxy A-distance needs at least 2 scans per site")
    classifier = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced"))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    accuracy = cross_val_score(classifier, x, y, cv=cv, scoring="balanced_accuracy").mean()
    return float(max(0.0, 2 * (1 - 2 * (1 - accuracy))))


def site_shift(features: np.ndarray, sites: Sequence[str], *, seed: int = 0) -> dict:
    """PAD for each pair of sites with at least 2 scans, and a 2D PCA embedding of ``features``."""
    sites = np.asarray([str(s) for s in sites])
    names = sorted(set(sites))
    pairs = {
        f"{a} vs {b}": proxy_a_distance(features[sites == a], features[sites == b], seed=seed)
        for a, b in combinations(names, 2)
        if min((sites == a).sum(), (sites == b).sum()) >= 2
    }
    embedding = PCA(n_components=2, random_state=seed).fit_transform(features) if len(features) > 2 else np.zeros((len(features), 2))
    return {"proxy_a_distance": pairs, "embedding": embedding.tolist(), "sites": sites.tolist()}
