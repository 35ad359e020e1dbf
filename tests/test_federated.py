"""partial_fit and federated ComBat (site summaries): equal to fit on the pooled rows."""

import re
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.exceptions import NotFittedError

from kwneuro_sk import CombatEstimates, CombatHarmonizer

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


def assert_same_transform(expected, actual):
    """Both harmonize COHORT alike (to rounding of the features' size)."""
    X, site, covariates = COHORT
    np.testing.assert_allclose(
        actual.transform(X, batch=site, covariates=covariates),
        expected.transform(X, batch=site, covariates=covariates),
        rtol=1e-10,
        atol=1e-10 * np.abs(X).max(),
    )


def partial_fit_chunks(combat, chunks, X=None):
    """``combat.partial_fit`` on COHORT's rows (or ``X``'s) chunk by chunk; returns it."""
    X0, site, covariates = COHORT
    X = X0 if X is None else X
    for rows in chunks:
        assert (
            combat.partial_fit(X[rows], batch=site[rows], covariates=covariates.iloc[rows])
            is combat
        )
    return combat


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
    incremental = partial_fit_chunks(CombatHarmonizer(**params), np.split(np.arange(len(X)), cuts))
    assert_same_model(whole, incremental)
    assert_same_transform(whole, incremental)


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


@pytest.mark.parametrize(
    "knots",
    [[20.0, 35.0, 50.0, 65.0, 80.0], {"age": [20.0, 40.0, 60.0, 80.0]}],
    ids=["sequence", "dict"],
)
def test_partial_fit_with_fixed_smooth_knots_equals_fit(knots):
    X, site, covariates = COHORT
    params = {"categorical_cols": ["sex", "group"], "smooth_cols": "age", "smooth_knots": knots}
    whole = CombatHarmonizer(**params).fit(X, batch=site, covariates=covariates)
    expected_knots = knots["age"] if isinstance(knots, dict) else knots
    np.testing.assert_array_equal(whole.estimates_.info["smooth_knots"][0], expected_knots)
    chunks = np.array_split(np.arange(len(X)), 6)
    incremental = partial_fit_chunks(CombatHarmonizer(**params), chunks)
    assert_same_model(whole, incremental)
    assert incremental.covariate_names_[-1] == f"age_spline{len(expected_knots)}"
    assert_same_transform(whole, incremental)


def test_partial_fit_with_knots_placed_by_fits_rule():
    """The knots fit places (quantiles of all the rows), fixed from the covariate table."""
    X, site, covariates = COHORT
    params = {"smooth_cols": "age", "smooth_knots": 4}
    whole = CombatHarmonizer(**params).fit(X, batch=site, covariates=covariates)
    incremental = partial_fit_chunks(
        CombatHarmonizer(**params).with_fixed_knots(covariates),
        np.array_split(np.arange(len(X)), 5),
    )
    assert_same_model(whole, incremental)
    with pytest.raises(ValueError, match="smooth covariate 'age' not found in covariates"):
        CombatHarmonizer(**params).with_fixed_knots(covariates[["sex"]])


def test_knots_beyond_the_data_partial_fit_is_the_closer_to_least_squares():
    """The federated page's claim: for knots 0-100 on ages 20-80 the spline basis is nearly
    collinear with the site columns; fit's normal equations of the whole design lose digits
    (2.4e-8 of beta against lstsq) that the centred statistics keep (2.4e-10)."""
    X, site, covariates = COHORT
    params = {"categorical_cols": "sex", "smooth_cols": "age"}
    params["smooth_knots"] = {"age": [0, 25, 50, 75, 100]}
    whole = CombatHarmonizer(**params).fit(X, batch=site, covariates=covariates)
    incremental = partial_fit_chunks(
        CombatHarmonizer(**params), np.array_split(np.arange(len(X)), 6)
    )
    onehot = (site[:, None] == whole.batches_[None, :]).astype(float)
    design = np.hstack([onehot, whole._covariates.transform(covariates.reset_index(drop=True))])
    exact = np.linalg.lstsq(design, X, rcond=None)[0][len(whole.batches_) :]

    def error(model):
        return np.abs(model.beta_ - exact).max() / np.abs(exact).max()

    assert 1e-9 < error(whole) < 1e-7
    assert error(incremental) < 1e-9
    assert_same_model(whole, incremental, rtol=1e-7)


def test_smooth_knots_positions_are_checked():
    X, site, covariates = COHORT
    for bad in ([20.0], [20.0, 50.0, 40.0], [20.0, np.nan, 80.0], [[20.0, 50.0]]):
        with pytest.raises(ValueError, match="smooth_knots of smooth covariate 'age' must be"):
            CombatHarmonizer(smooth_cols="age", smooth_knots=bad).fit(
                X, batch=site, covariates=covariates
            )
    with pytest.raises(ValueError, match="missing \\['age'\\], not smooth columns \\['agee'\\]"):
        CombatHarmonizer(smooth_cols="age", smooth_knots={"agee": [1.0, 2.0]}).fit(
            X, batch=site, covariates=covariates
        )


