"""CombatHarmonizer: parity with neuroCombat, fit/apply semantics, invariants, bad input."""

import contextlib
import io
import pickle
import re

import numpy as np
import pandas as pd
import pytest
from neuroCombat import neuroCombat
from sklearn.exceptions import NotFittedError

from kwneuro_sk import CombatHarmonizer

# neuroCombat's ref_batch path calls np.int, removed in NumPy 1.24 (see conftest.py).
pytestmark = pytest.mark.usefixtures("numpy_int_alias")

COVARIATE_SETS = {
    "none": ([], []),
    "categorical": (["sex"], []),
    "continuous": ([], ["age"]),
    "both": (["sex", "diagnosis"], ["age"]),
}


def make_cohort(n, sizes, n_features, seed):
    """Unbalanced sites with additive and multiplicative site effects and covariate effects."""
    rng = np.random.default_rng(seed)
    sites = np.repeat([f"site{k}" for k in range(len(sizes))], sizes)
    rng.shuffle(sites)
    n = len(sites)
    # neuroCombat casts continuous covariates to float32: use float32-representable ages.
    age = rng.uniform(20, 80, n).astype(np.float32).astype(float)
    sex = rng.choice(["F", "M"], n)
    diagnosis = rng.choice(["control", "patient", "prodromal"], n)
    site_code = pd.factorize(sites, sort=True)[0]
    shift = rng.normal(0, 1.0, size=(len(sizes), n_features))
    scale = rng.uniform(0.5, 2.0, size=(len(sizes), n_features))
    X = (
        5.0
        + 0.03 * age[:, None]
        + 0.4 * (sex == "M")[:, None]
        + 0.3 * (diagnosis == "patient")[:, None]
        + rng.normal(size=(n, n_features)) * scale[site_code]
        + shift[site_code]
    )
    covars = pd.DataFrame({"site": sites, "age": age, "sex": sex, "diagnosis": diagnosis})
    return X, covars


COHORTS = {
    "3 sites": make_cohort(None, [45, 25, 12], 30, seed=1),
    "5 sites": make_cohort(None, [30, 8, 20, 15, 40], 25, seed=2),
}


def run_neurocombat(X, covars, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return neuroCombat(dat=X.T, covars=covars, batch_col="site", **kwargs)


def relative_difference(a, b):
    return np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12))


def combat_frame(X, covars, columns=("site", "age", "sex")):
    """Features roi0, roi1, ... next to the site and covariate columns (others would be
    features too)."""
    frame = pd.DataFrame(X, columns=[f"roi{j}" for j in range(X.shape[1])])
    return pd.concat([frame, covars[list(columns)]], axis=1)


# ------------------------------------------------------------------------------------------
# parity with neuroCombat 0.2.12
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cohort", COHORTS)
@pytest.mark.parametrize("covariates", COVARIATE_SETS)
@pytest.mark.parametrize("ref_batch", [None, "site1"])
@pytest.mark.parametrize("mean_only", [False, True])
@pytest.mark.parametrize("parametric", [True, False])
@pytest.mark.parametrize("eb", [True, False])
def test_matches_neurocombat(cohort, covariates, ref_batch, mean_only, parametric, eb):
    X, covars = COHORTS[cohort]
    categorical, continuous = COVARIATE_SETS[covariates]
    options = dict(eb=eb, parametric=parametric, mean_only=mean_only, ref_batch=ref_batch)
    expected = run_neurocombat(
        X, covars, categorical_cols=categorical, continuous_cols=continuous, **options
    )

    combat = CombatHarmonizer(categorical_cols=categorical, continuous_cols=continuous, **options)
    ours = combat.fit_transform(X, batch=covars["site"], covariates=covars)

    assert relative_difference(ours, expected["data"].T) < 1e-8
    est = expected["estimates"]
    assert relative_difference(combat.var_pooled_, est["var.pooled"].ravel()) < 1e-8
    assert relative_difference(combat.gamma_star_, np.asarray(est["gamma.star"])) < 1e-8
    assert relative_difference(combat.delta_star_, np.asarray(est["delta.star"])) < 1e-8
    if eb and not mean_only:
        # The reference site's priors are discarded (its delta_hat is n/(n-1) everywhere).
        keep = combat.batches_ != ref_batch
        np.testing.assert_allclose(combat.a_prior_[keep], np.array(est["a_prior"])[keep], rtol=1e-9)
        np.testing.assert_allclose(combat.b_prior_[keep], np.array(est["b_prior"])[keep], rtol=1e-9)
    if ref_batch is not None:
        reference = (covars["site"] == ref_batch).to_numpy()
        np.testing.assert_array_equal(ours[reference], X[reference])


@pytest.mark.parametrize("covariates", COVARIATE_SETS)
def test_column_and_keyword_routes_give_identical_numbers(covariates):
    X, covars = COHORTS["5 sites"]
    categorical, continuous = COVARIATE_SETS[covariates]
    by_keyword = CombatHarmonizer(categorical_cols=categorical, continuous_cols=continuous)
    by_column = CombatHarmonizer("site", categorical, continuous)
    frame = combat_frame(X, covars, ["site", *categorical, *continuous])
    a = by_keyword.fit_transform(X, batch=covars["site"].to_numpy(), covariates=covars)
    b = by_column.fit_transform(frame)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(by_column.transform(frame), b)
    assert by_column.n_features_in_ == X.shape[1] + 1 + len(categorical + continuous)
    assert list(by_column.feature_names_in_) == list(frame.columns)
    assert list(by_column.get_feature_names_out()) == [f"roi{j}" for j in range(X.shape[1])]
    assert list(by_keyword.get_feature_names_out()) == [f"x{j}" for j in range(X.shape[1])]


