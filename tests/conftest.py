"""Fixtures shared by the test modules."""

import numpy as np
import pytest


@pytest.fixture
def numpy_int_alias(monkeypatch):
    """``np.int`` for the duration of one test: neuroCombat 0.2.12's ``ref_batch`` path calls
    the alias NumPy 1.24 removed. Set at import time it would leak into every other test."""
    monkeypatch.setattr(np, "int", int, raising=False)