def test_covbat_has_no_statistics_routes_and_says_why():
    from kwneuro_sk import CovBatHarmonizer

    routes = (
        "partial_fit",
        "row_statistics",
        "fit_from_statistics",
        "site_summary",
        "fit_from_summaries",
    )
    for method in routes:
        assert hasattr(CombatHarmonizer(), method)
        assert not hasattr(CovBatHarmonizer(), method)
        with pytest.raises(AttributeError, match=f"CovBatHarmonizer has no {method}: the PCA"):
            getattr(CovBatHarmonizer(), method)


def test_partial_fit_refusals():
    X, site, covariates = COHORT
    with pytest.raises(
        ValueError,
        match="partial_fit with smooth_cols needs the B-spline knots fixed in advance: "
        "smooth_knots=5 places them at quantiles",
    ):
        CombatHarmonizer(smooth_cols="age").partial_fit(X, batch=site, covariates=covariates)
    one_site = CombatHarmonizer().partial_fit(X[site == "a"], batch=site[site == "a"])
    with pytest.raises(ValueError, match="at least two sites"):
        one_site.transform(X, batch=site)
    combat = CombatHarmonizer().partial_fit(X[:20], batch=site[:20])
    with pytest.raises(ValueError, match="30 features"):
        combat.partial_fit(X[20:40, :5], batch=site[20:40])


def test_refused_chunk_leaves_the_statistics_as_they_were():
    """partial_fit adds rows in place: a chunk refused at validation (NaN, a missing
    covariate, a site label of another type, other features) changes nothing, and the
    next chunks give the fit of the accepted rows."""
    X, site, covariates = COHORT
    combat = CombatHarmonizer(**COVARIATES).partial_fit(
        X[:50], batch=site[:50], covariates=covariates.iloc[:50]
    )
    bad_x = X[50:60].copy()
    bad_x[3, 4] = np.nan
    bad_covariates = covariates.iloc[50:60].copy()
    bad_covariates.iloc[2, 0] = np.nan
    refusals = [
        (ValueError, "NaN or infinite values in feature column", bad_x, site[50:60], None),
        (ValueError, "covariate 'age' has missing values", X[50:60], site[50:60], bad_covariates),
        (TypeError, "one sortable type", X[50:60], np.arange(10), None),
        (ValueError, "30 features", X[50:60, :5], site[50:60], None),
    ]
    for error, message, chunk, sites, table in refusals:
        with pytest.raises(error, match=message):
            combat.partial_fit(
                chunk,
                batch=sites,
                covariates=covariates.iloc[50:60] if table is None else table,
            )
    partial_fit_chunks(combat, (slice(50, 110), slice(110, None)))
    assert_same_model(
        CombatHarmonizer(**COVARIATES).fit(X, batch=site, covariates=covariates), combat
    )


def test_interrupted_chunk_leaves_no_silently_wrong_statistics(monkeypatch):
    """partial_fit adds rows in place: a chunk stopped part-way through the update (a
    KeyboardInterrupt, a MemoryError) left the means and cross products moved and the counts
    not, and the model of the next calls was silently wrong. Such statistics are now refused
    by name; a chunk refused before the update still changes nothing."""
    from kwneuro_sk.combat import model

    X, site, covariates = COHORT
    # the rows of the second chunk have sites and levels of the first: updated in place
    combat = CombatHarmonizer(**COVARIATES).partial_fit(
        X[50:], batch=site[50:], covariates=covariates.iloc[50:]
    )
    blocks = model.feature_blocks

    def stopped(n_rows, n_features):
        yield next(iter(blocks(n_rows, n_features)))
        raise MemoryError("stopped part-way")

    monkeypatch.setattr(model, "feature_blocks", stopped)
    with pytest.raises(MemoryError, match="part-way"):
        combat.partial_fit(X[:50], batch=site[:50], covariates=covariates.iloc[:50])
    monkeypatch.setattr(model, "feature_blocks", blocks)
    with pytest.raises(ValueError, match="statistics are incomplete"):
        _ = combat.gamma_star_
    with pytest.raises(ValueError, match="statistics are incomplete"):
        combat.partial_fit(X[:50], batch=site[:50], covariates=covariates.iloc[:50])
    # fit starts anew
    whole = CombatHarmonizer(**COVARIATES).fit(X, batch=site, covariates=covariates)
    assert_same_model(whole, combat.fit(X, batch=site, covariates=covariates))


def test_partial_fit_row_by_row_and_float32():
    """One row per call (each site and level first seen alone, then every update by one row)
    and float32 chunks give fit's model."""
    X, site, covariates = COHORT
    params = {**COVARIATES, "parametric": False}
    combat = CombatHarmonizer(**params)
    for i in range(len(X)):
        combat.partial_fit(X[i : i + 1], batch=site[i : i + 1], covariates=covariates.iloc[[i]])
    assert_same_model(CombatHarmonizer(**params).fit(X, batch=site, covariates=covariates), combat)
    single = X.astype(np.float32)
    combat = partial_fit_chunks(
        CombatHarmonizer(**params), np.array_split(np.arange(len(X)), 7), X=single
    )
    whole = CombatHarmonizer(**params).fit(single, batch=site, covariates=covariates)
    assert_same_model(whole, combat)


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


