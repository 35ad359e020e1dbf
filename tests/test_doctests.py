"""Every public name has a runnable Examples section.

The examples themselves run through ``--doctest-modules`` (pyproject's pytest options, with
``kwneuro_sk`` among the test paths); this module checks that none is missing.
"""

import doctest
import importlib

import pytest

PUBLIC = {
    "kwneuro_sk": [
        "CombatHarmonizer",
        "CovBatHarmonizer",
        "CombatEstimates",
        "LabelsMasker",
        "ConnectomeExtractor",
        "fmriprep_cohort",
        "harmonize_volumes",
    ],
    "kwneuro_sk.volumes": ["apply_volumes"],
    "kwneuro_sk.report": ["harmonization_report"],
    "kwneuro_sk.datasets": [
        "make_site_features",
        "make_demo_cohort",
        "make_fmri_cohort",
        "get_data_dir",
        "SimulatedEffects",
    ],
    "kwneuro_sk.plotting": [
        "plot_site_distributions",
        "plot_combat_estimates",
        "plot_site_predictability",
    ],
    "kwneuro_sk.demo": ["run_demo"],
}


@pytest.mark.parametrize("module_name", PUBLIC)
def test_public_names_have_doctests(module_name):
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder()
    for name in PUBLIC[module_name]:
        tests = finder.find(getattr(module, name), name)
        assert any(test.examples for test in tests), f"{module_name}.{name} has no example"


def test_doctests_are_collected_by_the_suite(pytestconfig):
    assert pytestconfig.getoption("doctestmodules"), "run pytest with --doctest-modules"
    assert "kwneuro_sk" in pytestconfig.getini("testpaths")
