"""Sphinx configuration of the kwneuro_sk documentation.

Build (from the repository root)::

    pip install ".[docs]"
    sphinx-build -W -b html docs docs/_build/html

The build needs no network: there are no intersphinx mappings, and the examples are shown
as source (not executed).
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "_ext"))
sys.path.insert(0, os.path.dirname(HERE))  # the package, when it is not installed

import kwneuro_sk  # noqa: E402

project = "kwneuro_sk"
author = "kwneuro_sk developers"
copyright = "kwneuro_sk developers"
version = release = kwneuro_sk.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "example_scripts",  # docs/_ext/example_scripts.py: renders examples/*.py
]

root_doc = "index"
exclude_patterns = ["_build"]
templates_path = []
html_static_path = []
html_theme = "alabaster"
html_theme_options = {
    "description": "ComBat harmonization and region extraction for scikit-learn",
    "fixed_sidebar": True,
}
html_title = f"kwneuro_sk {release}"

# API reference: documented members only, in source order; the API page lists them itself.
autosummary_generate = False
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "undoc-members": False}
autodoc_typehints = "none"  # numpydoc sections already give the types

# numpydoc: no member tables of inherited scikit-learn methods (set_params, ...).
numpydoc_show_class_members = False
numpydoc_show_inherited_class_members = False
numpydoc_class_members_toctree = False
numpydoc_attributes_as_param_list = True
numpydoc_xref_param_type = False
