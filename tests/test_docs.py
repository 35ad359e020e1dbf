"""The documentation builds with Sphinx, warning-free (-W), and holds its key pages.

Skipped when Sphinx or numpydoc is not installed (``pip install ".[docs]"``).
"""

import html as html_module
import re
from pathlib import Path

import pytest

pytest.importorskip("sphinx")
pytest.importorskip("numpydoc")

from sphinx.cmd.build import build_main  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"
EXAMPLES = DOCS.parent / "examples"


@pytest.fixture(scope="module")
def html(tmp_path_factory):
    out = tmp_path_factory.mktemp("html")
    doctrees = tmp_path_factory.mktemp("doctrees")
    status = build_main(["-W", "-q", "-b", "html", "-d", str(doctrees), str(DOCS), str(out)])
    assert status == 0, "sphinx-build -W failed; run it by hand to see the warnings"
    return out


def _text(path):
    """The page's text: tags removed (highlighted code is split into many spans)."""
    return html_module.unescape(re.sub(r"<[^>]+>", "", path.read_text(encoding="utf-8")))


def test_api_page_documents_the_public_names(html):
    page = (html / "api.html").read_text(encoding="utf-8")
    for name in [
        "kwneuro_sk.CombatHarmonizer",
        "kwneuro_sk.CombatEstimates",
        "kwneuro_sk.LabelsMasker",
        "kwneuro_sk.ConnectomeExtractor",
        "kwneuro_sk.fmriprep_cohort",
        "kwneuro_sk.datasets.make_fmri_cohort",
        "kwneuro_sk.harmonize_volumes",
        "kwneuro_sk.VolumeEstimates.apply_volumes",
        "kwneuro_sk.datasets.make_site_features",
        "kwneuro_sk.plotting.plot_site_predictability",
    ]:
        assert f'id="{name}"' in page, name
    # numpydoc rendered the sections (not left as raw "Parameters\n----------" text)
    text = _text(html / "api.html")
    assert "unseen_batch" in text and "gamma_star_" in text
    assert "----------" not in text


def test_user_guide_pages_exist_and_are_linked(html):
    index = (html / "index.html").read_text(encoding="utf-8")
    for page in [
        "why_harmonize",
        "sites_and_covariates",
        "new_sites",
        "longitudinal",
        "model_selection",
        "image_features",
        "numerics",
        "command_line",
        "large_cohorts",
        "connectomes",
    ]:
        assert (html / "user_guide" / f"{page}.html").is_file(), page
        assert f"user_guide/{page}.html" in index, page
    assert "1e-8 relative" in _text(html / "user_guide" / "numerics.html")  # as tested
    assert "kwneuro-sk apply" in _text(html / "user_guide" / "command_line.html")
    large = _text(html / "user_guide" / "large_cohorts.html")
    assert "parallel_config" in large and "UK Biobank, worked out" in large


def test_examples_page_shows_every_script(html):
    text = _text(html / "examples.html")
    scripts = sorted(EXAMPLES.glob("[0-9]*.py"))
    for script in scripts:
        assert f"examples/{script.name}" in text, script.name
        first_import = next(
            line
            for line in script.read_text().splitlines()
            if line.startswith(("import ", "from "))
        )
        assert first_import.split()[1] in text, script.name


def test_example_script_splitting():
    import sys

    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        from example_scripts import split_script
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    source = (
        '"""Title line.\n\nThe story\n---------\nText with ``code``.\n"""\n\n'
        "import os\nprint(os.sep)\n"
    )
    title, body, code_start = split_script(source)
    assert title == "Title line."
    assert body.splitlines()[0] == ".. rubric:: The story"
    assert "Text with ``code``." in body
    assert source.splitlines()[code_start - 1] == "import os"

    title, body, code_start = split_script('"""\nHeading\n=======\n\nBody.\n"""\nx = 1\n')
    assert (title, body, code_start) == ("Heading", "Body.", 7)
    assert split_script("x = 1\n") == (None, "", 1)