# ------------------------------------------------------------------------------------------
# fit on training rows, apply to new rows
# ------------------------------------------------------------------------------------------


def hand_combat(X_train, cov_train, X_test, cov_test, gamma_star, delta_star, batches):
    """The ComBat equations with the test rows' own covariates, from scratch."""

    def design(cov):
        onehot = (cov["site"].to_numpy()[:, None] == batches[None, :]).astype(float)
        return np.column_stack([onehot, (cov["sex"] == "M"), cov["age"]]).astype(float)

    D = design(cov_train)
    coef = np.linalg.lstsq(D, X_train, rcond=None)[0]
    counts = D[:, : len(batches)].sum(axis=0)
    alpha = counts / counts.sum() @ coef[: len(batches)]
    sigma = np.sqrt(np.mean((X_train - D @ coef) ** 2, axis=0))
    D_test = design(cov_test)
    b = D_test[:, : len(batches)].argmax(axis=1)
    location = alpha + D_test[:, len(batches) :] @ coef[len(batches) :]
    s = (X_test - location) / sigma
    return (s - gamma_star[b]) / np.sqrt(delta_star[b]) * sigma + location


def test_new_rows_use_their_own_covariates():
    X, covars = COHORTS["3 sites"]
    train = np.arange(len(X)) % 4 != 0
    frame = combat_frame(X, covars)
    combat = CombatHarmonizer("site", ["sex"], ["age"]).fit(frame[train])

    expected = run_neurocombat(
        X[train],
        covars[train].reset_index(drop=True),
        categorical_cols=["sex"],
        continuous_cols=["age"],
    )
    gamma_star = np.asarray(expected["estimates"]["gamma.star"])
    delta_star = np.asarray(expected["estimates"]["delta.star"])
    hand = hand_combat(
        X[train], covars[train], X[~train], covars[~train], gamma_star, delta_star, combat.batches_
    )
    assert relative_difference(combat.transform(frame[~train]), hand) < 1e-8


def test_one_new_row_alone_equals_the_same_row_in_a_batch():
    X, covars = COHORTS["5 sites"]
    frame = combat_frame(X, covars, ["site", "age", "sex", "diagnosis"])
    combat = CombatHarmonizer("site", ["sex", "diagnosis"], ["age"]).fit(frame.iloc[:100])
    together = combat.transform(frame.iloc[100:])
    alone = np.vstack([combat.transform(frame.iloc[[i]]) for i in range(100, len(frame))])
    np.testing.assert_allclose(alone, together, rtol=1e-12)


@pytest.mark.parametrize("ref_batch", [None, "site2"])
@pytest.mark.parametrize("mean_only", [False, True])
def test_inverse_transform_round_trip(ref_batch, mean_only):
    X, covars = COHORTS["3 sites"]
    frame = combat_frame(X, covars)
    combat = CombatHarmonizer("site", ["sex"], ["age"], mean_only=mean_only, ref_batch=ref_batch)
    harmonized = combat.fit_transform(frame)
    back = combat.inverse_transform(harmonized, batch=covars["site"], covariates=covars)
    np.testing.assert_allclose(back, X, rtol=1e-10, atol=1e-10)
    # With the site and covariate columns in the frame, no keywords are needed.
    with_columns = pd.concat(
        [
            pd.DataFrame(harmonized, columns=combat.get_feature_names_out()),
            covars[["site", "age", "sex"]],
        ],
        axis=1,
    )
    np.testing.assert_allclose(combat.inverse_transform(with_columns), X, rtol=1e-10)


def test_float32_in_float32_out_accurately():
    X, covars = COHORTS["3 sites"]
    X32 = X.astype(np.float32)
    combat = CombatHarmonizer(continuous_cols="age")
    out32 = combat.fit_transform(X32, batch=covars["site"], covariates=covars)
    out64 = CombatHarmonizer(continuous_cols="age").fit_transform(
        X32.astype(np.float64), batch=covars["site"], covariates=covars
    )
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, out64, rtol=2e-6)
    assert combat.gamma_star_.dtype == np.float64


# ------------------------------------------------------------------------------------------
# invariants
# ------------------------------------------------------------------------------------------


def test_permuting_rows_permutes_the_output():
    X, covars = COHORTS["5 sites"]
    order = np.random.default_rng(0).permutation(len(X))
    kwargs = dict(categorical_cols=["sex"], continuous_cols=["age"], parametric=False)
    out = CombatHarmonizer(**kwargs).fit_transform(X, batch=covars["site"], covariates=covars)
    permuted = CombatHarmonizer(**kwargs).fit_transform(
        X[order], batch=covars["site"].to_numpy()[order], covariates=covars.iloc[order]
    )
    np.testing.assert_allclose(permuted, out[order], rtol=1e-10)


def site_means_after_covariates(values, covars, combat):
    """Per-site means of what is left after the fitted covariate effects."""
    Z = np.column_stack([covars["sex"] == "M", covars["age"]]).astype(float)
    residual = values - Z @ combat.beta_
    return pd.DataFrame(residual).groupby(covars["site"].to_numpy()).mean().to_numpy()


