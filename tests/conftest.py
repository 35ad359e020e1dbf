"""Fixtures shared by the test modules."""

import importlib
import os
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest

# Set to 1 by .ci/run in its peer environment: there a missing peer is a failure, not a skip,
# so that a parity test CI is meant to run cannot silently stop running.
REQUIRE_PEERS = os.environ.get("KWNEURO_SK_REQUIRE_PEERS") == "1"


def _missing_peer(what):
    if REQUIRE_PEERS:
        pytest.fail(f"{what} (KWNEURO_SK_REQUIRE_PEERS=1: peers are required here)")
    pytest.skip(what)


@pytest.fixture(scope="session")
def peer():
    """``peer("neuroHarmonize")`` imports a reference implementation that pins an older stack
    than the suite's (kwneuro, neuroHarmonize): .ci/run installs them in an environment of their
    own and runs the tests marked ``peer_*`` there. Elsewhere a missing peer skips the test."""

    def load(module):
        try:
            return importlib.import_module(module)
        except ImportError as exc:
            _missing_peer(f"peer {module!r} is not importable here: {exc}")

    return load


@pytest.fixture(scope="session")
def rscript_sva():
    """The ``Rscript`` executable, once R's Bioconductor package sva is installed for it (Debian:
    ``apt-get install r-base-core r-bioc-sva``; .ci/run installs them when missing)."""
    rscript = shutil.which("Rscript")
    if rscript is None:
        _missing_peer("Rscript is not on PATH (apt-get install r-base-core r-bioc-sva)")
    # find.package only looks the package up (loading sva takes seconds; the test loads it once)
    check = subprocess.run(
        [rscript, "-e", 'cat(length(find.package("sva", quiet = TRUE)))'],
        capture_output=True,
        text=True,
    )
    if check.stdout.strip() != "1":
        _missing_peer(f"R package sva is not installed: {check.stderr.strip()[-300:]}")
    return rscript


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


@pytest.fixture(scope="session")
def make_runs():
    """``make_runs(seed, n_scans, shape, affine)``: one float32 4D run per entry of ``n_scans``
    (that many volumes), each voxel a random walk around 100 (slow drifts to clean)."""

    def make(seed, n_scans, shape, affine):
        rng = np.random.default_rng(seed)
        runs = []
        for n in n_scans:
            data = rng.normal(size=(*shape, n)).cumsum(axis=3) + 100
            runs.append(nib.Nifti1Image(data.astype(np.float32), affine))
        return runs

    return make


@pytest.fixture(scope="session")
def save_images():
    """``save_images(imgs, folder, suffix=".nii.gz")``: each image written to
    ``folder/sub-<i><suffix>``; returns the paths as str, in order."""

    def save(imgs, folder, suffix=".nii.gz"):
        paths = []
        for i, img in enumerate(imgs):
            paths.append(str(folder / f"sub-{i}{suffix}"))
            img.to_filename(paths[-1])
        return paths

    return save
