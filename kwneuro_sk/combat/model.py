"""The ComBat model as pure array functions.

Notation follows Johnson, Li & Rabinovic (2007) and Fortin et al. (2017/2018). For feature ``g``
and subject ``i`` of site (batch) ``b``::

    x_ig = alpha_g + z_i @ beta_g + gamma_bg + sqrt(delta_bg) * sigma_g * eps_ig

* ``alpha_g`` is the grand mean (sample-weighted mean of the site intercepts, or the reference
  site's intercept), ``beta_g`` the covariate effects, ``sigma_g**2`` the pooled variance.
* Data are standardized, ``s_ig = (x_ig - alpha_g - z_i @ beta_g) / sigma_g``; per site the
  location ``gamma_hat`` is the mean of ``s`` and the scale ``delta_hat`` its variance (ddof=1).
* Empirical Bayes shrinks ``gamma_hat``/``delta_hat`` towards priors estimated per site across
  features, giving ``gamma_star``/``delta_star``; the adjusted data are
  ``(s - gamma_star) / sqrt(delta_star) * sigma + alpha + z @ beta``.

Everything here works on plain numpy arrays (no pandas, no scikit-learn) and on all features at
once. Large inputs are processed in blocks of features so that temporaries stay a bounded size;
float32 data are read block by block into float64, never copied whole.

Two defined behaviours differ from neuroCombat on degenerate data:

* features whose pooled variance is zero (constant features, or features explained exactly by
  site and covariates) are passed through unchanged and take no part in the priors;
* the non-parametric likelihoods are computed in log space, so they never underflow to 0/0.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

# Elements (float64) of one temporary block: 4 Mi elements = 32 MiB.
BLOCK_ELEMENTS = 1 << 22
# A feature whose pooled variance is below this fraction of its mean square is constant.
_ZERO_VARIANCE_RTOL = (1e3 * np.finfo(np.float64).eps) ** 2
# sva / neuroCombat convergence threshold of the parametric EB iteration.
PARAMETRIC_TOL = 1e-4
PARAMETRIC_MAX_ITER = 10_000


def feature_blocks(n_rows, n_features, budget=BLOCK_ELEMENTS):
    """Yield slices over features so that a block of ``n_rows`` rows holds ~``budget`` values."""
    step = max(1, budget // max(n_rows, 1))
    for start in range(0, n_features, step):
        yield slice(start, min(start + step, n_features))


def _as_float64(block):
    return np.asarray(block, dtype=np.float64)


# --------------------------------------------------------------------------------------------
# Location / scale: least squares for all features, grand mean, pooled variance
# --------------------------------------------------------------------------------------------


@dataclass
class StandardizationModel:
    """What is needed to standardize any row: ``s = (x - grand_mean - z @ beta) / sigma``."""

    grand_mean: np.ndarray  # (n_features,)
    beta: np.ndarray  # (n_covariates, n_features)
    var_pooled: np.ndarray  # (n_features,)
    zero_variance: np.ndarray  # (n_features,) bool: passed through unchanged

    @property
    def scale(self):
        """sigma, with 1 for zero-variance features so that division is always defined."""
        return np.sqrt(np.where(self.zero_variance, 1.0, self.var_pooled))

    def location(self, Z, block=slice(None)):
        """Expected value ``alpha + z @ beta`` of each row for the features in ``block``."""
        return self.grand_mean[block] + Z @ self.beta[:, block]


def batch_onehot(batch_idx, n_batches):
    """One column per batch, 1 where the row belongs to it."""
    onehot = np.zeros((batch_idx.shape[0], n_batches))
    onehot[np.arange(batch_idx.shape[0]), batch_idx] = 1.0
    return onehot


def design_matrix(batch_idx, n_batches, Z):
    """The ComBat design ``[site one-hot | covariates]`` (covariates already encoded)."""
    return np.hstack([batch_onehot(batch_idx, n_batches), Z])


def fit_standardization(X, batch_idx, n_batches, Z, ref=None):
    """Least-squares fit of site and covariate effects, grand mean and pooled variance.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features), float32 or float64
    batch_idx : ndarray of int, shape (n_samples,)
        Batch index of each row, in ``range(n_batches)``.
    n_batches : int
    Z : ndarray of shape (n_samples, n_covariates)
        Encoded covariates (may have zero columns). ``[onehot(batch) | Z]`` must have full
        column rank.
    ref : int or None
        Index of the reference batch: its intercept is the grand mean and the pooled variance
        is computed on its rows only.

    Returns
    -------
    StandardizationModel
    """
    n_samples, n_features = X.shape
    design = design_matrix(batch_idx, n_batches, Z)
    gram = design.T @ design
    coef = np.empty((design.shape[1], n_features))
    for block in feature_blocks(n_samples, n_features):
        coef[:, block] = np.linalg.solve(gram, design.T @ _as_float64(X[:, block]))

    counts = np.bincount(batch_idx, minlength=n_batches)
    if ref is None:
        grand_mean = (counts / n_samples) @ coef[:n_batches]
        rows = slice(None)
    else:
        grand_mean = coef[ref].copy()
        rows = batch_idx == ref

    var_pooled = np.empty(n_features)
    mean_square = np.empty(n_features)
    for block in feature_blocks(n_samples, n_features):
        values = _as_float64(X[rows, block])
        residuals = values - design[rows] @ coef[:, block]
        var_pooled[block] = np.mean(residuals**2, axis=0)
        mean_square[block] = np.mean(values**2, axis=0)
    zero_variance = var_pooled <= _ZERO_VARIANCE_RTOL * mean_square
    var_pooled[zero_variance] = 0.0
    return StandardizationModel(grand_mean, coef[n_batches:].copy(), var_pooled, zero_variance)


def standardized_moments(X, Z, model, groups):
    """Per-group size, mean and sum of squared deviations of the standardized data.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    Z : ndarray of shape (n_samples, n_covariates)
    model : StandardizationModel
    groups : list of ndarray of int
        Row indices of each group (site).

    Returns
    -------
    n : ndarray of shape (n_groups,)
    mean, ss : ndarrays of shape (n_groups, n_features)
    """
    n_samples, n_features = X.shape
    scale = model.scale
    mean = np.empty((len(groups), n_features))
    ss = np.empty((len(groups), n_features))
    for block in feature_blocks(n_samples, n_features):
        for k, rows in enumerate(groups):
            s = (_as_float64(X[rows, block]) - model.location(Z[rows], block)) / scale[block]
            mean[k, block] = s.mean(axis=0)
            ss[k, block] = ((s - mean[k, block]) ** 2).sum(axis=0)
    return np.array([len(rows) for rows in groups]), mean, ss


# --------------------------------------------------------------------------------------------
# Empirical Bayes for one site: priors across features, parametric and non-parametric
# --------------------------------------------------------------------------------------------


@dataclass
class BatchEstimates:
    """Location/scale estimates of one site for every feature, and the site's priors."""

    gamma_hat: np.ndarray
    delta_hat: np.ndarray
    gamma_star: np.ndarray
    delta_star: np.ndarray
    gamma_bar: float = math.nan
    t2: float = math.nan
    a_prior: float = math.nan
    b_prior: float = math.nan


