"""One input layer for every route into ComBat.

Every option (covariates, smooth terms, ref_batch, eb/parametric/mean_only, the unseen-site
policy, CovBat) on every route (arrays and DataFrames in memory, dask arrays and DataFrames,
volumes in memory and streamed, the command line, model files) gives the numbers of the
in-memory path, or a clear error naming the option and the route. Plus the input checks the
routes share (site labels, covariates, row order) and all-or-nothing writes.
"""

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from kwneuro_sk import CombatHarmonizer, CovBatHarmonizer
from kwneuro_sk.combat._inputs import ColumnRoles, read_metadata

da = pytest.importorskip("dask.array")
dd = pytest.importorskip("dask.dataframe")

N, N_FEATURES = 30, 6
FEATURES = [f"f{i}" for i in range(N_FEATURES)]


def _cohort(seed=0):
    rng = np.random.default_rng(seed)
    site = np.repeat(["a", "b", "c"], N // 3)
    age = rng.uniform(20, 80, N).round()
    sex = np.tile(["F", "M"], N // 2)
    X = (
        rng.normal(size=(N, N_FEATURES))
        + 0.02 * age[:, None]
        + pd.Series(site).map({"a": 0.0, "b": 1.5, "c": -1.0}).to_numpy()[:, None]
    )
    frame = pd.DataFrame(X, columns=FEATURES)
    frame["site"], frame["age"], frame["sex"] = site, age, sex
    return frame


COHORT = _cohort()
X = COHORT[FEATURES].to_numpy()
SITE = COHORT["site"].to_numpy()
COVARS = COHORT[["site", "age", "sex"]]


# --------------------------------------------------------------------------------------------
# the shared input layer
# --------------------------------------------------------------------------------------------


def test_column_roles_checks_the_option_set_once():
    roles = ColumnRoles.from_params("site", "sex", ["age"], "tiv")
    assert roles.covariates == ["sex", "age", "tiv"]
    assert roles.numeric == ["age", "tiv"]
    assert roles.metadata == ["site", "sex", "age", "tiv"]
    assert roles.features(["f0", "site", "age", "f1", "sex", "tiv"]) == ["f0", "f1"]
    assert ColumnRoles.from_params(None).features(["a", "b"]) == ["a", "b"]
    with pytest.raises(ValueError, match=r"\['age'\] are in both continuous_cols and smooth"):
        ColumnRoles.from_params("site", None, "age", "age")


def test_read_metadata_names_batch_rows_and_columns():
    roles = ColumnRoles.from_params(None, "sex", "age")
    sites, frame = read_metadata(SITE, COVARS, N, roles)
    assert list(frame.columns) == ["sex", "age"] and len(sites) == N
    with pytest.raises(ValueError, match=r"batch has 31 site labels for 30 rows of X \(dask"):
        read_metadata(np.r_[SITE, ["a"]], COVARS, N, roles, route="dask")
    bad = COVARS.assign(age=COVARS["age"].where(COVARS.index != 4))
    with pytest.raises(ValueError, match=r"covariate 'age' has missing values \(NaN\) in row"):
        read_metadata(SITE, bad, N, roles)
    with pytest.raises(ValueError, match=r"\['sex'\] not found in covariates="):
        read_metadata(SITE, COVARS[["age"]], N, roles)


# --------------------------------------------------------------------------------------------
# dask: checks equal to the in-memory ones (no silent wrong numbers)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_labels", [N + 1, N - 1])
def test_dask_array_batch_of_wrong_length_is_refused_naming_batch(n_labels):
    batch = np.resize(SITE, n_labels)
    with pytest.raises(ValueError, match=rf"batch has {n_labels} site labels for {N} rows"):
        CombatHarmonizer().fit(da.from_array(X, chunks=(10, 3)), batch=batch)


def test_dask_dataframe_nan_is_reported_by_column_name():
    frame = COHORT.copy()
    frame.loc[7, "f3"] = np.nan
    with pytest.raises(ValueError, match=r"NaN or infinite values in feature column\(s\) \['f3'\]"):
        CombatHarmonizer(batch_col="site", categorical_cols="sex", continuous_cols="age").fit(
            dd.from_pandas(frame, npartitions=3)
        )


def test_dask_boolean_features_are_refused_as_in_memory():
    with pytest.raises(ValueError, match="boolean dtype"):
        CombatHarmonizer().fit(da.from_array(X > 0, chunks=(10, 6)), batch=SITE)
    frame = COHORT.assign(f1=COHORT["f1"] > 0)
    with pytest.raises(ValueError, match=r"feature column\(s\) \['f1'\] are not numeric"):
        CombatHarmonizer(batch_col="site", continuous_cols="age", categorical_cols="sex").fit(
            dd.from_pandas(frame, npartitions=3)
        )


def test_covbat_refuses_dask_fit_clearly():
    for call in ("fit", "fit_transform"):
        with pytest.raises(TypeError, match="CovBatHarmonizer cannot be fitted on a dask input"):
            getattr(CovBatHarmonizer(), call)(da.from_array(X, chunks=(10, 6)), batch=SITE)


def test_fitting_a_dask_array_does_not_import_dask_dataframe():
    code = (
        "import sys, numpy as np, dask.array as da\n"
        "from kwneuro_sk import CombatHarmonizer\n"
        "X = da.from_array(np.random.default_rng(0).normal(size=(20, 4)), chunks=(5, 4))\n"
        "c = CombatHarmonizer().fit(X, batch=np.repeat(['a', 'b'], 10))\n"
        "c.transform(X, batch=np.repeat(['a', 'b'], 10)).compute()\n"
        "print('dask.dataframe' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"]  # pandas itself may import pyarrow


# --------------------------------------------------------------------------------------------
# index alignment
# --------------------------------------------------------------------------------------------


def test_same_labels_in_another_order_are_refused_not_paired_by_position():
    perm = np.random.default_rng(1).permutation(N)
    shuffled = pd.DataFrame(X, columns=FEATURES).iloc[perm]  # labelled index 0..N-1, shuffled
    batch = pd.Series(SITE[perm])  # right order, default index
    with pytest.raises(ValueError, match="X and batch= have the same row labels in another"):
        CombatHarmonizer().fit(shuffled, batch=batch)
    covariates = COVARS.iloc[perm].reset_index(drop=True)
    with pytest.raises(ValueError, match="X and covariates= have the same row labels"):
        CombatHarmonizer(continuous_cols="age").fit(
            shuffled, batch=SITE[perm], covariates=covariates
        )
    # other labels (a selection of rows, e.g. a test fold) keep the positional rule
    relabelled = shuffled.set_axis(np.arange(100, 100 + N))
    expected = CombatHarmonizer().fit_transform(X[perm], batch=SITE[perm])
    got = CombatHarmonizer().fit_transform(relabelled, batch=batch)
    np.testing.assert_array_equal(got, expected)


# --------------------------------------------------------------------------------------------
# smaller items of the shared option set
# --------------------------------------------------------------------------------------------


def test_continuous_and_smooth_same_column_says_what_to_do():
    with pytest.raises(ValueError, match="remove them from continuous_cols"):
        CombatHarmonizer(continuous_cols="age", smooth_cols="age").fit(
            X, batch=SITE, covariates=COVARS
        )


def test_spline_with_too_few_distinct_values_is_reported_as_such():
    covariates = pd.DataFrame({"age": np.tile([20.0, 30, 40, 50, 60, 70], N // 6)})
    with pytest.raises(ValueError, match=r"'age' has 6 distinct values, too few for its B-spline"):
        CombatHarmonizer(smooth_cols="age").fit(X, batch=SITE, covariates=covariates)
    # enough values for a smaller basis: fitted
    CombatHarmonizer(smooth_cols="age", smooth_knots=4).fit(X, batch=SITE, covariates=covariates)


def test_no_residual_degrees_of_freedom_is_refused():
    with pytest.raises(ValueError, match="leave no residual degrees of freedom"):
        CombatHarmonizer(mean_only=True, eb=False).fit(X[:3], batch=["a", "b", "c"])
    covariates = pd.DataFrame({"age": [20.0, 30, 40, 50]})
    with pytest.raises(ValueError, match=r"4 rows for 4 design columns \(3 sites \+ 1"):
        CombatHarmonizer(mean_only=True, continuous_cols="age").fit(
            X[:4], batch=["a", "b", "c", "c"], covariates=covariates
        )


# --------------------------------------------------------------------------------------------
# all-or-nothing writes
# --------------------------------------------------------------------------------------------

nib = pytest.importorskip("nibabel")
AFFINE = np.eye(4)


@pytest.fixture(scope="module")
def volume_model(tmp_path_factory):
    """Eight tiny volumes on disk, their covariates, a mask file and a fitted voxel model."""
    from kwneuro_sk import harmonize_volumes

    folder = tmp_path_factory.mktemp("volumes")
    rng = np.random.default_rng(3)
    covars = pd.DataFrame({"site": np.repeat(["a", "b"], 4), "age": np.arange(8) * 5.0 + 20})
    paths = []
    for i, offset in enumerate(np.repeat([0.0, 2.0], 4)):
        paths.append(str(folder / f"s{i}.nii.gz"))
        nib.save(nib.Nifti1Image(rng.normal(size=(3, 3, 2)) + offset, AFFINE), paths[-1])
    mask = nib.Nifti1Image(np.ones((3, 3, 2), dtype=np.uint8), AFFINE)
    _, estimates = harmonize_volumes(paths, covars, "site", mask)
    return paths, covars, mask, estimates


def _broken(path, how, tmp_path):
    img = nib.load(path)
    out = str(tmp_path / "broken.nii.gz")
    if how == "nan voxel":
        data = img.get_fdata()
        data[1, 1, 1] = np.nan
        nib.save(nib.Nifti1Image(data, AFFINE), out)
    elif how == "moved affine":
        moved = AFFINE.copy()
        moved[0, 3] = 5.0
        nib.save(nib.Nifti1Image(img.get_fdata(), moved), out)
    else:  # truncated file
        raw = open(path, "rb").read()
        open(out, "wb").write(raw[: len(raw) // 2])
    return out


@pytest.mark.parametrize(
    "how, message",
    [
        ("nan voxel", "NaN or infinite voxel"),
        ("moved affine", "affine"),
        ("truncated file", "broken.nii.gz"),
    ],
)
def test_streamed_apply_failing_midway_leaves_nothing(volume_model, tmp_path, how, message):
    paths, covars, _, estimates = volume_model
    volumes = list(paths)
    volumes[5] = _broken(paths[5], how, tmp_path)
    output_dir = tmp_path / "new" / "out"
    with pytest.raises((ValueError, OSError), match=message) as info:
        estimates.apply_volumes(volumes, covars, output_dir=output_dir, chunk_size=2)
    assert not (tmp_path / "new").exists()  # the folders this call created are gone too
    assert "nothing was written" in " ".join(getattr(info.value, "__notes__", []))
    # earlier outputs in an existing folder are left as they were
    existing = tmp_path / "existing"
    written = estimates.apply_volumes(paths, covars, output_dir=existing)
    before = {p: open(p, "rb").read() for p in written}
    with pytest.raises((ValueError, OSError), match=message):
        estimates.apply_volumes(volumes, covars, output_dir=existing, chunk_size=2)
    assert sorted(os.listdir(existing)) == sorted(os.path.basename(p) for p in written)
    assert all(open(p, "rb").read() == content for p, content in before.items())


def test_streamed_outputs_are_checked_before_the_first_write(volume_model, tmp_path):
    from kwneuro_sk import harmonize_volumes

    paths, covars, mask, estimates = volume_model
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match=r"cannot create output_dir .*afile' is a file"):
        harmonize_volumes(paths, covars, "site", mask, output_dir=tmp_path / "afile" / "out")
    with pytest.raises(ValueError, match="cannot write in output_dir"):
        estimates.apply_volumes(paths, covars, output_dir="/proc")  # read-only, even for root
    taken = tmp_path / "taken"
    (taken / "s3_harmonized.nii.gz").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"output of volume 3 .*s3_harmonized.nii.gz' is a folder"):
        harmonize_volumes(paths, covars, "site", mask, output_dir=taken)
    assert os.listdir(taken) == ["s3_harmonized.nii.gz"]
    mask_path = tmp_path / "m" / "s0_harmonized.nii.gz"
    mask_path.parent.mkdir()
    nib.save(mask, mask_path)
    before = open(mask_path, "rb").read()
    with pytest.raises(ValueError, match="output of volume 0 .* is the mask"):
        harmonize_volumes(paths, covars, "site", str(mask_path), output_dir=mask_path.parent)
    assert open(mask_path, "rb").read() == before


def test_apply_volumes_refuses_an_unknown_unseen_batch_policy(volume_model):
    paths, covars, _, estimates = volume_model
    with pytest.raises(ValueError, match="'unseen_batch' parameter of apply_volumes"):
        estimates.apply_volumes(paths, covars, unseen_batch="adpat")