def test_feature_explained_exactly_is_constant_on_both_routes():
    """A feature that site and a categorical level explain exactly: fit's residuals are
    rounding noise, so it is passed through; the statistics' residual sum of squares is
    ~eps times the within-site sum of squares, and must be read the same way (before, its
    tiny variance skewed the EB priors of every other feature: transforms 5-8% apart)."""
    X, site, covariates = COHORT
    X = X.copy()
    X[:, 1] = np.where(site == "a", 1.5, 2.5) + (covariates["sex"] == "M")
    params = {**COVARIATES}
    with pytest.warns(UserWarning, match="constant"):
        whole = CombatHarmonizer(**params).fit(X, batch=site, covariates=covariates)
    incremental = partial_fit_chunks(
        CombatHarmonizer(**params),
        np.array_split(np.random.default_rng(3).permutation(len(X)), 5),
        X=X,
    )
    with pytest.warns(UserWarning, match="constant"):
        _ = incremental.gamma_star_
    assert whole.zero_variance_features_.tolist() == [False, True] + [False] * 28
    np.testing.assert_array_equal(
        incremental.zero_variance_features_, whole.zero_variance_features_
    )
    assert_same_model(whole, incremental)


@pytest.mark.parametrize("scale", [1e200, 1e-200])
def test_statistics_routes_refuse_features_whose_squares_overflow(scale):
    """fit rescales each feature exactly; per-site statistics hold squares, which overflow
    beyond ~1e150 (NaN output before) or underflow below ~1e-150 (all features declared
    constant before): refused, naming the features, on partial_fit and summaries alike."""
    X, site, _ = COHORT
    extreme = X.copy()
    extreme[:, [3, 7]] *= scale
    combat = CombatHarmonizer()
    for rows in np.array_split(np.arange(len(X)), 3):
        combat.partial_fit(extreme[rows], batch=site[rows])
    with pytest.raises(ValueError, match=r"feature\(s\) \['x3', 'x7'\] have values beyond 1e150"):
        combat.transform(extreme, batch=site)
    with pytest.raises(ValueError, match="Multiply those features by a power of ten"):
        CombatHarmonizer().site_summary(extreme[site == "a"], batch=site[site == "a"])
    # 1e100 is within range, and fit handles 1e200 itself
    moderate = CombatHarmonizer()
    for rows in np.array_split(np.arange(len(X)), 3):
        moderate.partial_fit(X[rows] * 1e100, batch=site[rows])
    assert_same_model(CombatHarmonizer().fit(X * 1e100, batch=site), moderate)
    assert np.isfinite(CombatHarmonizer().fit_transform(extreme, batch=site)).all()


def test_partial_fit_under_dask_ml_incremental():
    """dask-ml's Incremental feeds a dask DataFrame's partitions to partial_fit (in order or
    shuffled): the model is fit's; its lazy transform equals ours. Site and covariates are
    columns (batch_col): Incremental passes the same keywords to every block, so batch= of
    the keyword route cannot be split with the rows."""
    dd = pytest.importorskip("dask.dataframe")
    wrappers = pytest.importorskip("dask_ml.wrappers")
    X, site, covariates = COHORT
    frame = pd.concat(
        [pd.DataFrame(X).add_prefix("f"), covariates, pd.Series(site, name="site")], axis=1
    )
    params = {**COVARIATES, "batch_col": "site"}
    whole = CombatHarmonizer(**params).set_output(transform="pandas").fit(frame)
    expected = whole.transform(frame)
    lazy = dd.from_pandas(frame, npartitions=5)

    def no_score(estimator, X, y=None):  # Incremental asks for a scorer; ComBat has none
        return 0.0

    for shuffle in (False, True):
        incremental = wrappers.Incremental(
            CombatHarmonizer(**params).set_output(transform="pandas"),
            scoring=no_score,
            shuffle_blocks=shuffle,
            random_state=0,
            transform_meta=pd.DataFrame(columns=expected.columns, dtype="float64"),
        ).fit(lazy)
        assert_same_model(whole, incremental.estimator_)
    out = incremental.transform(lazy).compute()
    np.testing.assert_allclose(out.to_numpy(), expected.to_numpy(), rtol=1e-12)
    assert list(out.columns) == list(expected.columns)


def test_partial_fit_pickles_and_clones_while_pending():
    import pickle

    from sklearn.base import clone

    X, site, _ = COHORT
    combat = CombatHarmonizer().partial_fit(X[:80], batch=site[:80])
    restored = pickle.loads(pickle.dumps(combat)).partial_fit(X[80:], batch=site[80:])
    assert_same_model(CombatHarmonizer().fit(X, batch=site), restored)
    assert not hasattr(clone(combat), "n_features_in_")


# ------------------------------------------------------------------------------------------
# federated: site summaries
# ------------------------------------------------------------------------------------------


def site_summaries(params, **kwargs):
    X, site, covariates = COHORT
    return [
        CombatHarmonizer(**params).site_summary(
            X[site == s], batch=site[site == s], covariates=covariates[site == s], **kwargs
        )
        for s in ("c", "a", "b")
    ]


