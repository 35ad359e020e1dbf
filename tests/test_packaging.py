"""Packaging: the version is written once (kwneuro_sk/__init__.py) and the installed metadata
agrees; one style (ruff) across the tree."""

import importlib.metadata
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import kwneuro_sk

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_version_in_one_place():
    text = PYPROJECT.read_text(encoding="utf-8")
    assert re.search(r'^dynamic = \["version"\]', text, re.M)
    assert not re.search(r'^version = "', text, re.M)  # not also written in pyproject
    assert 'version = {attr = "kwneuro_sk.__version__"}' in text
    assert importlib.metadata.version("kwneuro_sk") == kwneuro_sk.__version__


def test_one_style_ruff_lint_and_format_pass():
    """The configured linter and formatter (ruff, pyproject.toml) accept the whole tree."""
    root = PYPROJECT.parent
    ruff = shutil.which("ruff") or pytest.skip("ruff is not installed")
    for args in (["check", "."], ["format", "--check", "."]):
        done = subprocess.run([ruff, *args], cwd=root, capture_output=True, text=True)
        assert done.returncode == 0, f"ruff {' '.join(args)}:\n{done.stdout}{done.stderr}"
