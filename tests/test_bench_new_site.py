"""The new-site benchmark's second simulated site (no training here)."""

import importlib
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_collimation_blacks_out_the_border_and_keeps_the_anatomy():
    sys.path.insert(0, str(ROOT / "scripts"))
    bench = importlib.import_module("bench_new_site")
    x = np.random.default_rng(0).integers(1, 256, size=(28, 28)).astype(np.uint8)
    y = bench.collimate(x)
    c = bench.COLLIMATE
    assert y.dtype == np.uint8 and y.shape == x.shape
    inner = np.zeros_like(x, dtype=bool)
    inner[c:-c, c:-c] = True
    assert np.all(y[~inner] == 0) and np.array_equal(y[inner], x[inner])
    assert bench.SHIFTS["clean"](x, 1) is x
