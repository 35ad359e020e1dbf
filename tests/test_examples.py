"""Run every script of examples/ as a user would, and check the numbers each one prints.

Every ``examples/*.py`` is found with a glob, so a new example is run without editing this
file. Scripts run as ``__main__`` in this process (and one in a fresh interpreter too), with
``KWNEURO_SK_DATA`` pointing to the session's data folder (the demo cohort is generated once,
shared with the CLI demo test), ``KWNEURO_SK_EXAMPLES_OUTPUT`` to a folder of this module, and
``KWNEURO_SK_EXAMPLES_N_SUBJECTS`` to the suite's smaller cohort (the examples' checks hold at
that size too).
Examples listed in ``CHECKS`` also have their key printed numbers and output files checked.
"""

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
EXAMPLES = sorted(path for path in EXAMPLES_DIR.glob("*.py") if not path.name.startswith("_"))

pytest.importorskip("matplotlib")
import matplotlib.pyplot as plt  # noqa: E402

NUMBER = r"([-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?)"


def numbers(pattern, text):
    """The numbers captured by ``pattern`` (with NUMBER groups) in ``text``, as floats."""
    match = re.search(pattern.replace("{n}", NUMBER), text)
    assert match, f"no line matching {pattern!r} in the output:\n{text}"
    return [float(group) for group in match.groups()]


def check_tabular(stdout, output):
    raw, combat, age, chance = numbers(
        r"site accuracy on held-out rows: raw features {n}, after ComBat {n}, "
        r"age alone {n}, chance {n}",
        stdout,
    )
    assert raw > 0.7  # the sites are easy to tell apart before harmonization
    assert combat < raw - 0.2
    assert abs(combat - age) < 0.15  # after: no better than the sites' age difference allows
    assert chance == pytest.approx(1 / 3, abs=0.01)
    (gamma_r,) = numbers(r"gamma_star_ vs simulated site offsets: r = {n}", stdout)
    (delta_r,) = numbers(r"delta_star_ vs simulated relative site variance: r = {n}", stdout)
    assert gamma_r > 0.9 and delta_r > 0.9
    (reloaded,) = numbers(r"reloaded model max \|difference\| on held-out rows: {n}", stdout)
    assert reloaded == 0.0
    for name in ["01_combat_estimates.npz", "01_combat_estimates.png", "01_site_distributions.png"]:
        assert (output / name).stat().st_size > 0


def check_grid_search(stdout, output):
    (n_fits,) = numbers(r"grid search: {n} fits", stdout)
    assert n_fits == 30  # 6 candidates x 5 folds
    (best,) = numbers(r"best: \{.*\} with ROC AUC {n}", stdout)
    assert best > 0.75  # the diagnosis is detectable from regional grey matter
    table = pd.read_csv(output / "02_grid_search.csv")
    assert len(table) == 6
    assert set(table["strategy"]) == {"mean", "median"}
    assert table["ROC AUC (mean)"].max() == pytest.approx(best, abs=1e-3)
    probabilities = numbers(r"P\(patient\) of the first three subjects: \[{n}, {n}, {n}\]", stdout)
    assert all(0 <= p <= 1 for p in probabilities)


def check_leave_one_site_out(stdout, output):
    assert "ValueError: site(s) ['site1'] were not seen in fit" in stdout
    (auc_gain,) = numbers(r"ComBat minus no harmonization, roc_auc: {n}", stdout)
    (accuracy_gain,) = numbers(r"ComBat minus no harmonization, balanced_accuracy: {n}", stdout)
    assert abs(auc_gain) < 0.05  # a site shift barely changes the ranking within a site ...
    assert accuracy_gain > 0.02  # ... but moves subjects across the decision threshold
    assert (output / "03_leave_one_site_out.png").stat().st_size > 0


def check_voxelwise(stdout, output):
    before, after = numbers(
        r"largest \|site deviation - simulated biology\|: before {n}, after {n}", stdout
    )
    assert before > 0.02  # site offsets of a few hundredths of GM probability ...
    assert after < 0.005  # ... removed, the biology (age, sex, diagnosis) kept
    (reloaded,) = numbers(r"loaded vs in-memory estimates max \|difference\|: {n}", stdout)
    assert reloaded == 0.0
    held_before, held_after = numbers(
        r"held-out subjects, mean \|site mean - overall mean\|: before {n}, after {n}", stdout
    )
    assert held_after < held_before
    for name in [
        "04_voxelwise_combat.npz",
        "04_site_means_before_after.png",
        "04_first_held_out_harmonized.nii.gz",
    ]:
        assert (output / name).stat().st_size > 0


