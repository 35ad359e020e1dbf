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
    from kwneuro_sk.combat._inputs import ColumnRoles

    roles = ColumnRoles.from_params("site", "sex", ["age"], "tiv")
    assert roles.covariates == ["sex", "age", "tiv"]
    assert roles.numeric == ["age", "tiv"]
    assert roles.metadata == ["site", "sex", "age", "tiv"]
    assert roles.features(["f0", "site", "age", "f1", "sex", "tiv"]) == ["f0", "f1"]
    assert ColumnRoles.from_params(None).features(["a", "b"]) == ["a", "b"]
    with pytest.raises(ValueError, match=r"\['age'\] are in both continuous_cols and smooth"):
        ColumnRoles.from_params("site", None, "age", "age")


def test_read_metadata_names_batch_rows_and_columns():
    from kwneuro_sk.combat._inputs import ColumnRoles, read_metadata

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


def test_dask_dataframe_keyword_batch_of_wrong_length_is_refused_naming_batch():
    frame = dd.from_pandas(COHORT[FEATURES], npartitions=3)
    with pytest.raises(ValueError, match=rf"batch has {N - 1} site labels for {N} rows of X"):
        CombatHarmonizer().fit(frame, batch=SITE[:-1])
    fitted = CombatHarmonizer().fit(frame, batch=SITE)
    with pytest.raises(ValueError, match=rf"batch has {N + 1} site labels for {N} rows of X"):
        fitted.transform(frame, batch=np.r_[SITE, ["a"]])


def test_dask_transform_reports_missing_covariates_by_row_of_the_whole_input():
    combat = CombatHarmonizer(continuous_cols="age").fit(X, batch=SITE, covariates=COVARS)
    covariates = COVARS.assign(age=COVARS["age"].where(COVARS.index != 25))
    with pytest.raises(
        ValueError, match=r"covariate 'age' has missing values \(NaN\) in row\(s\) \[25\]"
    ):
        combat.transform(da.from_array(X, chunks=(10, 6)), batch=SITE, covariates=covariates)


def test_dask_sites_and_covariates_may_be_dask_collections():
    expected = CombatHarmonizer(continuous_cols="age").fit_transform(
        X, batch=SITE, covariates=COVARS
    )
    combat = CombatHarmonizer(continuous_cols="age")
    batch, covariates = da.from_array(SITE, chunks=10), dd.from_pandas(COVARS, npartitions=3)
    Xd = da.from_array(X, chunks=(10, 6))
    got = combat.fit(Xd, batch=batch, covariates=covariates).transform(
        Xd, batch=batch, covariates=covariates
    )
    np.testing.assert_allclose(got.compute(), expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"covariate 'age' has missing values \(NaN\) in row"):
        combat.fit(Xd, batch=batch, covariates=dd.from_pandas(COVARS.assign(age=np.nan), 3))


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


def test_no_feature_columns_is_named():
    # every column of X is the site or a covariate: was numpy's "at least one array or dtype
    # is required"
    with pytest.raises(
        ValueError, match=r"X has no feature columns: its columns \['site', 'age'\]"
    ):
        CombatHarmonizer("site", continuous_cols="age").fit(COHORT[["site", "age"]])


def test_dask_dataframe_repeated_or_no_feature_columns_are_named():
    # a repeated column name: was "'DataFrame' object has no attribute 'dtype'"
    twice = dd.from_pandas(pd.concat([COHORT, COHORT[["f0"]]], axis=1), npartitions=3)
    with pytest.raises(ValueError, match=r"more than one column named \['f0'\] \(dask input\)"):
        CombatHarmonizer("site", "sex", "age").fit(twice)
    only_metadata = dd.from_pandas(COHORT[["site", "age"]], npartitions=3)
    with pytest.raises(ValueError, match=r"X has no feature columns \(dask input\)"):
        CombatHarmonizer("site", continuous_cols="age").fit(only_metadata)


def test_duplicated_covariate_or_site_columns_are_named():
    # covariates= with two 'age' columns: was pandas' "truth value of a Series is ambiguous";
    # covars of harmonize_volumes with two site columns: pandas' "unique requires a Series"
    from kwneuro_sk import harmonize_volumes

    twice = pd.concat([COVARS, COVARS[["age"]]], axis=1)
    with pytest.raises(ValueError, match=r"covariates= has more than one column named \['age'\]"):
        CombatHarmonizer(continuous_cols="age").fit(X, batch=SITE, covariates=twice)
    import nibabel

    img = nibabel.Nifti1Image(np.ones((2, 2, 2), dtype=np.float32), np.eye(4))
    with pytest.raises(ValueError, match="covars has more than one column named 'site'"):
        harmonize_volumes([img] * N, pd.concat([COVARS, COVARS[["site"]]], axis=1), "site", img)