def test_federated_equals_pooled(fitted, tmp_path):
    from kwneuro_sk import SiteSummary

    params, pooled = fitted
    paths = []
    for i, summary in enumerate(site_summaries(params)):
        paths.append(tmp_path / f"site{i}.npz")
        summary.save(paths[-1])
    combat = CombatHarmonizer(**params).fit_from_summaries([SiteSummary.load(p) for p in paths])
    assert_same_model(pooled, combat)
    assert_same_transform(pooled, CombatHarmonizer.from_estimates(combat.estimates_))


@pytest.mark.usefixtures("numpy_int_alias")
@pytest.mark.parametrize("option", ["parametric", "nonparametric", "ref batch", "mean only"])
def test_federated_equals_neurocombat(option):
    import contextlib
    import io

    from neuroCombat import neuroCombat

    X, site, covariates = COHORT
    params = {**COVARIATES, **OPTIONS[option]}
    combat = CombatHarmonizer(**params).fit_from_summaries(site_summaries(params))
    kwargs = {
        "categorical_cols": ["sex", "group"],
        "continuous_cols": ["age"],
        "eb": params.get("eb", True),
        "parametric": params.get("parametric", True),
        "mean_only": params.get("mean_only", False),
        "ref_batch": params.get("ref_batch"),
    }
    with contextlib.redirect_stdout(io.StringIO()):
        expected = neuroCombat(
            dat=X.T, covars=covariates.assign(site=site), batch_col="site", **kwargs
        )["data"].T
    got = combat.transform(X, batch=site, covariates=covariates)
    np.testing.assert_allclose(got, expected, rtol=1e-8)


def test_summary_size_does_not_depend_on_rows():
    X, site, covariates = COHORT
    small = CombatHarmonizer(**COVARIATES).site_summary(
        X[:40], batch=["s"] * 40, covariates=covariates[:40]
    )
    large = CombatHarmonizer(**COVARIATES).site_summary(
        X, batch=["s"] * len(X), covariates=covariates
    )
    q, g = len(large.statistics.columns), X.shape[1]
    assert large.n_values == 1 + q + q * q + g * (2 + q) + g
    assert small.n_values <= large.n_values  # fewer levels seen in the first rows


def test_summary_holds_no_row_value(tmp_path):
    X, site, covariates = COHORT
    rows = site == "a"
    summary = CombatHarmonizer(**COVARIATES).site_summary(
        X[rows], batch=site[rows], covariates=covariates[rows]
    )
    summary.save(tmp_path / "a.npz")
    with np.load(tmp_path / "a.npz", allow_pickle=False) as npz:
        stored = np.concatenate([npz[k].ravel() for k in npz.files if k != "__manifest__"])
    assert not np.isin(X[rows], stored).any()
    assert not np.isin(np.abs(X[rows]).max(axis=0), stored).any()
    magnitude = summary.statistics.moments.magnitude
    np.testing.assert_array_equal(np.frexp(magnitude)[0], 0.5)
    assert (magnitude <= np.abs(X[rows]).max(axis=0)).all()
    assert (2 * magnitude > np.abs(X[rows]).max(axis=0)).all()


def test_site_summary_refusals():
    X, site, covariates = COHORT
    combat = CombatHarmonizer(**COVARIATES)
    with pytest.raises(
        ValueError, match="site\\(s\\) \\['a'\\] have \\[9\\] rows, fewer than min_rows=10"
    ):
        combat.site_summary(X[:9], batch=["a"] * 9, covariates=covariates[:9])
    lonely = covariates[:20].assign(sex=["M"] + ["F"] * 19)
    with pytest.raises(
        ValueError, match="'sex' has level\\(s\\) \\['F', 'M'\\] held by a single row of site 'a'"
    ):
        combat.site_summary(X[:20], batch=["a"] * 20, covariates=lonely)
    assert not hasattr(combat, "n_features_in_")  # site_summary fits nothing
    with pytest.raises(ValueError, match="site_summary with smooth_cols needs the B-spline"):
        CombatHarmonizer(smooth_cols="age").site_summary(
            X[:20], batch=["a"] * 20, covariates=covariates[:20]
        )
    with pytest.raises(ValueError, match="min_rows must be a positive integer"):
        combat.site_summary(X[:20], batch=["a"] * 20, covariates=covariates[:20], min_rows=0)


def test_fit_from_summaries_refuses_other_options_and_features():
    X, site, covariates = COHORT
    summaries = site_summaries(COVARIATES)
    with pytest.raises(
        ValueError,
        match="made with categorical_cols=\\['sex', 'group'\\]; this harmonizer has "
        "categorical_cols=\\['sex'\\]",
    ):
        CombatHarmonizer(categorical_cols="sex", continuous_cols="age").fit_from_summaries(
            summaries
        )
    other = CombatHarmonizer(**COVARIATES).site_summary(
        X[site == "a", :10], batch=site[site == "a"], covariates=covariates[site == "a"]
    )
    with pytest.raises(
        ValueError,
        match="summary 2 \\(site\\(s\\) \\['a'\\]\\) has other features than summary 0: "
        "n_features_in",
    ):
        CombatHarmonizer(**COVARIATES).fit_from_summaries(summaries[:2] + [other])
    with pytest.raises(TypeError, match="list of SiteSummary"):
        CombatHarmonizer().fit_from_summaries([X])