def test_site_means_agree_after_removing_covariate_effects():
    X, covars = COHORTS["5 sites"]
    combat = CombatHarmonizer(categorical_cols="sex", continuous_cols="age", eb=False)
    out = combat.fit_transform(X, batch=covars["site"], covariates=covars)
    after = site_means_after_covariates(out, covars, combat)
    # Without EB every site's adjusted mean is exactly the grand mean.
    np.testing.assert_allclose(after, np.tile(combat.grand_mean_, (5, 1)), rtol=1e-10)

    eb = CombatHarmonizer(categorical_cols="sex", continuous_cols="age")
    out_eb = eb.fit_transform(X, batch=covars["site"], covariates=covars)
    before = site_means_after_covariates(X, covars, eb)
    spread_before = np.ptp(before, axis=0)
    spread_after = np.ptp(site_means_after_covariates(out_eb, covars, eb), axis=0)
    assert np.all(spread_after < 0.2 * spread_before)


def test_covariate_effects_are_preserved():
    X, covars = COHORTS["3 sites"]
    combat = CombatHarmonizer(categorical_cols=["sex", "diagnosis"], continuous_cols="age")
    combat.fit(X, batch=covars["site"], covariates=covars)
    assert list(combat.covariate_names_) == [
        "sex_M",
        "diagnosis_patient",
        "diagnosis_prodromal",
        "age",
    ]
    # beta_ is the least-squares fit of X on site indicators and covariates (Johnson 2007).
    design = np.column_stack(
        [
            pd.get_dummies(covars["site"]).to_numpy(dtype=float),
            covars["sex"] == "M",
            covars["diagnosis"] == "patient",
            covars["diagnosis"] == "prodromal",
            covars["age"],
        ]
    ).astype(float)
    coefficients = np.linalg.lstsq(design, X, rcond=None)[0]
    np.testing.assert_allclose(combat.beta_, coefficients[3:], rtol=1e-10, atol=1e-12)
    # Simulated effects: sex_M +0.4, patient +0.3, prodromal 0, age +0.03 per year. The
    # tolerances are about 3 standard errors of the mean over the 30 features (noise sd ~1.25,
    # 82 subjects): the age slope is checked to 15 % of its size.
    truth = np.array([0.4, 0.3, 0.0, 0.03])
    tolerance = np.array([0.15, 0.18, 0.19, 0.0045])
    assert np.all(np.abs(combat.beta_.mean(axis=1) - truth) < tolerance)
    # and the harmonized data still carry them
    harmonized = combat.transform(X, batch=covars["site"], covariates=covars)
    kept = np.linalg.lstsq(design, harmonized, rcond=None)[0][3:].mean(axis=1)
    assert np.all(np.abs(kept - truth) < tolerance)


@pytest.mark.parametrize("eb", [True, False])
def test_reference_rows_unchanged_in_fit_and_transform(eb):
    X, covars = COHORTS["5 sites"]
    frame = combat_frame(X, covars)
    combat = CombatHarmonizer("site", ["sex"], ["age"], ref_batch="site3", eb=eb)
    out = combat.fit_transform(frame)
    reference = (covars["site"] == "site3").to_numpy()
    np.testing.assert_array_equal(out[reference], X[reference])
    np.testing.assert_array_equal(combat.transform(frame[reference]), X[reference])
    assert not np.allclose(out[~reference], X[~reference])
    np.testing.assert_array_equal(combat.gamma_star_[3], 0.0)
    np.testing.assert_array_equal(combat.delta_star_[3], 1.0)


@pytest.mark.parametrize("labels", ["str", "int", "categorical", "object"])
def test_site_label_types_give_the_same_numbers(labels):
    X, covars = COHORTS["3 sites"]
    codes = pd.factorize(covars["site"], sort=True)[0]
    sites = {
        "str": covars["site"].astype("str"),
        "int": pd.Series(codes * 10 + 3),
        "categorical": covars["site"].astype("category"),
        "object": covars["site"].astype(object),
    }[labels]
    expected = CombatHarmonizer().fit_transform(X, batch=covars["site"].to_numpy())
    combat = CombatHarmonizer()
    np.testing.assert_array_equal(combat.fit_transform(X, batch=sites), expected)
    assert len(combat.batches_) == 3
    assert list(combat.n_samples_per_batch_) == [45, 25, 12]


def test_constant_features_pass_through_and_within_site_constants_stay_finite():
    X, covars = COHORTS["3 sites"]
    X = X.copy()
    X[:, 0] = 7.25  # constant everywhere
    X[covars["site"] == "site1", 1] = 3.0  # constant within one site
    for options in [dict(), dict(parametric=False), dict(eb=False), dict(mean_only=True)]:
        combat = CombatHarmonizer(continuous_cols="age", **options)
        out = combat.fit_transform(X, batch=covars["site"], covariates=covars)
        assert np.isfinite(out).all(), options
        np.testing.assert_array_equal(out[:, 0], 7.25)
        assert combat.zero_variance_features_.tolist() == [True] + [False] * 29
        assert combat.var_pooled_[0] == 0.0
        assert np.all(combat.gamma_star_[:, 0] == 0) and np.all(combat.delta_star_[:, 0] == 1)
    # The other features' EB priors do not see the constant feature.
    full = CombatHarmonizer(continuous_cols="age").fit(X, batch=covars["site"], covariates=covars)
    reduced = CombatHarmonizer(continuous_cols="age").fit(
        X[:, 1:], batch=covars["site"], covariates=covars
    )
    np.testing.assert_allclose(reduced.gamma_star_, full.gamma_star_[:, 1:], rtol=1e-12)
    np.testing.assert_allclose(reduced.delta_star_, full.delta_star_[:, 1:], rtol=1e-12)