def test_cli_refuses_repeated_column_names(tmp_path, capsys):
    # pandas renames the second 'f0' to 'f0.1', which was harmonized and written back so
    from kwneuro_sk.cli import main

    table = tmp_path / "t.csv"
    COHORT.rename(columns={"f1": "f0"}).to_csv(table, index=False)
    assert (
        main(["harmonize", str(table), "--batch-col", "site", "-o", str(tmp_path / "o.csv")]) != 0
    )
    assert "t.csv has more than one column named ['f0']" in capsys.readouterr().err
    assert not (tmp_path / "o.csv").exists()


def test_model_with_a_nan_category_level_is_refused(tmp_path):
    from kwneuro_sk import CombatEstimates

    estimates = CombatHarmonizer("site", "sex").fit(COHORT.drop(columns="age")).estimates_
    estimates.info["categories"] = [["F", float("nan")]]
    estimates.save(tmp_path / "m.npz")
    with pytest.raises(ValueError, match=r"info\['categories'\] has a NaN level for 'sex'"):
        CombatEstimates.load(tmp_path / "m.npz")


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


def _truncated_nii(path, tmp_path):
    """An uncompressed .nii whose header opens but whose data stop halfway."""
    img = nib.load(path)
    full = str(tmp_path / "full.nii")
    nib.save(nib.Nifti1Image(img.get_fdata(), AFFINE), full)
    raw = open(full, "rb").read()
    out = str(tmp_path / "cut.nii")
    open(out, "wb").write(raw[: 352 + (len(raw) - 352) // 2])
    return out


def _fails_leaving_nothing(run, tmp_path, message, caller):
    """``run(output_dir, broken)`` with a broken volume fails naming it, in a new folder (which
    is removed) and in a folder holding earlier outputs (left as they were), with a note."""
    with pytest.raises(ValueError, match=message) as info:
        run(tmp_path / "new" / "out", True)
    assert not (tmp_path / "new").exists()  # the folders this call created are gone too
    assert info.value.__notes__[0].startswith(f"{caller}: nothing was written")
    existing = tmp_path / "existing"
    written = run(existing, False)
    before = {p: open(p, "rb").read() for p in written}
    with pytest.raises(ValueError, match=message) as info:
        run(existing, True)
    assert info.value.__notes__[0].startswith(f"{caller}: nothing was written")
    assert sorted(os.listdir(existing)) == sorted(os.path.basename(p) for p in written)
    assert all(open(p, "rb").read() == content for p, content in before.items())
    return info.value


BREAKAGES = pytest.mark.parametrize(
    "how, message",
    [
        ("nan voxel", "volume 5 .*NaN or infinite voxel"),
        ("moved affine", "volume 5 .*affine"),
        ("truncated file", "volume 5 .*broken.nii.gz"),
        ("truncated .nii", "volume 5 .*cut.nii"),
    ],
)


def _with_broken_volume(paths, how, tmp_path):
    volumes = list(paths)
    if how == "truncated .nii":
        volumes[5] = _truncated_nii(paths[5], tmp_path)
    else:
        volumes[5] = _broken(paths[5], how, tmp_path)
    return volumes


@BREAKAGES
@pytest.mark.parametrize("caller", ["apply_volumes", "harmonize_volumes"])
def test_streamed_call_failing_midway_leaves_nothing(volume_model, tmp_path, how, message, caller):
    # a streamed call (output_dir=...) meeting a bad volume after others were read: no output,
    # no folder it made, earlier outputs in an existing folder unchanged, and a note saying so
    # (also when the folder existed and nothing had to be removed)
    from kwneuro_sk import harmonize_volumes

    paths, covars, mask, estimates = volume_model
    volumes = _with_broken_volume(paths, how, tmp_path)

    def run(output_dir, broken):
        given = volumes if broken else paths
        if caller == "apply_volumes":
            return estimates.apply_volumes(given, covars, output_dir=output_dir, chunk_size=2)
        return harmonize_volumes(given, covars, "site", mask, output_dir=output_dir, chunk_size=2)[
            0
        ]

    error = _fails_leaving_nothing(run, tmp_path, message, caller)
    if caller == "harmonize_volumes":  # caught in the fit pass, before any output was staged
        assert error.__notes__ == ["harmonize_volumes: nothing was written"]


def test_streamed_harmonize_failing_in_the_write_pass_removes_its_files(
    volume_model, tmp_path, monkeypatch
):
    # a volume that becomes unreadable between the fit pass and the write pass (replaced on a
    # network drive, say): the outputs of the chunks written so far are removed
    from kwneuro_sk import harmonize_volumes, images

    paths, covars, mask, _ = volume_model
    read_data, reads = images.read_data, []

    def flaky(img, *, name="image", dtype=None):
        if name.startswith("volume 5 "):
            reads.append(name)
            if len(reads) > 1:
                raise ValueError(f"{name}: the image data could not be read (simulated)")
        return read_data(img, name=name, dtype=dtype)

    monkeypatch.setattr(images, "read_data", flaky)
    output_dir = tmp_path / "out"
    with pytest.raises(ValueError, match="volume 5 .*could not be read") as info:
        harmonize_volumes(paths, covars, "site", mask, output_dir=output_dir, chunk_size=2)
    assert len(reads) == 2  # once in the fit pass, failing in the write pass
    notes = " ".join(info.value.__notes__)
    assert "nothing was written (8 unfinished output file(s)" in notes
    assert not output_dir.exists()


def test_streamed_outputs_are_checked_before_the_first_write(volume_model, tmp_path):
    from kwneuro_sk import harmonize_volumes

    paths, covars, mask, estimates = volume_model
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match=r"cannot create output_dir .*afile' is a file"):
        harmonize_volumes(paths, covars, "site", mask, output_dir=tmp_path / "afile" / "out")
    with pytest.raises(ValueError, match=r"\['tiv'\] not found in covariates= \(streamed vol"):
        harmonize_volumes(
            paths, covars, "site", mask, continuous_cols="tiv", output_dir=tmp_path / "x"
        )
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="cannot (write in|create) output_dir"):
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


