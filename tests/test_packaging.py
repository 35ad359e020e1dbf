"""The version is written once (kwneuro_sk/__init__.py) and the installed metadata agrees."""

import importlib.metadata
import re
from pathlib import Path

import kwneuro_sk

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_version_in_one_place():
    text = PYPROJECT.read_text(encoding="utf-8")
    assert re.search(r'^dynamic = \["version"\]', text, re.M)
    assert not re.search(r'^version = "', text, re.M)  # not also written in pyproject
    assert 'version = {attr = "kwneuro_sk.__version__"}' in text
    assert importlib.metadata.version("kwneuro_sk") == kwneuro_sk.__version__