def _tamper(path, out, **changes):
    import json

    with np.load(path, allow_pickle=False) as npz:
        members = {k: npz[k] for k in npz.files}
    manifest = json.loads(str(members["__manifest__"]))
    for key, value in changes.items():
        if key in manifest:
            manifest[key] = value
        else:
            members[key] = value
    members["__manifest__"] = np.array(json.dumps(manifest))
    np.savez(out, **members)
    return out


SMOOTH = {
    "categorical_cols": ["sex", "group"],
    "smooth_cols": "age",
    "smooth_knots": {"age": [20.0, 40.0, 60.0, 80.0]},
}


def test_federated_smooth_cols_with_fixed_knots_equals_pooled(tmp_path):
    from kwneuro_sk import SiteSummary

    X, site, covariates = COHORT
    pooled = CombatHarmonizer(**SMOOTH).fit(X, batch=site, covariates=covariates)
    paths = []
    for i, summary in enumerate(site_summaries(SMOOTH)):
        assert summary.covariates["smooth_cols"] == ["age"]
        paths.append(tmp_path / f"site{i}.npz")
        summary.save(paths[-1])
    loaded = [SiteSummary.load(p) for p in paths]
    assert loaded[0].statistics.smooth == {
        "age": {"knots": [20.0, 40.0, 60.0, 80.0], "degree": 3, "extrapolation": "linear"}
    }
    combat = CombatHarmonizer(**SMOOTH).fit_from_summaries(loaded)
    assert_same_model(pooled, combat)
    # the coordinator may give the number of knots: the sites' knots are used
    by_count = CombatHarmonizer(**{**SMOOTH, "smooth_knots": 4}).fit_from_summaries(loaded)
    assert_same_model(pooled, by_count)
    with pytest.raises(ValueError, match="'age' were made with knots=.*5 knots"):
        CombatHarmonizer(**{**SMOOTH, "smooth_knots": 5}).fit_from_summaries(loaded)
    with pytest.raises(ValueError, match="smooth_cols=\\['age'\\]; this harmonizer has"):
        CombatHarmonizer(categorical_cols=["sex", "group"]).fit_from_summaries(loaded)
    other_knots = site_summaries({**SMOOTH, "smooth_knots": [20.0, 50.0, 65.0, 80.0]})[0]
    with pytest.raises(ValueError, match="different B-spline settings for smooth covariate 'age'"):
        CombatHarmonizer(**SMOOTH).fit_from_summaries(loaded[1:] + [other_knots])
    # hostile spline settings and columns are refused at load
    cases = {
        "knots": (
            {"smooth": {"age": {"knots": [20, 10], "degree": 3, "extrapolation": "linear"}}},
            "'smooth' of 'age' must hold increasing finite knots",
        ),
        "missing": ({"smooth": {}}, "'smooth' does not hold the spline settings"),
        "width": (
            {"smooth": {"age": {"knots": [20, 40, 80], "degree": 3, "extrapolation": "linear"}}},
            "does not hold the 4 spline columns of 'age'",
        ),
    }
    for name, (changes, message) in cases.items():
        bad = _tamper(paths[0], tmp_path / f"{name}.npz", **changes)
        with pytest.raises(ValueError, match=message):
            SiteSummary.load(bad)