def test_cli_report_failing_after_the_fit_leaves_no_output(tmp_path, monkeypatch, capsys):
    import kwneuro_sk.report
    from kwneuro_sk.cli import main

    def failing_report(*args, **kwargs):
        raise ValueError("the report cannot be drawn")

    monkeypatch.setattr(kwneuro_sk.report, "harmonization_report", failing_report)
    COHORT.to_csv(tmp_path / "train.csv", index=False)
    outputs = ["-o", str(tmp_path / "o" / "out.csv"), "--save-model", str(tmp_path / "m.npz")]
    args = ["harmonize", str(tmp_path / "train.csv"), "--batch-col", "site", "--categorical"]
    status = main(
        [*args, "sex", "--continuous", "age", *outputs, "--report", str(tmp_path / "r.html")]
    )
    assert status == 1
    err = capsys.readouterr().err
    assert "the report cannot be drawn" in err and "nothing was written" in err
    assert sorted(os.listdir(tmp_path)) == ["train.csv"]


def test_cli_failing_fit_removes_the_folders_it_created(tmp_path, capsys):
    from kwneuro_sk.cli import main

    one_row_site = COHORT.iloc[:21]  # site "c" has one row
    one_row_site.to_csv(tmp_path / "t.csv", index=False)
    outputs = ["-o", str(tmp_path / "new" / "dir" / "out.csv"), "--save-model"]
    args = ["harmonize", str(tmp_path / "t.csv"), "--batch-col", "site", "--continuous", "age"]
    assert main([*args, "--categorical", "sex", *outputs, str(tmp_path / "m" / "m.npz")]) == 1
    err = capsys.readouterr().err
    assert "use --mean-only" in err
    assert "nothing was written (the folder(s) it created removed)" in err
    assert sorted(os.listdir(tmp_path)) == ["t.csv"]


def test_unknown_unseen_batch_policy_set_after_fit_is_refused_not_adapted():
    combat = CombatHarmonizer().fit(X, batch=SITE).set_params(unseen_batch="adpat")
    with pytest.raises(ValueError, match="unseen_batch must be 'error' or 'adapt'; got 'adpat'"):
        combat.transform(NEW[FEATURES].to_numpy(), batch=NEW["site"])


