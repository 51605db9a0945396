"""Test-wide settings."""

import pytest


@pytest.fixture(autouse=True)
def chunk_tiny_feedforwards(monkeypatch):
    """The test models are tiny: without this floor of one row per chunk their feed-forward would
    never run in chunks, and the chunked path would go untested (tests/models/test_model.py checks the
    floor itself)."""
    import routeformer.layers.feedforward as feedforward
    monkeypatch.setattr(feedforward, 'MIN_CHUNK_ROWS', 1)
