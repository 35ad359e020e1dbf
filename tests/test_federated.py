"""partial_fit and federated ComBat (site summaries): equal to fit on the pooled rows."""

import numpy as np
import pandas as pd
import pytest

from kwneuro_sk import CombatHarmonizer

COMPARED = (
    "grand_mean",
    "beta",
    "var_pooled",
    "gamma_hat",
    "delta_hat",
    "gamma_star",
    "delta_star",
    "gamma_bar",
    "t2",
    "a_prior",
    "b_prior",
)
PER_SITE_PRIORS = ("gamma_bar", "t2", "a_prior", "b_prior")


def make_cohort(n=150, n_features=30, seed=0):
    """Three sites, a large offset (precision of the centred statistics), a categorical
    covariate whose level "z" appears only in the last rows and never at site a."""
    rng = np.random.default_rng(seed)
    site = rng.choice(["a", "b", "c"], n)
    age = rng.uniform(20, 80, n).astype(np.float32).astype(float)
    sex = rng.choice(["F", "M"], n)
    group = np.where(np.arange(n) < n // 2, "x", rng.choice(["x", "y", "z"], n))
    group[(site == "a") & (group == "z")] = "y"
    X = (
        1e3
        + 0.05 * age[:, None]
        + 0.5 * (sex == "M")[:, None]
        + (group == "z")[:, None]
        + rng.normal(size=(n, n_features)) * rng.uniform(0.5, 2.0, n_features)
        + pd.Series(site).map({"a": 0.0, "b": 2.0, "c": -1.0}).to_numpy()[:, None]
    )
    covariates = pd.DataFrame({"age": age, "sex": sex, "group": group})
    return X, site, covariates


COHORT = make_cohort()
COVARIATES = {"categorical_cols": ["sex", "group"], "continuous_cols": "age"}
OPTIONS = {
    "parametric": {},
    "nonparametric": {"parametric": False},
    "no eb": {"eb": False},
    "mean only": {"mean_only": True},
    "ref batch": {"ref_batch": "b"},
    "no covariates": {"categorical_cols": None, "continuous_cols": None},
    "continuous only": {"categorical_cols": None},
}


def assert_same_model(expected, actual, rtol=1e-10):
    ref = expected._reference_index()
    for name in COMPARED:
        want, got = getattr(expected, name + "_"), getattr(actual, name + "_")
        assert got.shape == want.shape, name
        if ref is not None and name in PER_SITE_PRIORS + ("gamma_hat",):
            # the reference site's location/priors are rounding noise around 0: not compared
            keep = np.arange(len(want)) != ref
            want, got = want[keep], got[keep]
        finite = np.isfinite(want)
        np.testing.assert_array_equal(np.isfinite(got), finite, err_msg=name)
        if want[finite].size:
            scale = np.abs(want[finite]).max()
            np.testing.assert_allclose(
                got[finite], want[finite], rtol=rtol, atol=rtol * scale, err_msg=name
            )
    np.testing.assert_array_equal(actual.batches_, expected.batches_)
    np.testing.assert_array_equal(actual.n_samples_per_batch_, expected.n_samples_per_batch_)
    assert actual.covariate_names_.tolist() == expected.covariate_names_.tolist()


@pytest.fixture(scope="module", params=list(OPTIONS))
def fitted(request):
    X, site, covariates = COHORT
    params = {**COVARIATES, **OPTIONS[request.param]}
    return params, CombatHarmonizer(**params).fit(X, batch=site, covariates=covariates)


# ------------------------------------------------------------------------------------------
# partial_fit
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_partial_fit_equals_fit_over_random_chunkings(fitted, seed):
    params, whole = fitted
    X, site, covariates = COHORT
    rng = np.random.default_rng(seed)
    # rows in order, so that level "z" is first seen in a later chunk; random chunk sizes
    cuts = np.sort(rng.choice(np.arange(1, len(X)), size=rng.integers(2, 9), replace=False))
    incremental = CombatHarmonizer(**params)
    for rows in np.split(np.arange(len(X)), cuts):
        assert (
            incremental.partial_fit(X[rows], batch=site[rows], covariates=covariates.iloc[rows])
            is incremental
        )
    assert_same_model(whole, incremental)
    np.testing.assert_allclose(
        incremental.transform(X, batch=site, covariates=covariates),
        whole.transform(X, batch=site, covariates=covariates),
        rtol=1e-10,
        atol=1e-10 * np.abs(X).max(),
    )


def test_partial_fit_columns_route_and_continuing_after_use():
    X, site, covariates = COHORT
    frame = pd.DataFrame(X, columns=[f"f{j}" for j in range(X.shape[1])])
    frame = pd.concat([frame, covariates], axis=1).assign(site=site)
    params = {"batch_col": "site", **COVARIATES}
    whole = CombatHarmonizer(**params).fit(frame)
    incremental = CombatHarmonizer(**params).partial_fit(frame.iloc[:70])
    first = incremental.gamma_star_.copy()  # the model of the first 70 rows, used ...
    incremental.partial_fit(frame.iloc[70:])  # ... and then continued
    assert not np.allclose(first, incremental.gamma_star_[:, : first.shape[1]])
    assert_same_model(whole, incremental)
    assert incremental.get_feature_names_out().tolist() == whole.get_feature_names_out().tolist()
    assert incremental.feature_names_in_.tolist() == whole.feature_names_in_.tolist()


def test_fit_resets_and_partial_fit_after_fit_starts_anew():
    X, site, covariates = COHORT
    combat = CombatHarmonizer().partial_fit(X[:50], batch=site[:50])
    combat.fit(X, batch=site)
    assert_same_model(CombatHarmonizer().fit(X, batch=site), combat)
    with pytest.warns(UserWarning, match="keeps no statistics.*starts a new model"):
        combat.partial_fit(X[:60], batch=site[:60])
    assert_same_model(CombatHarmonizer().fit(X[:60], batch=site[:60]), combat)


def test_covbat_has_no_statistics_routes():
    from kwneuro_sk import CovBatHarmonizer

    assert not hasattr(CovBatHarmonizer(), "partial_fit")


def test_partial_fit_refusals():
    X, site, covariates = COHORT
    with pytest.raises(ValueError, match="does not support smooth_cols"):
        CombatHarmonizer(smooth_cols="age").partial_fit(X, batch=site, covariates=covariates)
    one_site = CombatHarmonizer().partial_fit(X[site == "a"], batch=site[site == "a"])
    with pytest.raises(ValueError, match="at least two sites"):
        one_site.transform(X, batch=site)
    combat = CombatHarmonizer().partial_fit(X[:20], batch=site[:20])
    with pytest.raises(ValueError, match="30 features"):
        combat.partial_fit(X[20:40, :5], batch=site[20:40])


def test_partial_fit_over_dask_blocks():
    da = pytest.importorskip("dask.array")
    X, site, covariates = COHORT
    lazy = da.from_array(X, chunks=(40, -1))
    params = {**COVARIATES, "parametric": False}
    combat = CombatHarmonizer(**params)
    start = 0
    for block in lazy.blocks:
        stop = start + block.shape[0]
        combat.partial_fit(block, batch=site[start:stop], covariates=covariates.iloc[start:stop])
        start = stop
    assert_same_model(CombatHarmonizer(**params).fit(X, batch=site, covariates=covariates), combat)


def test_partial_fit_pickles_and_clones_while_pending():
    import pickle

    from sklearn.base import clone

    X, site, _ = COHORT
    combat = CombatHarmonizer().partial_fit(X[:80], batch=site[:80])
    restored = pickle.loads(pickle.dumps(combat)).partial_fit(X[80:], batch=site[80:])
    assert_same_model(CombatHarmonizer().fit(X, batch=site), restored)
    assert not hasattr(clone(combat), "n_features_in_")
