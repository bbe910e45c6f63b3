"""Fixtures for the training unit tests."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every training test runs on one torch thread (``one_thread`` in tests/conftest.py)."""
