"""The blockwise, threaded ComBat paths give the numbers of a single block and of neuroCombat.

The parity tests in test_combat.py use a few dozen features, which fit in one block; here the
block budget is made tiny so that fitting, adjusting and the non-parametric EB each run over
many blocks on several threads.
"""

import contextlib
import io
import warnings

import joblib
import numpy as np
import pandas as pd
import pytest
from neuroCombat import neuroCombat
from scipy.special import logsumexp

from kwneuro_sk import CombatEstimates, CombatHarmonizer
from kwneuro_sk.combat import model

# neuroCombat's ref_batch path calls np.int, removed in NumPy 1.24 (see conftest.py).
pytestmark = pytest.mark.usefixtures("numpy_int_alias")


def make_cohort(n_features=40, seed=0):
    rng = np.random.default_rng(seed)
    sites = rng.permutation(np.repeat(["site0", "site1", "site2"], [40, 25, 17]))
    age = rng.uniform(20, 80, sites.size).astype(np.float32).astype(float)
    site_code = pd.factorize(sites, sort=True)[0]
    shift = rng.normal(0, 1, size=(3, n_features))
    scale = rng.uniform(0.5, 2.0, size=(3, n_features))
    X = (
        50
        + 0.03 * age[:, None]
        + rng.normal(size=(sites.size, n_features)) * scale[site_code]
        + shift[site_code]
    )
    return X, pd.DataFrame({"site": sites, "age": age})