def test_log_space_nonparametric_is_finite_where_neurocombat_underflows():
    rng = np.random.default_rng(3)
    sites = np.repeat(["a", "b"], 400)  # 400 rows: (2 pi d)^(-n/2) underflows in float64
    X = rng.normal(size=(800, 20)) * rng.uniform(0.05, 0.2, 20) + (sites == "b")[:, None]
    with np.errstate(all="ignore"):
        theirs = run_neurocombat(X, pd.DataFrame({"site": sites}), parametric=False)["data"].T
    assert np.isnan(theirs).any()
    ours = CombatHarmonizer(parametric=False).fit_transform(X, batch=sites)
    assert np.isfinite(ours).all()
    site_means = pd.DataFrame(ours).groupby(sites).mean().to_numpy()
    assert np.all(np.abs(site_means[0] - site_means[1]) < 0.15)  # 1.0 before


def test_fitted_attributes_and_estimates():
    X, covars = COHORTS["5 sites"]
    combat = CombatHarmonizer(categorical_cols="sex", continuous_cols="age")
    combat.fit(X, batch=covars["site"], covariates=covars)
    n_batches, n_features = 5, X.shape[1]
    for name in ["gamma_hat_", "delta_hat_", "gamma_star_", "delta_star_"]:
        assert getattr(combat, name).shape == (n_batches, n_features), name
    for name in ["gamma_bar_", "t2_", "a_prior_", "b_prior_"]:
        assert getattr(combat, name).shape == (n_batches,), name
    assert combat.beta_.shape == (2, n_features)
    assert combat.grand_mean_.shape == combat.var_pooled_.shape == (n_features,)
    assert list(combat.batches_) == [f"site{k}" for k in range(5)]
    est = combat.estimates_
    np.testing.assert_array_equal(est.estimates["gamma_star"], combat.gamma_star_)
    assert est.info["categories"] == [["F", "M"]]
    assert est.info["continuous_cols"] == ["age"]
    # gamma_hat is each site's mean of the standardized data
    s = (
        X
        - combat.grand_mean_
        - np.column_stack([covars["sex"] == "M", covars["age"]]).astype(float) @ combat.beta_
    )
    s /= np.sqrt(combat.var_pooled_)
    np.testing.assert_allclose(
        combat.gamma_hat_, pd.DataFrame(s).groupby(covars["site"].to_numpy()).mean(), rtol=1e-10
    )


def test_pickle_and_inputs_unchanged():
    X, covars = COHORTS["3 sites"]
    frame = combat_frame(X, covars)
    snapshot = frame.copy()
    combat = CombatHarmonizer("site", ["sex"], ["age"]).fit(frame)
    out = combat.transform(frame)
    pd.testing.assert_frame_equal(frame, snapshot)
    restored = pickle.loads(pickle.dumps(combat))
    np.testing.assert_array_equal(restored.transform(frame), out)


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------


@pytest.fixture
def frame():
    X, covars = COHORTS["3 sites"]
    return combat_frame(X, covars, ["site", "age"])


def test_transform_before_fit(frame):
    with pytest.raises(NotFittedError):
        CombatHarmonizer("site").transform(frame)


def test_failed_fit_leaves_the_estimator_unfitted():
    """A refit refused after its sites were read kept the earlier gamma_star_ beside the new
    batches_, and transform then harmonized site b with site a's estimates (silently); a
    failed first fit left n_features_in_ and transform raised AttributeError '_covariates'.
    A failed fit (any route) now leaves the estimator unfitted."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 3))
    X[20:] += 5.0
    site = np.repeat(["a", "b"], 20)
    combat = CombatHarmonizer().fit(X, batch=site)
    with pytest.raises(ValueError, match="at least two sites"):
        combat.fit(X[20:], batch=site[20:])
    with pytest.raises(NotFittedError):
        combat.transform(X[20:22], batch=site[20:22])
    assert not hasattr(combat, "batches_") and not hasattr(combat, "n_features_in_")
    summaries = [CombatHarmonizer().site_summary(X[20:], batch=site[20:])]
    failures = [
        (lambda c: c.fit(X[20:], batch=site[20:]), "at least two sites"),
        (lambda c: c.fit_transform(X[20:], batch=site[20:]), "at least two sites"),
        (lambda c: c.fit_from_summaries(summaries), "at least two sites"),
    ]
    for fail, message in failures:
        for combat in (CombatHarmonizer(), CombatHarmonizer().fit(X, batch=site)):
            with pytest.raises(ValueError, match=message):
                fail(combat)
            with pytest.raises(NotFittedError):
                combat.transform(X, batch=site)
            # and a fit afterwards is that of a new estimator
            np.testing.assert_array_equal(
                combat.fit(X, batch=site).gamma_star_,
                CombatHarmonizer().fit(X, batch=site).gamma_star_,
            )


def test_partial_fit_model_error_is_raised_at_every_use():
    """The model of partial_fit is computed at first use: an error there (a single site)
    left half its attributes set and the next use raised AttributeError; it is raised
    again at every use, and a later chunk of another site gives fit's model."""
    rng = np.random.default_rng(0)
    X, site = rng.normal(size=(40, 3)), np.repeat(["a", "b"], 20)
    combat = CombatHarmonizer().partial_fit(X[:20], batch=site[:20])
    for _ in range(2):
        with pytest.raises(ValueError, match="at least two sites"):
            combat.transform(X[:20], batch=site[:20])
    combat.partial_fit(X[20:], batch=site[20:])
    np.testing.assert_allclose(
        combat.transform(X, batch=site),
        CombatHarmonizer().fit(X, batch=site).transform(X, batch=site),
        rtol=1e-10,
    )


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_features_named(frame, bad):
    frame = frame.copy()
    frame.loc[3, "roi4"] = bad
    with pytest.raises(
        ValueError,
        match=r"NaN or infinite values in feature column\(s\) "
        r"\['roi4'\]",
    ):
        CombatHarmonizer("site").fit(frame)


