"""The blockwise, threaded ComBat paths give the numbers of a single block and of neuroCombat.

The parity tests in test_combat.py use a few dozen features, which fit in one block; here the
block budget is made tiny so that fitting, adjusting and the non-parametric EB each run over
many blocks on several threads.
"""

import contextlib
import io

import numpy as np
import pandas as pd
import pytest
from neuroCombat import neuroCombat
from scipy.special import logsumexp

from kwneuro_sk import CombatHarmonizer
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
    X = (50 + 0.03 * age[:, None] + rng.normal(size=(sites.size, n_features))
         * scale[site_code] + shift[site_code])
    return X, pd.DataFrame({"site": sites, "age": age})


def relative_difference(a, b):
    return np.max(np.abs(a - b) / np.abs(b))


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Blocks of 2 features (82 rows), so 20 blocks over the threads."""
    monkeypatch.setattr(model, "BLOCK_ELEMENTS", 2 * 82)


@pytest.mark.parametrize("ref_batch", [None, "site1"])
@pytest.mark.parametrize("parametric", [True, False])
def test_many_blocks_match_one_block_and_neurocombat(tiny_blocks, monkeypatch, parametric,
                                                    ref_batch):
    X, covars = make_cohort()
    options = dict(continuous_cols=["age"], parametric=parametric, ref_batch=ref_batch)
    combat = CombatHarmonizer(**options)
    ours = combat.fit_transform(X, batch=covars["site"], covariates=covars)
    with contextlib.redirect_stdout(io.StringIO()):
        expected = neuroCombat(dat=X.T, covars=covars, batch_col="site",
                               continuous_cols=["age"], parametric=parametric,
                               ref_batch=ref_batch)["data"].T
    assert relative_difference(ours, expected) < 1e-8

    monkeypatch.setattr(model, "BLOCK_ELEMENTS", 1 << 18)  # one block
    one_block = CombatHarmonizer(**options).fit_transform(X, batch=covars["site"],
                                                          covariates=covars)
    np.testing.assert_allclose(ours, one_block, rtol=1e-12)


def test_many_blocks_float32_transform_and_inverse(tiny_blocks):
    X, covars = make_cohort()
    combat = CombatHarmonizer(continuous_cols=["age"]).fit(X, batch=covars["site"],
                                                           covariates=covars)
    out64 = combat.transform(X, batch=covars["site"], covariates=covars)
    out32 = combat.transform(X.astype(np.float32), batch=covars["site"], covariates=covars)
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, out64, rtol=1e-6)
    back = combat.inverse_transform(out64, batch=covars["site"], covariates=covars)
    np.testing.assert_allclose(back, X, rtol=1e-12)


def test_zero_variance_feature_passes_through_in_its_block(tiny_blocks):
    X, covars = make_cohort()
    X[:, 7] = 3.25
    out = CombatHarmonizer(continuous_cols=["age"]).fit_transform(
        X, batch=covars["site"], covariates=covars)
    np.testing.assert_array_equal(out[:, 7], X[:, 7])
    assert np.isfinite(out).all()


def dense_nonparametric_eb(n, gamma_hat, delta_hat, ss):
    """The textbook form: full G x G log-likelihood matrix, normalized with logsumexp."""
    loglik = (-0.5 * n * np.log(2 * np.pi * delta_hat)[None, :]
              - (ss[:, None] + n * (gamma_hat[:, None] - gamma_hat[None, :]) ** 2)
              / (2 * delta_hat[None, :]))
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
    np.testing.assert_allclose(gamma_star, [-9.9, -10.0, 0.1, 0.0, 10.05, 10.0], rtol=1e-12,
                               atol=1e-300)
