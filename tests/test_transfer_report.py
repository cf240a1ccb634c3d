"""The transfer study's LogME table: does LogME's first candidate win after fine-tuning?"""

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _report():
    sys.path.insert(0, str(ROOT / "scripts"))
    return importlib.import_module("transfer_report")


def _rank(seed: int, backbone: str, rank: int, score: float) -> dict:
    return {"task": "t", "fraction": 0.1, "seed": seed, "backbone": backbone, "weights": "none", "rank": rank, "logme": score}


def _run(seed: int, backbone: str, auroc: float) -> dict:
    return {"task": "t", "fraction": 0.1, "seed": seed, "backbone": backbone, "weights": "none", "auroc": auroc}


def test_logme_table_counts_the_cells_its_first_candidate_won():
    ranks = [_rank(seed, "a", 1, -0.1) for seed in range(3)] + [_rank(seed, "b", 2, -0.3) for seed in range(3)]
    ranks += [_rank(3, "a", 1, -0.1)]  # a cell with one candidate: nothing to choose between
    rows = [_run(0, "a", 0.9), _run(0, "b", 0.8), _run(1, "a", 0.7), _run(1, "b", 0.95), _run(2, "b", 0.9), _run(3, "a", 0.9)]
    table = _report().logme_markdown(ranks, rows)
    assert "| t | 10% | 0 | a@none (-0.100), b@none (-0.300) | 0.900, 0.800 | yes |" in table
    assert "| t | 10% | 1 | a@none (-0.100), b@none (-0.300) | 0.700, 0.950 | no |" in table
    assert "| t | 10% | 2 | a@none (-0.100), b@none (-0.300) | –, 0.900 | – |" in table
    assert "| t | 10% | 3 | a@none (-0.100) | 0.900 | – |" in table
    assert "LogME's first candidate won 1 of the 2 cells where it and another candidate were fine-tuned." in table