def test_nan_in_covariate_or_site(frame):
    with_nan = frame.copy()
    with_nan.loc[5, "age"] = np.nan
    with pytest.raises(ValueError, match=r"covariate 'age' has missing values .* \[5\]"):
        CombatHarmonizer("site", continuous_cols="age").fit(with_nan)
    with_nan = frame.copy()
    with_nan["site"] = with_nan["site"].astype(object)
    with_nan.loc[7, "site"] = None
    with pytest.raises(ValueError, match=r"site labels are missing .* \[7\]"):
        CombatHarmonizer("site").fit(with_nan)


def test_site_labels_of_masked_or_bytes_arrays_as_from_a_series():
    # The numpy fast path of the site checks must give what a Series of the labels gives: a
    # masked label is missing (it was taken as its hidden value, silently, by partial_fit),
    # and bytes stay bytes (fit's batches_ became object)
    X = np.random.default_rng(0).normal(size=(20, 4))
    masked = np.ma.masked_array(np.repeat(["a", "b"], 10), mask=[False] * 19 + [True])
    for method in ["fit", "partial_fit"]:
        with pytest.raises(ValueError, match=r"site labels are missing .* \[19\]"):
            getattr(CombatHarmonizer(), method)(X, batch=masked)
    raw = np.repeat([b"a", b"b"], 10)
    fitted = CombatHarmonizer().fit(X, batch=raw)
    assert fitted.batches_.dtype == raw.dtype
    np.testing.assert_array_equal(
        fitted.transform(X, batch=raw), CombatHarmonizer().fit_transform(X, batch=pd.Series(raw))
    )


def test_single_row_site_suggests_mean_only(frame):
    frame = frame.copy()
    frame.loc[0, "site"] = "lonely"
    with pytest.raises(ValueError, match=r"\['lonely'\] have a single row.*mean_only=True"):
        CombatHarmonizer("site").fit(frame)
    combat = CombatHarmonizer("site", mean_only=True)
    out = combat.fit_transform(frame)
    # with mean_only the lone row's site needs no variance: neuroCombat gives the same numbers
    features = frame[list(combat.get_feature_names_out())].to_numpy()
    with np.errstate(all="ignore"):  # neuroCombat still computes that site's variance
        expected = run_neurocombat(features, frame[["site"]], mean_only=True)["data"].T
    assert relative_difference(out, expected) < 1e-8


def test_only_one_site(frame):
    frame = frame.assign(site="only")
    with pytest.raises(ValueError, match="at least two sites.*'only'"):
        CombatHarmonizer("site").fit(frame)


def test_missing_columns_named(frame):
    with pytest.raises(ValueError, match=r"\['scanner'\] not found in X"):
        CombatHarmonizer("scanner").fit(frame)
    with pytest.raises(ValueError, match=r"\['height'\] not found in X"):
        CombatHarmonizer("site", continuous_cols=["height"]).fit(frame)
    renamed = frame.rename(columns={"site": "remainder__site"})
    with pytest.raises(ValueError, match="verbose_feature_names_out=False"):
        CombatHarmonizer("site").fit(renamed)
    with pytest.raises(TypeError, match="needs X as a pandas DataFrame"):
        CombatHarmonizer("site").fit(frame.drop(columns=["site"]).to_numpy())
    X, covars = COHORTS["3 sites"]
    with pytest.raises(ValueError, match=r"\['age'\] not found in covariates="):
        CombatHarmonizer(continuous_cols="age").fit(
            X, batch=covars["site"], covariates=covars[["sex"]]
        )


def test_non_numeric_feature_column_named(frame):
    with pytest.raises(ValueError, match=r"feature column\(s\) \['sex'\] are not numeric"):
        CombatHarmonizer("site", continuous_cols="age").fit(
            frame.assign(sex=COHORTS["3 sites"][1]["sex"])
        )


def test_batch_given_twice(frame):
    with pytest.raises(ValueError, match="batch= was given as a keyword while batch_col"):
        CombatHarmonizer("site").fit(frame, batch=frame["site"])


def test_site_required():
    with pytest.raises(ValueError, match="needs the site of each row"):
        CombatHarmonizer().fit(np.ones((4, 2)))


def test_length_mismatch():
    X, covars = COHORTS["3 sites"]
    with pytest.raises(ValueError, match="batch has 81 site labels for 82 rows"):
        CombatHarmonizer().fit(X, batch=covars["site"][:-1])
    with pytest.raises(ValueError, match="covariates have 81 rows for 82 rows"):
        CombatHarmonizer(continuous_cols="age").fit(X, batch=covars["site"], covariates=covars[:-1])


def test_zero_rows(frame):
    with pytest.raises(ValueError, match="0 sample"):
        CombatHarmonizer("site").fit(frame.iloc[:0])