def check_connectomes(stdout, output):
    raw, combat, leaky, chance = numbers(
        r"site balanced accuracy: raw {n}, ComBat in the pipeline {n}, ComBat before CV {n}, "
        r"chance {n}",
        stdout,
    )
    assert chance == pytest.approx(0.25, abs=0.01)
    assert raw > 0.6  # sites are easy to tell apart from raw connectomes
    assert combat < raw - 0.3  # ComBat inside the pipeline removes most of it
    assert leaky < chance - 0.1  # fitted on every subject first: below chance, the leak shows
    (auc_raw, _, _) = numbers(
        r"diagnosis ROC AUC, leave-site-out: raw {n}, ComBat in the pipeline {n}, "
        r"ComBat before CV {n}",
        stdout,
    )
    assert auc_raw > 0.55  # the weak diagnosis effect is found at unseen sites
    (best,) = numbers(r"best denoising: \{.*\} with ROC AUC {n}", stdout)
    assert 0.5 < best <= 1
    table = pd.read_csv(output / "05_connectomes_across_sites.csv")
    assert table["connectomes"].tolist() == [
        "raw connectomes",
        "ComBat in the pipeline",
        "ComBat before CV (leaky)",
    ]


CHECKS = {
    "01_tabular_harmonization.py": check_tabular,
    "02_image_pipeline_gridsearch.py": check_grid_search,
    "03_leave_one_site_out.py": check_leave_one_site_out,
    "04_voxelwise_harmonize_volumes.py": check_voxelwise,
    "05_connectomes_across_sites.py": check_connectomes,
}


@pytest.fixture(scope="module")
def shared_folders(tmp_path_factory, demo_data_dir):
    """Data cache (shared by the session) and output folder shared by every example."""
    return demo_data_dir, tmp_path_factory.mktemp("examples") / "output"


def test_examples_are_found():
    assert len(EXAMPLES) >= len(CHECKS)
    assert set(CHECKS) <= {path.name for path in EXAMPLES}


def _example_env(shared_folders, demo_n_subjects):
    data_dir, output = shared_folders
    return {
        "KWNEURO_SK_DATA": str(data_dir),
        "KWNEURO_SK_EXAMPLES_OUTPUT": str(output),
        "MPLBACKEND": "Agg",
        # the image examples on the session's demo cohort instead of their 60 subjects
        "KWNEURO_SK_EXAMPLES_N_SUBJECTS": str(demo_n_subjects),
    }


@pytest.mark.parametrize("script", EXAMPLES, ids=[path.stem for path in EXAMPLES])
def test_example_runs(script, shared_folders, tmp_path, demo_n_subjects, monkeypatch, capsys):
    """Each script run as ``__main__`` in this process: the same code and checks as a
    subprocess without paying Python's start-up and the imports again (2 s per script).
    ``test_an_example_runs_as_a_script`` runs one in a fresh interpreter as well."""
    monkeypatch.chdir(tmp_path)
    for name, value in _example_env(shared_folders, demo_n_subjects).items():
        monkeypatch.setenv(name, value)
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        plt.close("all")
    stdout = capsys.readouterr().out
    assert stdout.strip(), f"{script.name} printed nothing"
    assert list(tmp_path.iterdir()) == [], f"{script.name} wrote into the working directory"
    if script.name in CHECKS:
        CHECKS[script.name](stdout, shared_folders[1])


def test_an_example_runs_as_a_script(shared_folders, tmp_path, demo_n_subjects):
    """``python examples/01_tabular_harmonization.py`` in a fresh interpreter, as a user would."""
    script = EXAMPLES_DIR / "01_tabular_harmonization.py"
    env = {**os.environ, **_example_env(shared_folders, demo_n_subjects)}
    # A timeout only guards against a hang; it is not a speed test.
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, (
        f"{script.name} failed with exit code {result.returncode}\n"
        f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    )
    assert list(tmp_path.iterdir()) == [], f"{script.name} wrote into the working directory"
    CHECKS[script.name](result.stdout, shared_folders[1])