def test_apply_volumes_refuses_an_unknown_unseen_batch_policy(volume_model):
    paths, covars, _, estimates = volume_model
    with pytest.raises(ValueError, match="'unseen_batch' parameter of apply_volumes"):
        estimates.apply_volumes(paths, covars, unseen_batch="adpat")


# --------------------------------------------------------------------------------------------
# the matrix: every option on every route
# --------------------------------------------------------------------------------------------

# Options: estimator keyword arguments. "adapt" is the unseen-site policy (new rows of a site
# unseen in fit), "covbat" the CovBat estimator.
OPTIONS = {
    "plain": {},
    "covariates": {"categorical_cols": "sex", "continuous_cols": "age"},
    "smooth": {"smooth_cols": "age", "smooth_knots": 4, "categorical_cols": "sex"},
    "ref_batch": {"ref_batch": "b", "continuous_cols": "age"},
    "eb_off": {"eb": False},
    "non_parametric": {"parametric": False},
    "mean_only": {"mean_only": True, "continuous_cols": "age"},
    "adapt": {"unseen_batch": "adapt", "continuous_cols": "age"},
    "covbat": {"covbat": True, "continuous_cols": "age"},
}
ROUTES = [
    "dataframe",
    "dask_array",
    "dask_dataframe",
    "volumes",
    "streamed_volumes",
    "cli",
    "model_file",
]