def test_load_refuses_hostile_files(tmp_path):
    import pickle

    from kwneuro_sk import SiteSummary

    path = tmp_path / "good.npz"
    summary = site_summaries(COVARIATES)[0]
    summary.save(path)
    moments = summary.statistics.moments
    n_sites, n_cols, n_features = moments.czx.shape
    cases = {
        "version": ({"version": 2}, "format version 2"),
        "format": ({"format": "other"}, "format 'other'"),
        "n below min_rows": ({"n": np.array([5.0])}, "at least min_rows=10"),
        "fractional n": ({"n": moments.n + 0.5}, "not whole numbers"),
        "negative cxx": ({"cxx": -moments.cxx}, "negative values"),
        "nan": ({"xbar": moments.xbar * np.nan}, "xbar has NaN"),
        "dtype": ({"xbar": moments.xbar.astype(np.float32)}, "xbar has dtype float32"),
        "shape": ({"czx": moments.czx[:, :, :-1]}, "czx has shape"),
        "asymmetric": (
            {"czz": moments.czz + np.triu(np.ones((n_cols, n_cols)), 1)},
            "not symmetric",
        ),
        "magnitude": ({"magnitude": moments.magnitude * 1.5}, "not powers of two"),
        "share": ({"zbar": moments.zbar + 2.0}, "level shares outside"),
        "column": ({"columns": [["level", "diagnosis", "x"]]}, "not a level of categorical_cols"),
        "features": ({"features": {"n_features_in": 3}}, "'features' must hold"),
        "version true": ({"version": True}, "format version True"),
        "n beyond 2**53": ({"n": np.array([1e300])}, r"below 2\*\*53"),
        "level a list": (
            {"columns": [["level", "sex", ["F"]], *summary.statistics.columns[1:]]},
            r"\['level', 'sex', \['F'\]\] is not a level of categorical_cols \(a level is text",
        ),
        "level an object": (
            {"columns": [["level", "sex", {"F": 1}], *summary.statistics.columns[1:]]},
            "is not a level of categorical_cols",
        ),
        "site a list": ({"sites": [["a"]]}, "'sites' holds other than distinct text or numbers"),
        "names_in text": (
            {"features": {**summary.features, "feature_names_in": "roi"}},
            f"feature_names_in is not a list of {summary.features['n_features_in']} names",
        ),
        "names_in short": (
            {"features": {**summary.features, "feature_names_in": ["a"]}},
            "feature_names_in is not a list of",
        ),
        "feature names numbers": (
            {"features": {**summary.features, "feature_names": list(range(n_features))}},
            f"feature_names is not a list of {n_features} names as text",
        ),
    }
    for name, (changes, message) in cases.items():
        bad = _tamper(path, tmp_path / f"{name}.npz", **changes)
        with pytest.raises(ValueError, match=message):
            SiteSummary.load(bad)
    pickled = tmp_path / "pickled.npz"
    pickled.write_bytes(pickle.dumps(summary))
    with pytest.raises(ValueError, match="not an .npz archive"):
        SiteSummary.load(pickled)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated or corrupt|cannot be read"):
        SiteSummary.load(truncated)
    with pytest.raises(FileNotFoundError, match="not found"):
        SiteSummary.load(tmp_path / "missing.npz")
    # the other file kind of the protocol, each way round, says what it is and what reads it
    model = tmp_path / "model.npz"
    CombatHarmonizer(**COVARIATES).fit_from_summaries(site_summaries(COVARIATES)).estimates_.save(
        model
    )
    with pytest.raises(ValueError, match=r"it is a fitted model, .*CombatEstimates.load"):
        SiteSummary.load(model)
    with pytest.raises(ValueError, match=r"it is one site's summary, .*fit_from_summaries"):
        CombatEstimates.load(path)
    loaded = SiteSummary.load(path)
    assert loaded.sites == summary.sites and loaded.statistics.columns == summary.statistics.columns


# ------------------------------------------------------------------------------------------
# command line: summarize at each site, combine at the coordinator, apply at each site
# ------------------------------------------------------------------------------------------


def test_cli_summarize_combine_apply_equals_pooled(tmp_path, capsys):
    from kwneuro_sk.cli import main

    X, site, covariates = COHORT
    table = pd.DataFrame(X, columns=[f"roi{j}" for j in range(X.shape[1])])
    table = pd.concat([covariates.assign(site=site, subject=np.arange(len(X))), table], axis=1)
    options = ["--batch-col", "site", "--categorical", "sex", "group", "--continuous", "age"]
    summaries = []
    for s in ("a", "b", "c"):
        table[table.site == s].to_csv(tmp_path / f"{s}.csv", index=False)
        summaries.append(str(tmp_path / f"{s}.npz"))
        code = main(
            ["summarize", str(tmp_path / f"{s}.csv"), *options, "--keep", "subject", "-o"]
            + [summaries[-1]]
        )
        assert code == 0
    model = str(tmp_path / "model.npz")
    assert main(["combine", *summaries, "--non-parametric", "-o", model]) == 0
    assert main(["apply", model, str(tmp_path / "b.csv"), "-o", str(tmp_path / "b_h.csv")]) == 0
    pooled = CombatHarmonizer(**COVARIATES, parametric=False).fit(
        X, batch=site, covariates=covariates
    )
    got = pd.read_csv(tmp_path / "b_h.csv")
    rows = site == "b"
    expected = pooled.transform(X[rows], batch=site[rows], covariates=covariates[rows])
    np.testing.assert_allclose(got[[f"roi{j}" for j in range(X.shape[1])]], expected, rtol=1e-10)
    np.testing.assert_array_equal(got["subject"], np.flatnonzero(rows))
    # --ref-batch names a site of the summaries (the CLI's text matched to the site label)
    ref_model = str(tmp_path / "ref_model.npz")
    assert main(["combine", *summaries, "--ref-batch", "b", "-o", ref_model]) == 0
    pooled_ref = CombatHarmonizer(**COVARIATES, ref_batch="b").fit(
        X, batch=site, covariates=covariates
    )
    combined = CombatHarmonizer.from_estimates(CombatEstimates.load(ref_model))
    assert combined.ref_batch == "b"
    assert_same_model(pooled_ref, combined)
    capsys.readouterr()
    refused = str(tmp_path / "refused.npz")
    assert main(["combine", *summaries, "--ref-batch", "z", "-o", refused]) == 1
    assert "--ref-batch 'z' is not among the sites ['a', 'b', 'c']" in capsys.readouterr().err
    assert not (tmp_path / "refused.npz").exists()
    assert (
        main(
            [
                "summarize",
                str(tmp_path / "a.csv"),
                *options,
                "--keep",
                "subject",
                "--min-rows",
                "100",
                "-o",
                str(tmp_path / "x.npz"),
            ]
        )
        == 1
    )
    assert "min_rows=100" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