def location_prior(gamma_hat):
    """Normal prior of gamma across features: mean ``gamma_bar`` and variance ``t2``."""
    return float(np.mean(gamma_hat)), float(np.var(gamma_hat, ddof=1))


def scale_prior(delta_hat):
    """Inverse-gamma prior of delta across features by the method of moments: ``(a, b)``.

    Infinite when delta_hat does not vary across features (the prior is then a point mass).
    """
    m = float(np.mean(delta_hat))
    s2 = float(np.var(delta_hat, ddof=1))
    if not s2 > 0:
        return math.inf, math.inf
    return (2.0 * s2 + m**2) / s2, (m * s2 + m**3) / s2


def postmean(gamma_hat, gamma_bar, n, delta, t2):
    """Posterior mean of gamma given delta (Johnson 2007, eq. for gamma*)."""
    return (t2 * n * gamma_hat + delta * gamma_bar) / (t2 * n + delta)


def postvar(sum2, n, a, b):
    """Posterior mean of delta given the sum of squares about gamma (inverse gamma)."""
    return (0.5 * sum2 + b) / (n / 2.0 + a - 1.0)


def parametric_eb(n, gamma_hat, delta_hat, ss, gamma_bar, t2, a, b):
    """Iterate the conditional posterior means of gamma and delta to convergence.

    The sum of squares about a value ``g`` is ``ss + n * (gamma_hat - g)**2``, so each step
    costs O(n_features) without touching the data. The stopping rule is sva's and
    neuroCombat's (largest relative change, divided by the signed old value, at most 1e-4) so
    that the numbers agree with them to rounding.
    """
    if not (math.isfinite(a) and math.isfinite(b)):
        # Point-mass prior on delta: delta* = delta_hat; gamma* given that delta.
        return postmean(gamma_hat, gamma_bar, n, delta_hat, t2), delta_hat.copy()
    g_old, d_old = gamma_hat, delta_hat
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(PARAMETRIC_MAX_ITER):
            g_new = postmean(gamma_hat, gamma_bar, n, d_old, t2)
            d_new = postvar(ss + n * (gamma_hat - g_new) ** 2, n, a, b)
            change = max(np.max(np.abs(g_new - g_old) / g_old),
                         np.max(np.abs(d_new - d_old) / d_old))
            g_old, d_old = g_new, d_new
            if not change > PARAMETRIC_TOL:
                break
        else:
            warnings.warn("parametric empirical Bayes did not converge in "
                          f"{PARAMETRIC_MAX_ITER} iterations", RuntimeWarning, stacklevel=3)
    return g_new, d_new