def test_ref_batch_not_a_site(frame):
    with pytest.raises(ValueError, match=r"ref_batch='site9' is not among the sites"):
        CombatHarmonizer("site", ref_batch="site9").fit(frame)


def test_unseen_category_at_transform(frame):
    frame = frame.assign(sex=COHORTS["3 sites"][1]["sex"])
    combat = CombatHarmonizer("site", categorical_cols="sex").fit(frame)
    new = frame.iloc[:3].copy()
    new.loc[1, "sex"] = "X"
    with pytest.raises(ValueError, match=r"covariate 'sex' has level\(s\) \['X'\] not seen"):
        combat.transform(new)


def test_unseen_site_at_transform_named(frame):
    combat = CombatHarmonizer("site").fit(frame)
    new = frame.iloc[:4].assign(site=["site0", "siteZ", "siteZ", "siteY"])
    with pytest.raises(ValueError, match=r"\['siteZ', 'siteY'\] were not seen in fit"):
        combat.transform(new)


def test_different_features_at_transform(frame):
    combat = CombatHarmonizer("site").fit(frame)
    with pytest.raises(ValueError, match="feature names"):
        combat.transform(frame.drop(columns=["roi3"]))
    X, covars = COHORTS["3 sites"]
    combat = CombatHarmonizer().fit(X, batch=covars["site"])
    with pytest.raises(ValueError, match="X has 29 features, but CombatHarmonizer is expecting 30"):
        combat.transform(X[:, 1:], batch=covars["site"])


def test_confounded_covariate_named(frame):
    frame = frame.copy()
    frame["scanner_model"] = frame["site"].map({"site0": "A", "site1": "B", "site2": "B"})
    with pytest.raises(ValueError, match="'scanner_model' is confounded with site"):
        CombatHarmonizer("site", ["scanner_model"]).fit(frame)
    frame["constant_age"] = 40.0
    with pytest.raises(ValueError, match="'constant_age' is confounded with site"):
        CombatHarmonizer("site", continuous_cols="constant_age").fit(
            frame.drop(columns="scanner_model")
        )


@pytest.mark.parametrize(
    "values",
    [
        lambda age, rng: 1.7e12 + rng.uniform(0, 3.15e10, len(age)),  # Unix ms over a year
        lambda age, rng: 1e8 + age,
        lambda age, rng: age * 1e12,
    ],
    ids=["scan time ms", "offset 1e8", "scale 1e12"],
)
@pytest.mark.parametrize("categorical", [[], ["sex"]], ids=["alone", "with sex"])
def test_covariate_units_do_not_decide_confounding(values, categorical):
    """The rank test ran on the unscaled [site one-hot | Z]: a scan time in Unix ms
    (1.7e12 + up to 3.15e10), 1e8 + age or age * 1e12 was refused by fit as "confounded
    with site" (and by partial_fit beside another covariate). Both routes now accept them,
    and give the least-squares fit (computed here on the centred, scaled covariate)."""
    X, covars = COHORTS["3 sites"]
    rng = np.random.default_rng(0)
    cov = values(covars["age"].to_numpy(), rng)
    frame = combat_frame(X, covars.assign(scan=cov), ["site", "scan", *categorical])
    params = {"batch_col": "site", "categorical_cols": categorical, "continuous_cols": "scan"}
    fitted = CombatHarmonizer(**params).fit(frame)
    incremental = CombatHarmonizer(**params).partial_fit(frame)
    sd = cov.std()
    design = np.column_stack(
        [
            pd.get_dummies(covars["site"]).to_numpy(float),
            *[(covars[c] == "M").to_numpy(float) for c in categorical],
            (cov - cov.mean()) / sd,
        ]
    )
    coef = np.linalg.lstsq(design, X, rcond=None)[0]
    coef[-1] /= sd
    for combat in (fitted, incremental):
        np.testing.assert_allclose(combat.beta_, coef[3:], rtol=1e-9, atol=0)
    np.testing.assert_allclose(fitted.transform(frame), incremental.transform(frame), atol=1e-9)


def test_site_level_covariate_of_any_units_is_confounded(frame):
    """Scaling the rank test must not hide a covariate fixed within each site."""
    frame = frame.drop(columns="age").assign(
        scan=frame["site"].map({"site0": 1.7e12, "site1": 1.71e12, "site2": 1.72e12}),
        sex=COHORTS["3 sites"][1]["sex"],
    )
    for cats in ([], ["sex"]):
        params = {"batch_col": "site", "categorical_cols": cats, "continuous_cols": "scan"}
        data = frame if cats else frame.drop(columns="sex")
        with pytest.raises(ValueError, match="'scan' is confounded with site"):
            CombatHarmonizer(**params).fit(data)
        with pytest.raises(ValueError, match="'scan' is confounded with site"):
            _ = CombatHarmonizer(**params).partial_fit(data).gamma_star_


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(unseen_batch="ignore"), "unseen_batch"),
        (dict(eb="yes"), "eb"),
        (dict(parametric=None), "parametric"),
        (dict(mean_only=1.5), "mean_only"),
        (dict(categorical_cols=3), "categorical_cols"),
    ],
)
def test_invalid_parameters(frame, params, match):
    with pytest.raises(ValueError, match=match):
        CombatHarmonizer("site", **params).fit(frame)


