"""Shared fixtures: a tiny classifier with the ``.backbone`` / ``.head`` layout medtl trains, and
a loader of a small synthetic two-class problem (both defined in ``helpers.py``)."""

import pytest

from helpers import TinyClassifier, tiny_loader


@pytest.fixture
def tiny_model() -> type[TinyClassifier]:
    """The class: ``tiny_model(dims=2, num_classes=2, norm=True)`` builds one."""
    return TinyClassifier


@pytest.fixture
def tiny_data():
    """``tiny_data(n, seed, dims=, size=, shift=, batch_size=, shuffle=)``: a loader (see ``helpers.tiny_loader``)."""
    return tiny_loader
