"""pytest configuration for the doctests of the package (``--doctest-modules`` in pyproject).

The Examples sections of every module under ``kwneuro_sk/`` run as part of the suite. A module
whose examples need an optional dependency is not collected when that dependency is missing.
"""

import importlib.util

collect_ignore = []
if importlib.util.find_spec("matplotlib") is None:  # pip install "kwneuro_sk[plotting]"
    collect_ignore.append("kwneuro_sk/plotting.py")
# Scripts that regenerate stored references (tests/data/README.md) run in a peer's own
# environment; they are not test modules and have no doctests.
collect_ignore_glob = ["tests/data/*.py"]
