"""Fixtures shared by the test modules."""

import numpy as np
import pytest


@pytest.fixture
def numpy_int_alias(monkeypatch):
    """``np.int`` for the duration of one test: neuroCombat 0.2.12's ``ref_batch`` path calls
    the alias NumPy 1.24 removed. Set at import time it would leak into every other test."""
    monkeypatch.setattr(np, "int", int, raising=False)


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory):
    """Data folder shared by the whole session: the demo cohort is generated once."""
    return tmp_path_factory.mktemp("kwneuro_sk_data")


@pytest.fixture(scope="session")
def demo_n_subjects():
    """Cohort size of the demo and of the image examples in the suite (their default is
    larger). Every test that makes the seed-0 demo cohort uses it, so it is written once."""
    return 30