def test_eb_needs_two_features():
    sites = np.repeat(["a", "b"], 5)
    X = np.arange(10.0)[:, None] ** 1.5
    with pytest.raises(ValueError, match="at least 2 features.*eb=False"):
        CombatHarmonizer().fit(X, batch=sites)
    out = CombatHarmonizer(eb=False).fit_transform(X, batch=sites)
    # without EB each site is moved exactly onto the pooled mean and standard deviation
    site_means = pd.DataFrame(out).groupby(sites).mean().to_numpy().ravel()
    np.testing.assert_allclose(site_means, [X.mean(), X.mean()], rtol=1e-12)
    site_sds = pd.DataFrame(out).groupby(sites).std().to_numpy().ravel()
    np.testing.assert_allclose(site_sds[0], site_sds[1], rtol=1e-12)
    assert abs(pd.DataFrame(X).groupby(sites).mean().diff().iloc[1, 0]) > 10  # it was apart


def test_mixed_type_site_labels():
    with pytest.raises(TypeError, match="one sortable type"):
        CombatHarmonizer().fit(
            np.random.default_rng(0).normal(size=(6, 3)), batch=["a", 1, "a", 1, "b", "b"]
        )


def test_get_feature_names_out_checks_input_features():
    rng = np.random.default_rng(3)
    X = pd.DataFrame(rng.normal(size=(20, 3)), columns=["a", "b", "c"])
    X["site"] = np.repeat(["s1", "s2"], 10)
    combat = CombatHarmonizer("site").fit(X)
    assert combat.get_feature_names_out(["a", "b", "c", "site"]).tolist() == ["a", "b", "c"]
    with pytest.raises(ValueError, match="input_features is not equal to feature_names_in_"):
        combat.get_feature_names_out(["a", "b", "x", "site"])
    arrays = CombatHarmonizer().fit(X[["a", "b", "c"]].to_numpy(), batch=X["site"])
    assert arrays.get_feature_names_out().tolist() == ["x0", "x1", "x2"]
    assert arrays.get_feature_names_out(["p", "q", "r"]).tolist() == ["p", "q", "r"]
    with pytest.raises(ValueError, match="input_features should have length equal to"):
        arrays.get_feature_names_out(["p", "q"])


def test_estimates_are_built_once_and_share_the_fitted_arrays():
    rng = np.random.default_rng(4)
    combat = CombatHarmonizer().fit(rng.normal(size=(20, 3)), batch=np.repeat([1, 2], 10))
    assert combat.estimates_ is combat.estimates_
    assert combat.estimates_.estimates["gamma_star"] is combat.gamma_star_
    assert combat.estimates_.info["batches"].tolist() == [1, 2]


def test_float32_is_preserved_in_tags():
    tags = CombatHarmonizer().__sklearn_tags__()
    assert tags.transformer_tags.preserves_dtype == ["float64", "float32"]


# --------------------------------------------------------------------------------------------
# columns by name, boolean features, indexes of the keyword route (issue 11)
# --------------------------------------------------------------------------------------------


def _named_cohort(columns, seed=3):
    rng = np.random.default_rng(seed)
    site = np.repeat(["a", "b", "c"], 12)
    X = pd.DataFrame(
        rng.normal(size=(36, len(columns))) * [1, 5, 20, 0.1][: len(columns)]
        + np.repeat([0.0, 3.0, -2.0], 12)[:, None],
        columns=columns,
    )
    return X, site


@pytest.mark.parametrize(
    "columns", [[10, 20, 30, 40], [0, 1, 2, 3], [("roi", 1), ("roi", 2), ("roi", 3), ("roi", 4)]]
)
def test_reordered_columns_refused_keyword_route(columns):
    """Integer or tuple column names are matched by name: the same columns in another order
    are refused (they used to be harmonized with another column's parameters)."""
    X, site = _named_cohort(columns)
    combat = CombatHarmonizer().fit(X, batch=site)
    with pytest.raises(
        ValueError,
        match=r"columns seen in fit in another order \(column 0 "
        rf"is {re.escape(repr(columns[3]))}",
    ):
        combat.transform(X[columns[::-1]], batch=site)
    with pytest.raises(ValueError, match=rf"missing \[{re.escape(repr(columns[1]))}\]"):
        combat.transform(X.drop(columns=columns[1]), batch=site)
    # the right order gives the numbers of the array route
    expected = CombatHarmonizer().fit(X.to_numpy(), batch=site).transform(X.to_numpy(), batch=site)
    np.testing.assert_allclose(combat.transform(X, batch=site), expected, rtol=1e-12)


def test_reordered_columns_refused_columns_route_with_mixed_names():
    X, site = _named_cohort([1, 2, 3, 4])
    X["site"] = site  # integer feature names beside a text site column
    combat = CombatHarmonizer("site").fit(X)
    assert combat.n_features_in_ == 5 and not hasattr(combat, "feature_names_in_")
    with pytest.raises(ValueError, match="in another order"):
        combat.transform(X[[2, 1, 3, 4, "site"]])
    with pytest.raises(ValueError, match=r"not seen in fit \[5\]"):
        combat.transform(X.rename(columns={4: 5}))
    np.testing.assert_allclose(
        combat.transform(X),
        CombatHarmonizer().fit_transform(X[[1, 2, 3, 4]].to_numpy(), batch=site),
        rtol=1e-12,
    )


