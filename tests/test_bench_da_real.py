"""The pieces of scripts/bench_da_real.py that its table rests on: the simulated second site and
the paired comparison with source-only (no training here)."""

import importlib
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _script():
    sys.path.insert(0, str(ROOT / "scripts"))
    return importlib.import_module("bench_da_real")


def test_reacquire_is_the_documented_change_and_seeded(monkeypatch):
    bench = _script()
    x = np.tile(np.linspace(40, 220, 28), (28, 1)).astype(np.uint8)  # a smooth ramp
    x[10:18, 10:18] = 255  # and a sharp square
    a, b, c = bench.reacquire(x, seed=1), bench.reacquire(x, seed=1), bench.reacquire(x, seed=2)
    assert a.dtype == np.uint8 and a.shape == x.shape
    assert np.array_equal(a, b) and not np.array_equal(a, c)  # each image its own noise seed
    monkeypatch.setattr(bench, "NOISE_SD", 0.0)
    clean = bench.reacquire(x, seed=1).astype(float)
    assert clean.mean() < x.mean() - 30  # gamma 2.5 darkens the mid-tones
    edge = np.abs(np.diff(clean[14])).max()
    assert edge < 0.5 * np.abs(np.diff(x[14].astype(float))).max()  # 4x lower resolution blurs the square's edge
    assert 0.03 < (a.astype(float) - clean).std() / 255 < 0.08  # detector noise near sd 0.06


def test_paired_significance_against_source_only():
    bench = _script()
    rng = np.random.default_rng(0)
    labels = [0] * 150 + [1] * 150
    weak = list(rng.normal(size=300) + 0.3 * np.array(labels))
    strong = list(rng.normal(size=300) + 2.0 * np.array(labels))

    def row(method, scores):
        return {"method": method, "seed": 0, "train_seconds": 60.0,
                "test_shifted": {"auroc": 0.0, "labels": labels, "scores": scores, "ece": 0.1},
                "test_clean": {"auroc": 0.9}}

    assert bench.significant_vs_full(row("adabn", strong), row("full", weak)) == 1
    assert bench.significant_vs_full(row("dann", weak), row("full", strong)) == -1
    assert bench.significant_vs_full(row("tent", weak), row("full", weak)) == 0
    full, adabn = row("full", weak), row("adabn", strong)
    full["test_shifted"]["auroc"], adabn["test_shifted"]["auroc"] = 0.6, 0.9
    table = bench.table([full, adabn])
    assert "| adabn | 0.900 | +0.300 | 1/1 (1 / 0) |" in table