def nonparametric_eb(n, gamma_hat, delta_hat, ss, budget=BLOCK_ELEMENTS):
    """Non-parametric EB: average the other features' (gamma, delta) weighted by likelihood.

    For feature ``i`` the weight of feature ``j != i`` is the normal likelihood of ``i``'s data
    under ``(gamma_hat_j, delta_hat_j)``, which depends on the data only through ``n``, the mean
    and the sum of squares::

        log L_ij = -n/2 log(2 pi d_j) - (ss_i + n (m_i - g_j)**2) / (2 d_j)

    The G x G matrix is computed in row blocks of bounded size and normalized with a
    log-sum-exp, so no likelihood underflows (neuroCombat's give 0/0 = NaN there).
    """
    n_features = gamma_hat.shape[0]
    log_norm = -0.5 * n * np.log(2.0 * np.pi * delta_hat)
    half_inv_delta = 0.5 / delta_hat
    targets = np.stack([gamma_hat, delta_hat, np.ones(n_features)], axis=1)
    gamma_star = np.empty(n_features)
    delta_star = np.empty(n_features)
    rows_per_block = max(1, budget // max(n_features, 1))
    for start in range(0, n_features, rows_per_block):
        rows = np.arange(start, min(start + rows_per_block, n_features))
        loglik = gamma_hat[rows, None] - gamma_hat[None, :]
        np.square(loglik, out=loglik)
        loglik *= n
        loglik += ss[rows, None]
        loglik *= half_inv_delta
        np.subtract(log_norm, loglik, out=loglik)
        loglik[np.arange(rows.size), rows] = -np.inf  # leave feature i out of its own prior
        loglik -= loglik.max(axis=1, keepdims=True)
        np.exp(loglik, out=loglik)
        sums = loglik @ targets
        gamma_star[rows] = sums[:, 0] / sums[:, 2]
        delta_star[rows] = sums[:, 1] / sums[:, 2]
    return gamma_star, delta_star


def estimate_batch(n, mean, ss, *, eb, parametric, mean_only, usable=None):
    """Location/scale estimates of one site from its standardized moments.

    Parameters
    ----------
    n : int
        Rows of the site.
    mean, ss : ndarray of shape (n_features,)
        Mean and sum of squared deviations of the site's standardized data.
    eb, parametric, mean_only : bool
    usable : ndarray of bool or None
        Features that take part (zero-variance features get gamma 0 and delta 1 and are left
        out of the priors).

    Returns
    -------
    BatchEstimates
    """
    n_features = mean.shape[0]
    usable = np.ones(n_features, dtype=bool) if usable is None else usable
    gamma_hat = np.where(usable, mean, 0.0)
    if mean_only:
        delta_hat = np.ones(n_features)
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            delta_hat = ss / (n - 1)
        delta_hat = np.where(usable & (delta_hat != 0), delta_hat, 1.0)
    est = BatchEstimates(gamma_hat, delta_hat, gamma_hat.copy(), delta_hat.copy())
    if not eb or not usable.any():
        return est

    g, d, s = gamma_hat[usable], delta_hat[usable], ss[usable]
    est.gamma_bar, est.t2 = location_prior(g)
    if not mean_only:
        est.a_prior, est.b_prior = scale_prior(d)
    if parametric:
        if mean_only:
            g_star, d_star = postmean(g, est.gamma_bar, 1, 1, est.t2), d
        else:
            g_star, d_star = parametric_eb(n, g, d, s, est.gamma_bar, est.t2,
                                           est.a_prior, est.b_prior)
    else:
        g_star, d_star = nonparametric_eb(n, g, d, s)
    est.gamma_star[usable] = g_star
    est.delta_star[usable] = d_star
    return est


# --------------------------------------------------------------------------------------------
# Adjustment
# --------------------------------------------------------------------------------------------


def adjust(X, Z, batch_idx, model, gamma_star, delta_star, *, passthrough_rows=None,
           inverse=False, out=None):
    """Harmonize rows (or undo it with ``inverse=True``) with fitted estimates.

    ``x* = (s - gamma*_b) / sqrt(delta*_b) * sigma + alpha + z @ beta``, computed block by
    block into ``out`` (same dtype as ``X`` by default). Zero-variance features and the rows in
    ``passthrough_rows`` (the reference site's) are copied unchanged.
    """
    n_samples, n_features = X.shape
    if out is None:
        out = np.empty_like(X)
    scale = model.scale
    for block in feature_blocks(n_samples, n_features):
        location = model.location(Z, block)
        s = (_as_float64(X[:, block]) - location) / scale[block]
        gamma = gamma_star[batch_idx, block]
        sqrt_delta = np.sqrt(delta_star[batch_idx, block])
        s = s * sqrt_delta + gamma if inverse else (s - gamma) / sqrt_delta
        out[:, block] = s * scale[block] + location
    if model.zero_variance.any():
        out[:, model.zero_variance] = X[:, model.zero_variance]
    if passthrough_rows is not None and passthrough_rows.any():
        out[passthrough_rows] = X[passthrough_rows]
    return out