def test_cli_summarize_combine_apply_with_smooth_covariate(tmp_path, capsys):
    """--smooth with knot positions at every site: combine and apply equal the pooled fit on
    the same knots; missing or malformed knots are refused before anything is written."""
    from kwneuro_sk.cli import main

    X, site, covariates = COHORT
    table = pd.DataFrame(X, columns=[f"roi{j}" for j in range(X.shape[1])])
    table = pd.concat([covariates.assign(site=site), table], axis=1)
    options = ["--batch-col", "site", "--categorical", "sex", "group", "--smooth", "age"]
    knots = [20.0, 40.0, 60.0, 80.0]
    summaries = []
    for s in ("a", "b", "c"):
        table[table.site == s].to_csv(tmp_path / f"{s}.csv", index=False)
        summaries.append(str(tmp_path / f"{s}.npz"))
        spec = "age=" + ",".join(map(str, knots))
        code = main(
            ["summarize", str(tmp_path / f"{s}.csv"), *options, "--smooth-knots", spec, "-o"]
            + [summaries[-1]]
        )
        assert code == 0
    model = str(tmp_path / "model.npz")
    assert main(["combine", *summaries, "-o", model]) == 0
    assert main(["apply", model, str(tmp_path / "c.csv"), "-o", str(tmp_path / "c_h.csv")]) == 0
    pooled = CombatHarmonizer(
        categorical_cols=["sex", "group"], smooth_cols="age", smooth_knots=knots
    ).fit(X, batch=site, covariates=covariates)
    rows = site == "c"
    expected = pooled.transform(X[rows], batch=site[rows], covariates=covariates[rows])
    got = pd.read_csv(tmp_path / "c_h.csv")[[f"roi{j}" for j in range(X.shape[1])]]
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    capsys.readouterr()
    for knots_option, message in (
        ([], r"--smooth-knots COL=K1,K2,\.\.\. is needed for \['age'\]"),
        (["--smooth-knots", "age=20,x"], "the knots of 'age' must be numbers"),
        (["--smooth-knots", "sex=1,2"], "with COL one of --smooth"),
        (["--smooth-knots", "age=20,80", "--smooth-degree", "0"], "--smooth-degree must be 1"),
    ):
        out = tmp_path / "refused.npz"
        code = main(["summarize", str(tmp_path / "a.csv"), *options, *knots_option, "-o", str(out)])
        assert code == 1
        assert re.search(message, capsys.readouterr().err)
        assert not out.exists()


def test_fit_from_statistics_default_columns_with_batch_col():
    """With batch_col, X holds the site and covariate columns beside the features: the
    default n_features_in counts them, so the model transforms the table it came from (before,
    it expected the features alone and refused every table)."""
    X, site, covariates = COHORT
    frame = pd.concat(
        [pd.DataFrame(X).add_prefix("f"), covariates, pd.Series(site, name="site")], axis=1
    )
    params = {**COVARIATES, "batch_col": "site"}
    stats = CombatHarmonizer(**params).row_statistics(frame)
    fitted = CombatHarmonizer(**params).fit_from_statistics(stats)
    assert fitted.n_features_in_ == X.shape[1] + 4
    whole = CombatHarmonizer(**params).fit(frame)
    np.testing.assert_allclose(
        fitted.transform(frame), whole.transform(frame), rtol=1e-10, atol=1e-10 * np.abs(X).max()
    )


def test_refused_first_chunk_leaves_the_estimator_as_it_was():
    """validate_data set n_features_in_ before the rows of a first chunk were checked: a
    refused first chunk left transform raising AttributeError instead of NotFittedError,
    and the next chunk warned that the estimator 'was fitted with fit()'. After fit, a
    refused chunk discarded nothing of the fitted model either."""
    X, site, covariates = COHORT
    bad = X[:50].copy()
    bad[0, 0] = np.nan
    combat = CombatHarmonizer()
    with pytest.raises(ValueError, match="NaN or infinite values"):
        combat.partial_fit(bad, batch=site[:50])
    assert vars(combat) == vars(CombatHarmonizer())
    with pytest.raises(NotFittedError):
        combat.transform(X, batch=site)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        combat.partial_fit(X, batch=site)
    assert_same_model(CombatHarmonizer().fit(X, batch=site), combat)
    fitted = CombatHarmonizer().fit(X, batch=site)
    expected = fitted.transform(X, batch=site)
    with pytest.raises(ValueError, match="NaN or infinite values"):
        fitted.partial_fit(bad, batch=site[:50])
    np.testing.assert_array_equal(fitted.transform(X, batch=site), expected)


