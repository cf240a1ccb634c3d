"""``--batch-size auto``: the batch size with the best throughput, found by timing a few.

A forward pass on zeros of the bundle's input shape is timed at growing batch sizes; growing
stops at the first size that is not at least 10 % faster per scan than the best so far, or that
runs out of GPU memory.  Short runs skip the probe, since it would cost more than it saves.
"""

from __future__ import annotations

import logging
import time

import torch

from medtl.bundle import Predictor

log = logging.getLogger(__name__)

CPU_SIZES = (8, 16, 32)
GPU_SIZES = (16, 32, 64, 128, 256)
_MIN_GAIN = 0.9
_PROBE_SHARE = 8  # probe only when the run is this many times longer than the probe


def _seconds_per_scan(predictor: Predictor, batch: torch.Tensor) -> float:
    start = time.perf_counter()
    predictor.logits(batch)  # returns host memory, so a GPU run has finished here
    return (time.perf_counter() - start) / len(batch)


def auto_batch_size(predictor: Predictor, n_scans: int) -> int:
    """The batch size to predict ``n_scans`` scans with on ``predictor.device``."""
    sizes = GPU_SIZES if predictor.device.type == "cuda" else CPU_SIZES
    if n_scans < _PROBE_SHARE * sum(sizes):
        return max(1, min(sizes[1], n_scans))
    pre = predictor.preprocessing
    shape = (pre["channels"], *pre["image_size"])
    predictor.logits(torch.zeros(sizes[0], *shape))  # first call: allocation and kernel selection
    best, best_time = sizes[0], float("inf")
    for size in sizes:
        try:
            per_scan = _seconds_per_scan(predictor, torch.zeros(size, *shape))
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            break
        log.debug("batch size %d: %.2f ms per scan", size, per_scan * 1000)
        if per_scan > _MIN_GAIN * best_time:
            break
        best, best_time = size, per_scan
    log.info("batch size %d (auto)", best)
    return best
