"""CombatHarmonizer on dask arrays and DataFrames, and streamed harmonize_volumes on a dask
cluster through joblib's dask backend."""

import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

da = pytest.importorskip("dask.array")
dd = pytest.importorskip("dask.dataframe")
distributed = pytest.importorskip("distributed")

import joblib  # noqa: E402

from kwneuro_sk import CombatHarmonizer, harmonize_volumes  # noqa: E402

COMPARED = (
    "grand_mean",
    "beta",
    "var_pooled",
    "gamma_hat",
    "delta_hat",
    "gamma_star",
    "delta_star",
)


def _data(n=60, n_features=25, seed=0):
    rng = np.random.default_rng(seed)
    site = np.array(["a", "b", "c"])[rng.integers(0, 3, n)]
    age = rng.uniform(20, 80, n).round()
    sex = rng.choice(["F", "M"], n)
    X = (
        1e4
        + 10 * rng.normal(size=(n, n_features))
        + 0.1 * age[:, None]
        + pd.Series(site).map({"a": 0.0, "b": 8.0, "c": -5.0}).to_numpy()[:, None]
    )
    return X, site, pd.DataFrame({"age": age, "sex": sex})


def _assert_fitted_equal(expected, actual, rtol=1e-10):
    for name in COMPARED:
        want, got = getattr(expected, name + "_"), getattr(actual, name + "_")
        assert type(got) is np.ndarray, name
        assert got.shape == want.shape, name
        if not want.size:
            continue
        np.testing.assert_allclose(got, want, rtol=0, atol=rtol * np.abs(want).max(), err_msg=name)
    np.testing.assert_array_equal(actual.batches_, expected.batches_)
    np.testing.assert_array_equal(actual.n_samples_per_batch_, expected.n_samples_per_batch_)


OPTIONS = [
    {},
    {"categorical_cols": "sex", "continuous_cols": "age"},
    {"ref_batch": "b", "continuous_cols": "age"},
    {"mean_only": True},
    {"eb": False},
    {"parametric": False},
]


@pytest.mark.parametrize("options", OPTIONS)
def test_dask_array_fit_and_lazy_transform_equal_numpy(options):
    X, site, covars = _data()
    expected = CombatHarmonizer(**options).fit(X, batch=site, covariates=covars)
    Xd = da.from_array(X, chunks=(13, 9))  # blocks of rows and of features
    combat = CombatHarmonizer(**options).fit(Xd, batch=site, covariates=covars)
    _assert_fitted_equal(expected, combat)
    out = combat.transform(Xd, batch=site, covariates=covars)
    assert isinstance(out, da.Array)
    assert out.shape == X.shape
    np.testing.assert_allclose(
        out.compute(), expected.transform(X, batch=site, covariates=covars), rtol=1e-12
    )
    lazy = CombatHarmonizer(**options).fit_transform(Xd, batch=site, covariates=covars)
    assert isinstance(lazy, da.Array)


def test_dask_array_float32_stays_float32():
    X, site, _ = _data()
    Xd = da.from_array(X.astype(np.float32), chunks=(20, 25))
    combat = CombatHarmonizer().fit(Xd, batch=site)
    out = combat.transform(Xd, batch=site)
    assert out.dtype == np.float32
    assert out.compute().dtype == np.float32


def test_dask_dataframe_columns_route():
    X, site, covars = _data()
    frame = pd.DataFrame(X, columns=[f"roi{i}" for i in range(X.shape[1])])
    frame["site"], frame["age"], frame["sex"] = site, covars["age"], covars["sex"]
    options = dict(batch_col="site", categorical_cols="sex", continuous_cols="age")
    expected = CombatHarmonizer(**options).fit(frame)
    ddf = dd.from_pandas(frame, npartitions=4)
    combat = CombatHarmonizer(**options).fit(ddf)
    _assert_fitted_equal(expected, combat)
    assert list(combat.feature_names_in_) == list(frame.columns)
    assert list(combat.get_feature_names_out()) == [f"roi{i}" for i in range(X.shape[1])]
    out = combat.transform(ddf)
    assert isinstance(out, dd.DataFrame)
    result = out.compute()
    assert list(result.columns) == list(combat.get_feature_names_out())
    np.testing.assert_allclose(result.to_numpy(), expected.transform(frame), rtol=1e-12)
    # the fitted harmonizer also takes the pandas frame
    np.testing.assert_allclose(combat.transform(frame), expected.transform(frame), rtol=1e-12)


def test_dask_dataframe_keyword_route():
    X, site, _ = _data()
    frame = pd.DataFrame(X, columns=[f"roi{i}" for i in range(X.shape[1])])
    ddf = dd.from_pandas(frame, npartitions=3)
    expected = CombatHarmonizer().fit(frame, batch=site)
    combat = CombatHarmonizer().fit(ddf, batch=site)
    _assert_fitted_equal(expected, combat)
    np.testing.assert_allclose(
        combat.transform(ddf, batch=site).compute().to_numpy(),
        expected.transform(frame, batch=site),
        rtol=1e-12,
    )