def _new_rows(seed=5, n=6):
    """Rows of a site "d" unseen in fit (the unseen-site policy)."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.normal(size=(n, N_FEATURES)) + 3.0, columns=FEATURES)
    frame["site"] = "d"
    frame["age"] = rng.uniform(25, 75, n).round()
    frame["sex"] = np.tile(["F", "M"], n // 2)
    return frame


NEW = _new_rows()


def _estimator(options, **extra):
    options = dict(options)
    cls = CovBatHarmonizer if options.pop("covbat", False) else CombatHarmonizer
    return cls(**options, **extra)


def _reference(options):
    """The in-memory keyword route: the numbers every other route must give."""
    combat = _estimator(options)
    out = combat.fit_transform(X, batch=SITE, covariates=COVARS)
    if options.get("unseen_batch") == "adapt":
        out = combat.transform(NEW[FEATURES].to_numpy(), batch=NEW["site"], covariates=NEW)
    return out


def _volumes(frame):
    return [nib.Nifti1Image(row.reshape(3, 2, 1), AFFINE) for row in frame[FEATURES].to_numpy()]


MASK = nib.Nifti1Image(np.ones((3, 2, 1), dtype=np.uint8), AFFINE)


def _voxels(images):
    return np.stack(
        [
            np.asarray(nib.load(i).get_fdata() if isinstance(i, str) else i.get_fdata()).reshape(-1)
            for i in images
        ]
    )


def _table(frame, options):
    """The features, the site and the covariates the options name (the columns route)."""
    named = [options.get(k) for k in ("categorical_cols", "continuous_cols", "smooth_cols")]
    return frame[[*FEATURES, "site", *[c for c in named if c]]]


def _run(route, options, tmp_path):
    """The harmonized rows (fit rows, or the unseen site's rows with "adapt") by ``route``."""
    adapt = options.get("unseen_batch") == "adapt"
    cohort, new = _table(COHORT, options), _table(NEW, options)
    if route == "dataframe":
        combat = _estimator(options, batch_col="site")
        out = combat.fit_transform(cohort)
        return combat.transform(new) if adapt else out
    if route == "dask_array":
        combat = _estimator(options)
        Xd = da.from_array(X, chunks=(7, 4))
        combat.fit(Xd, batch=SITE, covariates=COVARS)
        if adapt:
            new = da.from_array(NEW[FEATURES].to_numpy(), chunks=(3, 6))
            return combat.transform(new, batch=NEW["site"], covariates=NEW).compute()
        return combat.transform(Xd, batch=SITE, covariates=COVARS).compute()
    if route == "dask_dataframe":
        combat = _estimator(options, batch_col="site")
        frame = dd.from_pandas(cohort, npartitions=3)
        combat.fit(frame)
        new = dd.from_pandas(new, npartitions=2) if adapt else frame
        return combat.transform(new).compute().to_numpy()
    if route in ("volumes", "streamed_volumes"):
        from kwneuro_sk import harmonize_volumes
        from kwneuro_sk.volumes import apply_volumes

        options = dict(options)
        unseen = options.pop("unseen_batch", "error")
        if options.pop("covbat", False):
            options["percent_var"] = 0.9  # CovBat has no voxel-wise route
        streamed = route == "streamed_volumes"
        output_dir = tmp_path / "out" if streamed else None
        out, estimates = harmonize_volumes(
            _volumes(COHORT),
            COVARS,
            "site",
            MASK,
            dtype=np.float64,
            output_dir=output_dir,
            **options,
        )
        if adapt:
            out = apply_volumes(
                estimates,
                _volumes(NEW),
                NEW[["site", "age", "sex"]],
                unseen_batch=unseen,
                dtype=np.float64,
                output_dir=tmp_path / "new" if streamed else None,
            )
        return _voxels(out)
    if route == "cli":
        from kwneuro_sk.cli import main

        flags = {
            "categorical_cols": "--categorical",
            "continuous_cols": "--continuous",
            "smooth_cols": "--smooth",
            "smooth_knots": "--smooth-knots",
            "ref_batch": "--ref-batch",
        }
        args = []
        for name, value in options.items():
            if name in flags:
                args += [flags[name], str(value)]
            elif name == "eb":
                args.append("--no-eb")
            elif name == "parametric":
                args.append("--non-parametric")
            elif name == "mean_only":
                args.append("--mean-only")
            elif name == "covbat":
                args.append("--covbat")
        cohort.to_csv(tmp_path / "train.csv", index=False)
        model = tmp_path / "model.npz"
        status = main(
            ["harmonize", str(tmp_path / "train.csv"), "--batch-col", "site", *args]
            + ["-o", str(tmp_path / "out.csv"), "--save-model", str(model)]
        )
        assert status == 0
        out = pd.read_csv(tmp_path / "out.csv")[FEATURES].to_numpy()
        # the saved model applied to its own training table (or to the unseen site's rows)
        (new if adapt else cohort).to_csv(tmp_path / "new.csv", index=False)
        apply = ["apply", str(model), str(tmp_path / "new.csv"), "-o", str(tmp_path / "o2.csv")]
        assert main(apply + (["--adapt-new-sites"] if adapt else [])) == 0
        again = pd.read_csv(tmp_path / "o2.csv")[FEATURES].to_numpy()
        if not adapt:
            np.testing.assert_allclose(again, out, rtol=1e-10, atol=1e-10)
        return again
    if route == "model_file":
        from kwneuro_sk import CombatEstimates

        fitted = _estimator(options, batch_col="site").fit(cohort)
        fitted.estimates_.save(tmp_path / "model.npz")
        loaded = type(fitted).from_estimates(CombatEstimates.load(tmp_path / "model.npz"))
        return loaded.transform(new if adapt else cohort)
    raise AssertionError(route)


# Cells that are refused, with the error that names the option and the route.
REFUSED = {
    ("dask_array", "adapt"): (ValueError, r"unseen_batch='adapt' needs the rows in memory"),
    ("dask_dataframe", "adapt"): (ValueError, r"unseen_batch='adapt' needs the rows in memory"),
    ("streamed_volumes", "adapt"): (ValueError, r"unseen_batch='adapt' .* streamed path"),
    ("dask_array", "covbat"): (TypeError, "CovBatHarmonizer cannot be fitted on a dask input"),
    ("dask_dataframe", "covbat"): (TypeError, "CovBatHarmonizer cannot be fitted on a dask"),
    # CovBat has no voxel-wise route: the option is not a parameter there
    ("volumes", "covbat"): (TypeError, r"unexpected keyword argument 'percent_var'"),
    ("streamed_volumes", "covbat"): (TypeError, r"unexpected keyword argument 'percent_var'"),
    ("cli", "covbat"): (SystemExit, "2"),
    ("model_file", "covbat"): (NotImplementedError, "CovBatHarmonizer cannot be rebuilt from"),
}


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("route", ROUTES)
def test_every_option_on_every_route(route, option, tmp_path, capsys):
    options = OPTIONS[option]
    if (route, option) in REFUSED:
        error, message = REFUSED[route, option]
        with pytest.raises(error, match=message):
            _run(route, options, tmp_path)
        if route == "cli":
            assert "unrecognized arguments: --covbat" in capsys.readouterr().err
        # nothing written by the refused call
        refused_outputs = ("new", "o2.csv") if option == "adapt" else ("out", "out.csv")
        assert not any((tmp_path / name).exists() for name in refused_outputs)
        return
    expected = _reference(options)
    got = _run(route, options, tmp_path)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)