def test_str_columns_checked_as_scikit_learn_does():
    """String names keep scikit-learn's own checks and messages (its estimator check
    check_dataframe_column_names_consistency expects them)."""
    X, site = _named_cohort(["w", "x", "y", "z"])
    combat = CombatHarmonizer().fit(X, batch=site)
    for bad, message in [
        (["z", "y", "x", "w"], "Feature names must be in the same order"),
        (["a", "b", "c", "d"], "Feature names unseen at fit time"),
        (["w", "x"], "Feature names seen at fit time, yet now missing"),
    ]:
        X_bad = pd.DataFrame(X.to_numpy()[:, : len(bad)], columns=bad)
        with pytest.raises(
            ValueError,
            match=f"The feature names should match those that were passed during fit.\n{message}",
        ):
            combat.transform(X_bad, batch=site)
    # fitted with text names, given integer names: refused by name too, not by position
    with pytest.raises(ValueError, match=r"missing \['w', 'x', 'y', 'z'\]"):
        combat.transform(X.set_axis([0, 1, 2, 3], axis=1), batch=site)


def test_column_names_survive_save_and_load(tmp_path):
    from kwneuro_sk import CombatEstimates

    X, site = _named_cohort([7, 8, 9, 10])
    X[("meta", "site")] = site
    combat = CombatHarmonizer(("meta", "site")).fit(X)
    combat.estimates_.save(tmp_path / "m.npz")
    loaded = CombatEstimates.load(tmp_path / "m.npz")
    assert loaded.info["batch_col"] == ("meta", "site")
    rebuilt = CombatHarmonizer.from_estimates(loaded)
    np.testing.assert_array_equal(rebuilt.transform(X), combat.transform(X))
    with pytest.raises(ValueError, match="in another order"):
        rebuilt.transform(X[[10, 9, 8, 7, ("meta", "site")]])


@pytest.mark.parametrize("dtype", [bool, "boolean"])
def test_boolean_feature_column_named(dtype):
    X, site = _named_cohort(["f1", "f2", "f3"])
    X["diagnosis"] = pd.array(np.tile([True, False], 18), dtype=dtype)
    with pytest.raises(ValueError, match=r"feature column\(s\) \['diagnosis'\] are not numeric"):
        CombatHarmonizer().fit(X, batch=site)
    with pytest.raises(ValueError, match=r"\['diagnosis'\] are not numeric"):
        CombatHarmonizer("site").fit(X.assign(site=site))


def test_boolean_feature_array_refused():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="boolean dtype"):
        CombatHarmonizer().fit(rng.random((20, 3)) > 0.5, batch=np.repeat(["a", "b"], 10))


@pytest.mark.parametrize("shift", ["X", "batch", "covariates"])
def test_keyword_route_indexes_must_agree(shift):
    X, site = _named_cohort(["f1", "f2", "f3"])
    covariates = pd.DataFrame({"age": np.linspace(20, 70, 36)})
    labels = np.arange(36) * 2 + 1  # labelled rows, as after selecting subjects of a table
    objects = {
        "X": X.set_axis(labels),
        "batch": pd.Series(site, index=labels),
        "covariates": covariates.set_axis(labels),
    }
    objects[shift] = objects[shift].set_axis(np.arange(36) + 100)
    name = shift if shift == "X" else f"{shift}="
    with pytest.raises(
        ValueError,
        match=rf"have different indexes \(row 0 is labelled "
        rf".*100 in {name}",
    ):
        CombatHarmonizer(continuous_cols="age").fit(
            objects["X"], batch=objects["batch"], covariates=objects["covariates"]
        )


def test_keyword_route_shuffled_batch_refused_equal_indexes_accepted():
    X, site = _named_cohort(["f1", "f2", "f3"])
    X.index = np.arange(36) * 2  # any index, as long as they agree
    shuffled = pd.Series(site, index=X.index).sample(frac=1, random_state=0)
    with pytest.raises(ValueError, match="different indexes"):
        CombatHarmonizer().fit(X, batch=shuffled)
    np.testing.assert_allclose(
        CombatHarmonizer().fit_transform(X, batch=shuffled.sort_index()),
        CombatHarmonizer().fit_transform(X.to_numpy(), batch=site),
        rtol=1e-12,
    )


def test_inverse_transform_matches_harmonized_columns_by_name():
    X, site = _named_cohort([10, 20, 30, 40])
    combat = CombatHarmonizer().fit(X, batch=site).set_output(transform="pandas")
    Xh = combat.transform(X, batch=site)
    assert list(Xh.columns) == ["10", "20", "30", "40"]
    np.testing.assert_allclose(combat.inverse_transform(Xh, batch=site), X, rtol=1e-10)
    with pytest.raises(ValueError, match="harmonized features in another order"):
        combat.inverse_transform(Xh[["40", "30", "20", "10"]], batch=site)


def test_keyword_route_default_index_pairs_by_position():
    """A default index (0..n-1) has no row labels: a DataFrame made from an array, or the pandas
    output of a pipeline step given an array, pairs by position with labelled batch=/covariates=
    (the pattern of metadata routing in cross-validation)."""
    X, site = _named_cohort(["f1", "f2", "f3"])
    labels = np.arange(36) * 3 + 7
    got = CombatHarmonizer(continuous_cols="age").fit_transform(
        X,
        batch=pd.Series(site, index=labels),
        covariates=pd.DataFrame({"age": np.linspace(20, 70, 36)}, index=labels),
    )
    expected = CombatHarmonizer(continuous_cols="age").fit_transform(
        X.to_numpy(), batch=site, covariates=pd.DataFrame({"age": np.linspace(20, 70, 36)})
    )
    np.testing.assert_array_equal(got, expected)