def test_empty_partitions_add_nothing():
    """A filter (ddf[ddf.qc_pass]) leaves a partition empty: fit and transform failed with
    scikit-learn's "Found array with 0 sample(s)". An empty block adds nothing to fit and is
    harmonized to an empty block of the feature columns; a wholly empty input is refused."""
    X, site, covars = _data(n=90)
    frame = pd.DataFrame(X, columns=[f"roi{i}" for i in range(X.shape[1])])
    frame["site"], frame["age"], frame["sex"] = site, covars["age"], covars["sex"]
    frame["qc_pass"] = ~np.isin(np.arange(90), np.arange(30, 45))
    kept = frame[frame.qc_pass].drop(columns="qc_pass")
    ddf = dd.from_pandas(frame, npartitions=6)
    ddf = ddf[ddf.qc_pass].drop(columns="qc_pass")
    assert 0 in [len(p) for p in ddf.partitions]
    for options in (
        dict(batch_col="site", categorical_cols="sex", continuous_cols="age"),
        dict(
            batch_col="site",
            categorical_cols="sex",
            smooth_cols="age",
            smooth_knots=[20.0, 50.0, 80.0],
        ),
    ):
        expected = CombatHarmonizer(**options).fit(kept)
        combat = CombatHarmonizer(**options).fit(ddf)
        _assert_fitted_equal(expected, combat)
        out = expected.transform(ddf).compute()
        assert list(out.columns) == list(expected.get_feature_names_out())
        np.testing.assert_allclose(out.to_numpy(), expected.transform(kept), rtol=1e-12)
    # a dask array with an empty block of rows, keyword route
    Xd = da.concatenate([da.from_array(X[:40]), da.zeros((0, X.shape[1])), da.from_array(X[40:])])
    expected = CombatHarmonizer().fit(X, batch=site)
    combat = CombatHarmonizer().fit(Xd, batch=site)
    _assert_fitted_equal(expected, combat)
    np.testing.assert_allclose(
        combat.transform(Xd, batch=site).compute(), expected.transform(X, batch=site)
    )
    with pytest.raises(ValueError, match=r"X has no rows \(dask input\)"):
        CombatHarmonizer(**options).fit(ddf[ddf.age < 0])


def test_dask_errors_name_the_problem():
    X, site, covars = _data()
    Xd = da.from_array(X, chunks=(20, 25))
    combat = CombatHarmonizer().fit(Xd, batch=site)
    with pytest.raises(ValueError, match=r"site\(s\) \['z'\] were not seen in fit"):
        combat.transform(Xd, batch=np.where(site == "a", "z", site))
    with pytest.raises(ValueError, match="needs the site of each row"):
        CombatHarmonizer().fit(Xd)
    with pytest.raises(TypeError, match="batch_col='site' needs X as a DataFrame"):
        CombatHarmonizer(batch_col="site").fit(Xd)
    bad = X.copy()
    bad[33, 7] = np.nan
    with pytest.raises(ValueError, match=r"NaN or infinite values in feature column\(s\) \[7\]"):
        CombatHarmonizer().fit(da.from_array(bad, chunks=(20, 5)), batch=site)
    frame = pd.DataFrame(X[:, :3], columns=["a", "b", "c"]).assign(site=site)
    with pytest.raises(ValueError, match=r"column\(s\) \['age'\] not found"):
        CombatHarmonizer(batch_col="site", continuous_cols="age").fit(
            dd.from_pandas(frame, npartitions=2)
        )
    with pytest.raises(ValueError, match="single row.*mean_only=True"):
        CombatHarmonizer().fit(Xd, batch=np.r_[["solo"], site[1:]])


def test_core_never_imports_dask():
    code = (
        "import sys, numpy as np; from kwneuro_sk import CombatHarmonizer, "
        "harmonize_volumes; X = np.random.default_rng(0).normal(size=(10, 3)); "
        "CombatHarmonizer().fit_transform(X, batch=[0, 1] * 5); "
        "assert not [m for m in sys.modules if m.split('.')[0] == 'dask'], 'dask imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------
# on a cluster of two worker processes
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(
        n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None
    ) as cluster:
        with distributed.Client(cluster) as client:
            yield client


def test_fit_and_transform_on_local_cluster(client):
    X, site, covars = _data(n=80)
    options = dict(categorical_cols="sex", continuous_cols="age")
    expected = CombatHarmonizer(**options).fit(X, batch=site, covariates=covars)
    Xd = da.from_array(X, chunks=(10, 25))
    combat = CombatHarmonizer(**options).fit(Xd, batch=site, covariates=covars)
    _assert_fitted_equal(expected, combat)
    out = client.compute(combat.transform(Xd, batch=site, covariates=covars)).result()
    np.testing.assert_allclose(
        out, expected.transform(X, batch=site, covariates=covars), rtol=1e-12
    )


def test_streamed_volumes_with_joblib_dask_backend(client, tmp_path):
    rng = np.random.default_rng(4)
    shape, affine = (5, 4, 3), np.eye(4)
    site = np.repeat(["a", "b"], 6)
    paths = []
    for i, s in enumerate(site):
        paths.append(str(tmp_path / f"v{i}.nii.gz"))
        nib.save(
            nib.Nifti1Image((rng.normal(size=shape) + (s == "b") * 3).astype(np.float32), affine),
            paths[-1],
        )
    covars = pd.DataFrame({"site": site})
    mask = nib.Nifti1Image(np.ones(shape, dtype=np.uint8), affine)
    local, est_local = harmonize_volumes(
        paths, covars, "site", mask, output_dir=tmp_path / "local", chunk_size=3
    )
    with distributed.get_task_stream(client) as stream:
        with joblib.parallel_config(backend="dask"):
            remote, est_remote = harmonize_volumes(
                paths, covars, "site", mask, output_dir=tmp_path / "dask", chunk_size=3, n_jobs=-1
            )
    # both passes ran as tasks on the cluster's workers (joblib may batch chunks together)
    assert len(stream.data) >= 2
    assert {task["worker"] for task in stream.data} <= set(client.scheduler_info()["workers"])
    for name in COMPARED:
        np.testing.assert_array_equal(est_remote.estimates[name], est_local.estimates[name])
    for a, b in zip(local, remote):
        np.testing.assert_array_equal(nib.load(a).get_fdata(), nib.load(b).get_fdata())