def test_partial_fit_refuses_a_chunk_under_other_options():
    """set_params between chunks merged chunks read under other options silently (sites and
    covariates swapped: batches_ ['A', 'B', 'C', 's1'], the covariate dropped). A chunk
    whose statistics options differ from the first chunk's is refused, naming them; the
    statistics stay those of the earlier chunks."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(60, 3)), columns=list("abc"))
    frame["site"] = np.repeat(["s1", "s2"], 30)
    frame["scanner"] = np.tile(["A", "B", "C"], 20)
    frame["age"] = rng.uniform(20, 80, 60)
    params = {"batch_col": "site", "categorical_cols": ["scanner"]}
    changes = [
        (
            {"batch_col": "scanner", "categorical_cols": ["site"]},
            "made with batch_col='site', categorical_cols=['scanner']; this harmonizer has "
            "batch_col='scanner', categorical_cols=['site'] (set_params between chunks)",
        ),
        ({"categorical_cols": None}, "categorical_cols=['scanner']; this harmonizer has "),
        ({"continuous_cols": "age"}, "made with continuous_cols=[]; this harmonizer has "),
        (
            {"smooth_cols": "age", "smooth_knots": [20.0, 50.0, 80.0]},
            "made with smooth_cols=[], smooth_knots={}, smooth_degree=None, "
            "smooth_extrapolation=None; this harmonizer has smooth_cols=['age']",
        ),
    ]
    for change, message in changes:
        combat = CombatHarmonizer(**params).partial_fit(frame.iloc[:30])
        combat.set_params(**change)
        with pytest.raises(ValueError, match=re.escape(message) + ".*Call fit on all the rows"):
            combat.partial_fit(frame.iloc[30:])
        combat.set_params(**{**params, "continuous_cols": None, "smooth_cols": None})
        combat.partial_fit(frame.iloc[30:])  # the options of the first chunk again
        assert_same_model(CombatHarmonizer(**params).fit(frame), combat)
    # options that do not decide the statistics may change
    combat = CombatHarmonizer(**params).partial_fit(frame.iloc[:30])
    combat.set_params(eb=False).partial_fit(frame.iloc[30:])
    assert_same_model(CombatHarmonizer(**params, eb=False).fit(frame), combat)


def test_categorical_levels_of_mixed_types_named_on_every_route():
    """Levels coded 1/2 in one chunk or site and "1"/"2" in another: fit named the
    covariate, but partial_fit (at first use) and fit_from_summaries raised a bare
    TypeError "'<' not supported between instances of 'str' and 'int'". Every route now
    names the covariate and its levels, and partial_fit refuses the chunk itself."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(60, 3)), columns=list("abc"))
    frame["site"] = np.repeat(["s1", "s2", "s3"], 20)
    frame["scanner"] = np.tile([1, 2], 30)
    as_text = frame.assign(scanner=np.tile(["1", "2"], 30))
    mixed = pd.concat([frame.iloc[:30], as_text.iloc[30:]])
    params = {"batch_col": "site", "categorical_cols": ["scanner"]}
    message = re.escape(
        "levels of categorical covariate 'scanner' must be of one sortable type (all strings "
        "or all numbers); got [1, 2, '1', '2']"
    )
    with pytest.raises(TypeError, match=message):
        CombatHarmonizer(**params).fit(mixed)
    with pytest.raises(TypeError, match=message):
        CombatHarmonizer(**params).partial_fit(mixed)
    combat = CombatHarmonizer(**params).partial_fit(frame.iloc[:30])
    with pytest.raises(TypeError, match=message):
        combat.partial_fit(as_text.iloc[30:])
    combat.partial_fit(frame.iloc[30:])  # the refused chunk added nothing
    assert_same_model(CombatHarmonizer(**params).fit(frame), combat)
    summaries = [
        CombatHarmonizer(**params).site_summary(part[part.site == site])
        for part, site in [(frame, "s1"), (as_text, "s2"), (as_text, "s3")]
    ]
    with pytest.raises(TypeError, match=message):
        CombatHarmonizer(**params).fit_from_summaries(summaries)


def test_empty_chunk_adds_nothing():
    """partial_fit of a chunk with no rows (an empty dask partition under dask-ml's
    Incremental) failed with "Found array with 0 sample(s)". It is checked (columns, number
    of features) and adds nothing; transform of no rows gives no rows."""
    X, site, covariates = COHORT
    frame = pd.concat(
        [pd.DataFrame(X).add_prefix("f"), covariates, pd.Series(site, name="site")], axis=1
    )
    params = {**COVARIATES, "batch_col": "site"}
    combat = CombatHarmonizer(**params)
    combat.partial_fit(frame.iloc[:0])  # a first chunk of no rows: still unfitted
    assert vars(combat) == vars(CombatHarmonizer(**params))
    combat.partial_fit(frame.iloc[:70]).partial_fit(frame.iloc[70:70])
    combat.partial_fit(frame.iloc[70:])
    whole = CombatHarmonizer(**params).fit(frame)
    assert_same_model(whole, combat)
    with pytest.raises(ValueError, match="f29"):
        combat.partial_fit(frame.iloc[:0].drop(columns="f29"))
    empty = whole.set_output(transform="pandas").transform(frame.iloc[:0])
    assert empty.shape == (0, 30) and list(empty.columns) == [f"f{j}" for j in range(30)]
    keyword = CombatHarmonizer().partial_fit(X[:0], batch=site[:0])
    assert not hasattr(keyword, "n_features_in_")
    keyword.partial_fit(X, batch=site)
    with pytest.raises(ValueError, match="30 features"):
        keyword.partial_fit(X[:0, :5], batch=site[:0])
    out = keyword.transform(X[:0].astype(np.float32), batch=site[:0])
    assert out.shape == (0, 30) and out.dtype == np.float32
    with pytest.raises(ValueError, match="0 sample"):
        CombatHarmonizer().fit(X[:0], batch=site[:0])
