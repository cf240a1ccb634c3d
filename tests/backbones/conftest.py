"""Shared fixtures: an isolated, offline torch hub cache and medtl weights folder per test."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def offline_caches(tmp_path, monkeypatch):
    """Every test gets its own empty TORCH_HOME and weights folder, and never touches the network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("MEDTL_WEIGHTS_DIR", str(tmp_path / "medtl_weights"))
    monkeypatch.setenv("MEDTL_OFFLINE", "1")
    torch.manual_seed(0)
    return tmp_path