def relative_difference(a, b):
    return np.max(np.abs(a - b) / np.abs(b))


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Blocks of 2 features (82 rows), so 20 blocks over the threads; EB blocks of 3 rows."""
    monkeypatch.setattr(model, "BLOCK_ELEMENTS", 2 * 82)
    monkeypatch.setattr(model, "EB_BLOCK_ELEMENTS", 3 * 40)


@pytest.mark.parametrize("ref_batch", [None, "site1"])
@pytest.mark.parametrize("parametric", [True, False])
def test_many_blocks_match_one_block_and_neurocombat(
    tiny_blocks, monkeypatch, parametric, ref_batch
):
    X, covars = make_cohort()
    options = dict(continuous_cols=["age"], parametric=parametric, ref_batch=ref_batch)
    combat = CombatHarmonizer(**options)
    ours = combat.fit_transform(X, batch=covars["site"], covariates=covars)
    with contextlib.redirect_stdout(io.StringIO()):
        expected = neuroCombat(
            dat=X.T,
            covars=covars,
            batch_col="site",
            continuous_cols=["age"],
            parametric=parametric,
            ref_batch=ref_batch,
        )["data"].T
    assert relative_difference(ours, expected) < 1e-8

    monkeypatch.setattr(model, "BLOCK_ELEMENTS", 1 << 18)  # one block
    one_block = CombatHarmonizer(**options).fit_transform(
        X, batch=covars["site"], covariates=covars
    )
    np.testing.assert_allclose(ours, one_block, rtol=1e-12)


def test_many_blocks_float32_transform_and_inverse(tiny_blocks):
    X, covars = make_cohort()
    combat = CombatHarmonizer(continuous_cols=["age"]).fit(
        X, batch=covars["site"], covariates=covars
    )
    out64 = combat.transform(X, batch=covars["site"], covariates=covars)
    out32 = combat.transform(X.astype(np.float32), batch=covars["site"], covariates=covars)
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, out64, rtol=1e-6)
    back = combat.inverse_transform(out64, batch=covars["site"], covariates=covars)
    np.testing.assert_allclose(back, X, rtol=1e-12)


def test_zero_variance_feature_passes_through_in_its_block(tiny_blocks):
    X, covars = make_cohort()
    X[:, 7] = 3.25
    with pytest.warns(UserWarning, match=r"1 feature\(s\) are constant.*\['x7'\]$"):
        out = CombatHarmonizer(continuous_cols=["age"]).fit_transform(
            X, batch=covars["site"], covariates=covars
        )
    np.testing.assert_array_equal(out[:, 7], X[:, 7])
    assert np.isfinite(out).all()


def dense_nonparametric_eb(n, gamma_hat, delta_hat, ss):
    """The textbook form: full G x G log-likelihood matrix, normalized with logsumexp."""
    loglik = -0.5 * n * np.log(2 * np.pi * delta_hat)[None, :] - (
        ss[:, None] + n * (gamma_hat[:, None] - gamma_hat[None, :]) ** 2
    ) / (2 * delta_hat[None, :])
    np.fill_diagonal(loglik, -np.inf)
    weights = np.exp(loglik - logsumexp(loglik, axis=1, keepdims=True))
    return weights @ gamma_hat, weights @ delta_hat


@pytest.mark.parametrize("n", [30, 5000])
@pytest.mark.parametrize("budget", [None, 7 * 50])
def test_nonparametric_eb_matches_dense_log_space_reference(n, budget):
    """Also where the densities themselves underflow (n=5000: about exp(-7000)), the case in
    which neuroCombat returns NaN, and with blocks of 7 rows on threads."""
    rng = np.random.default_rng(3)
    gamma_hat = rng.normal(0.2, 0.5, 50)
    delta_hat = rng.uniform(0.5, 2.0, 50)
    ss = delta_hat * (n - 1) * rng.uniform(0.8, 1.2, 50)
    gamma_star, delta_star = model.nonparametric_eb(n, gamma_hat, delta_hat, ss, budget=budget)
    expected_gamma, expected_delta = dense_nonparametric_eb(n, gamma_hat, delta_hat, ss)
    assert np.isfinite(gamma_star).all() and np.isfinite(delta_star).all()
    np.testing.assert_allclose(gamma_star, expected_gamma, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(delta_star, expected_delta, rtol=1e-10)


def test_nonparametric_eb_far_apart_features_use_the_clamped_path():
    """Log-weights far below the largest (< -700) are clamped, not turned into NaN or 0/0."""
    n = 300
    gamma_hat = np.array([-10.0, -9.9, 0.0, 0.1, 10.0, 10.05])
    delta_hat = np.ones(6)
    ss = np.full(6, n - 1.0)
    gamma_star, _ = model.nonparametric_eb(n, gamma_hat, delta_hat, ss)
    # Each feature's prior is its near neighbour: the others weigh exp(-1.5e4) or less, counted
    # as exp(-700) (< 1e-304 of the neighbour's weight).
    np.testing.assert_allclose(
        gamma_star, [-9.9, -10.0, 0.1, 0.0, 10.05, 10.0], rtol=1e-12, atol=1e-300
    )


def far_rows_reference_case(n=5000):
    rng = np.random.default_rng(4)
    gamma_hat = rng.normal(0.0, 0.3, 40)
    delta_hat = rng.uniform(0.8, 1.25, 40)
    ss = delta_hat * (n - 1)
    ss[[3, 17]] *= [60.0, 1 / 50]  # far from every feature's delta: all weights < exp(-600)
    return n, gamma_hat, delta_hat, ss


@pytest.mark.parametrize("budget", [None, 3 * 40])
def test_nonparametric_eb_rows_far_from_every_feature_are_normalized_exactly(budget):
    """Rows whose likelihoods all lie far below the shift (the likelihood's upper bound) are
    recomputed normalized by their own maximum, and agree with the dense reference."""
    n, gamma_hat, delta_hat, ss = far_rows_reference_case()
    gamma_star, delta_star = model.nonparametric_eb(n, gamma_hat, delta_hat, ss, budget=budget)
    expected_gamma, expected_delta = dense_nonparametric_eb(n, gamma_hat, delta_hat, ss)
    np.testing.assert_allclose(gamma_star, expected_gamma, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(delta_star, expected_delta, rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# Threads: n_jobs is the whole budget, resolved by joblib, and does not change a bit
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("parametric", [True, False])
def test_n_jobs_gives_bit_identical_results(tiny_blocks, parametric):
    X, covars = make_cohort()
    outputs = []
    for n_jobs in [1, 2, -1]:
        combat = CombatHarmonizer(continuous_cols=["age"], parametric=parametric, n_jobs=n_jobs)
        out = combat.fit_transform(X, batch=covars["site"], covariates=covars)
        back = combat.inverse_transform(out, batch=covars["site"], covariates=covars)
        outputs.append((out, back, combat.gamma_star_, combat.delta_star_))
    for other in outputs[1:]:
        for a, b in zip(outputs[0], other):
            np.testing.assert_array_equal(a, b)


@pytest.fixture
def thread_counts(monkeypatch):
    """The n_jobs each block loop of the model is called with."""
    seen = []
    run_blocks = model._run_blocks

    def spy(function, n_items, step, scratch_size, n_jobs=1):
        seen.append(n_jobs)
        return run_blocks(function, n_items, step, scratch_size, n_jobs)

    monkeypatch.setattr(model, "_run_blocks", spy)
    return seen


@pytest.mark.parametrize(
    "n_jobs, context, expected",
    [
        (None, None, 1),
        (None, 2, 2),
        (2, None, 2),
        (1, 2, 1),
        (-1, None, joblib.effective_n_jobs(-1)),
    ],
)
def test_n_jobs_resolved_by_joblib(thread_counts, n_jobs, context, expected):
    X, covars = make_cohort()
    combat = CombatHarmonizer(continuous_cols=["age"], parametric=False, n_jobs=n_jobs)
    config = joblib.parallel_config(n_jobs=context) if context else contextlib.nullcontext()
    with config:
        out = combat.fit_transform(X, batch=covars["site"], covariates=covars)
        combat.inverse_transform(out, batch=covars["site"], covariates=covars)
    # fit, the EB of each of the 3 sites, transform, inverse_transform
    assert thread_counts == [expected] * 6
    assert combat.n_jobs == n_jobs  # stored unchanged


def test_n_jobs_validated():
    X, covars = make_cohort()
    with pytest.raises(ValueError, match="n_jobs"):
        CombatHarmonizer(n_jobs="2").fit(X, batch=covars["site"])
    # 0 threads has no meaning: refused at the boundary, naming the estimator's parameter
    with pytest.raises(ValueError, match="'n_jobs' parameter of CombatHarmonizer .*Got 0"):
        CombatHarmonizer(n_jobs=0).fit(X, batch=covars["site"])


# ---------------------------------------------------------------------------------------------
# Extreme magnitudes: ComBat is scale-equivariant, and so are the numbers
# ---------------------------------------------------------------------------------------------


def harmonize(X, covars, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow, underflow or invalid value anywhere
        combat = CombatHarmonizer(continuous_cols=["age"], **options)
        out = combat.fit_transform(X, batch=covars["site"], covariates=covars)
        new = combat.transform(X[:5], batch=covars["site"][:5], covariates=covars[:5])
        back = combat.inverse_transform(out, batch=covars["site"], covariates=covars)
    return out, new, back


@pytest.mark.parametrize("parametric", [True, False])
@pytest.mark.parametrize("exponent", [-1000, -600, -100, 100, 600, 960])
def test_power_of_two_scaling_is_exact(tiny_blocks, parametric, exponent):
    X, covars = make_cohort()
    X[:, 0] *= 1e-3  # features of different magnitudes in one block
    expected = harmonize(X, covars, parametric=parametric)
    factor = 2.0**exponent
    for got, want in zip(harmonize(X * factor, covars, parametric=parametric), expected):
        np.testing.assert_array_equal(got, want * factor)


@pytest.mark.parametrize("parametric", [True, False])
@pytest.mark.parametrize("factor", [1e155, 1e300, 1e-160, 1e-300])
def test_extreme_magnitudes_harmonize_to_the_scaled_result(parametric, factor):
    """Around 1e155 the squares overflow, around 1e-160 they are subnormal: neither may show."""
    X, covars = make_cohort()
    expected = harmonize(X, covars, parametric=parametric)
    for got, want in zip(harmonize(X * factor, covars, parametric=parametric), expected):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got / factor, want, rtol=1e-12)


def test_extreme_features_mixed_with_ordinary_ones():
    X, covars = make_cohort()
    scales = np.where(np.arange(X.shape[1]) % 3 == 0, 1e200, 1.0)
    scales[1::3] = 1e-200
    expected = harmonize(X, covars)[0]
    got = harmonize(X * scales, covars)[0]
    np.testing.assert_allclose(got / scales, expected, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# Constant features: decided against the resolution of the feature's values, not its magnitude
# ---------------------------------------------------------------------------------------------


def test_small_spread_on_a_large_value_is_harmonized_not_passed_through():
    """1e10 + noise of sd 1e-3 (~500 ulp) with site offsets of 0.01: a real site effect."""
    X, covars = make_cohort()
    rng = np.random.default_rng(5)
    sites = covars["site"].to_numpy()
    offsets = pd.Series(sites).map({"site0": 0.0, "site1": 0.01, "site2": -0.01}).to_numpy()
    X[:, 4] = 1e10 + offsets + rng.normal(0, 1e-3, sites.size)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        combat = CombatHarmonizer(continuous_cols=["age"])
        out = combat.fit_transform(X, batch=covars["site"], covariates=covars)
    assert not combat.zero_variance_features_.any()
    site_means = pd.Series(X[:, 4] - 1e10).groupby(sites).mean()
    harmonized_means = pd.Series(out[:, 4] - 1e10).groupby(sites).mean()
    assert np.ptp(site_means) > 0.015
    assert np.ptp(harmonized_means) < 0.002  # the site effect is gone, noise sd/sqrt(17) left
    # and the same feature shifted to 0 gives the same numbers up to the resolution of 1e10
    X0 = X.copy()
    X0[:, 4] -= 1e10
    out0 = CombatHarmonizer(continuous_cols=["age"]).fit_transform(
        X0, batch=covars["site"], covariates=covars
    )
    np.testing.assert_allclose(out[:, 4] - 1e10, out0[:, 4], atol=1e-5)


def test_many_constant_features_warning_names_the_first_five():
    X, covars = make_cohort()
    X[:, 10:17] = 2.0
    with pytest.warns(
        UserWarning,
        match=r"7 feature\(s\) .*\['x10', 'x11', 'x12', 'x13', "
        r"'x14'\] \.\.\.$",
    ):
        CombatHarmonizer(continuous_cols=["age"]).fit(X, batch=covars["site"], covariates=covars)


def test_constant_and_exactly_explained_features_pass_through_with_a_warning():
    X, covars = make_cohort()
    sites = covars["site"].to_numpy()
    frame = pd.DataFrame(X, columns=[f"roi{i}" for i in range(X.shape[1])])
    frame["roi2"] = 1e10  # constant, large
    frame["roi5"] = 0.0  # constant zero
    frame["roi9"] = pd.Series(sites).map({"site0": 1.5, "site1": 2.25, "site2": -0.5})
    frame["roi11"] = 3e-200  # constant, tiny
    combat = CombatHarmonizer(continuous_cols=["age"])
    with pytest.warns(
        UserWarning,
        match=r"4 feature\(s\) are constant.*passed through "
        r"unchanged: \['roi2', 'roi5', 'roi9', 'roi11'\]",
    ):
        out = combat.fit_transform(frame, batch=covars["site"], covariates=covars)
    assert np.flatnonzero(combat.zero_variance_features_).tolist() == [2, 5, 9, 11]
    for column in [2, 5, 9, 11]:
        np.testing.assert_array_equal(out[:, column], frame.iloc[:, column])
    assert np.isfinite(out).all()


def test_huge_features_survive_save_and_load(tmp_path):
    """sigma is stored beside var_pooled (whose square overflows beyond ~1e154), so a model of
    such features is saved, loaded and applied exactly as the fitted one."""
    rng = np.random.default_rng(5)
    X = rng.normal(size=(30, 4)) + np.repeat([0.0, 1.0, -1.0], 10)[:, None]
    X[:, 1] *= 1e200
    site = np.repeat(["a", "b", "c"], 10)
    fitted = CombatHarmonizer().fit(X, batch=site)
    assert np.isinf(fitted.var_pooled_[1])
    fitted.estimates_.save(tmp_path / "m.npz")
    loaded = CombatHarmonizer.from_estimates(CombatEstimates.load(tmp_path / "m.npz"))
    expected = fitted.transform(X, batch=site)
    assert np.isfinite(expected).all()
    np.testing.assert_array_equal(loaded.transform(X, batch=site), expected)
    # without sigma (a file of an earlier release) an infinite var_pooled is still refused
    estimates = CombatEstimates.load(tmp_path / "m.npz")
    del estimates.estimates["sigma"]
    with pytest.raises(ValueError, match=r"estimates\['var_pooled'\] has NaN or infinite"):
        CombatHarmonizer.from_estimates(estimates)
