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
once. Inputs are processed in blocks of features so that temporaries stay a bounded size;
float32 data are read block by block into float64, never copied whole.

Two defined behaviours differ from neuroCombat on degenerate data:

* features whose pooled variance is zero (constant features, or features explained exactly by
  site and covariates) are passed through unchanged and take no part in the priors;
* the non-parametric likelihoods are computed in log space and normalized by their largest
  value, so they never underflow to 0/0. neuroCombat multiplies the densities themselves, about
  ``exp(-1.42 n)`` for standardized data: below the smallest double once a site has more than
  ~500 subjects, where its estimates become NaN (see ``docs/performance.rst``).

Performance: fitting reads each block of features once (coefficients, residuals and per-site
residual sums together), adjusting reads it once more; blocks of ~2 MiB stay in cache and run on
parallel threads with the BLAS held to one thread. Memory beyond the output is a few arrays of
one value per feature and site, plus one scratch block per thread.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from threadpoolctl import ThreadpoolController

# Elements (float64) of one temporary block: 256 Ki elements = 2 MiB, so that a block and its
# few temporaries stay in a core's L2 cache while every step of the computation runs on it.
BLOCK_ELEMENTS = 1 << 18
# A feature whose pooled variance is below this fraction of its mean square is constant.
_ZERO_VARIANCE_RTOL = (1e3 * np.finfo(np.float64).eps) ** 2
# sva / neuroCombat convergence threshold of the parametric EB iteration.
PARAMETRIC_TOL = 1e-4
PARAMETRIC_MAX_ITER = 10_000
# Log-weights of the non-parametric EB below this (relative to the largest) are clamped to it.
_LOG_WEIGHT_FLOOR = -700.0


def feature_blocks(n_rows, n_features, budget=None):
    """Yield slices over features so that a block of ``n_rows`` rows holds ~``budget`` values."""
    step = _feature_step(n_rows, budget)
    for start in range(0, n_features, step):
        yield slice(start, min(start + step, n_features))


def _feature_step(n_rows, budget=None, n_features=None):
    """Features per block, so that a block of ``n_rows`` rows holds ~``budget`` values
    (default ``BLOCK_ELEMENTS``), and no more features than there are, so that small inputs get
    small scratch buffers."""
    step = max(1, (budget or BLOCK_ELEMENTS) // max(n_rows, 1))
    return step if n_features is None else max(1, min(step, n_features))


def _as_float64(block):
    return np.asarray(block, dtype=np.float64)


def _run_blocks(function, n_items, step, scratch_size):
    """Call ``function(block, scratch)`` for slices ``block`` of ``range(n_items)``, in parallel.

    Blocks are dealt to up to ``os.cpu_count()`` threads (numpy releases the GIL inside ufuncs
    and matrix products); each thread allocates one float64 ``scratch`` array of
    ``scratch_size`` elements and reuses it for all its blocks, so no block allocates (and
    page-faults) fresh memory. Each call must write only its own slice of the outputs. The BLAS
    library is held to one thread meanwhile: its threads on these small products only wait for
    each other.
    """
    blocks = [slice(start, min(start + step, n_items)) for start in range(0, n_items, step)]
    n_workers = max(1, min(os.cpu_count() or 1, len(blocks)))

    def work(worker):
        scratch = np.empty(scratch_size)
        for block in blocks[worker::n_workers]:
            function(block, scratch)

    if len(blocks) <= 1:
        work(0)
        return
    with _blas_controller().limit(limits=1, user_api="blas"):
        if n_workers == 1:
            work(0)
            return
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            for _ in pool.map(work, range(n_workers)):
                pass


@functools.cache
def _blas_controller():
    """The thread-pool controller, inspected once (about 2 ms; limiting it after is ~10 us)."""
    return ThreadpoolController()


def _scratch_view(scratch, shape):
    """The first ``prod(shape)`` elements of a scratch array, as an array of ``shape``."""
    return scratch[:math.prod(shape)].reshape(shape)


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


def fit_location_scale(X, batch_idx, n_batches, Z, ref=None):
    """Least-squares fit of site and covariate effects, and the standardized site moments.

    One pass over ``X``: for each block of features the least-squares coefficients, the
    residuals ``r = x - [onehot | Z] @ coef`` and their per-site sums and sums of squares are
    computed while the block is in cache. Since the design holds each site's intercept, the
    residuals of a site sum to zero, and the standardized data
    ``s = (x - alpha - z @ beta) / sigma`` of site ``k`` is ``(coef_k - alpha + r) / sigma``:
    its mean and centred sum of squares follow from those of ``r`` without another pass.

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
    model : StandardizationModel
    mean, ss : ndarrays of shape (n_batches, n_features)
        Per site, mean and sum of squared deviations of the standardized data (what
        :func:`standardized_moments` gives for the fitted rows).
    """
    n_samples, n_features = X.shape
    onehot = batch_onehot(batch_idx, n_batches)
    design = np.hstack([onehot, Z])
    gram = design.T @ design
    coef = np.empty((design.shape[1], n_features))
    resid_sum = np.empty((n_batches, n_features))
    resid_sq = np.empty((n_batches, n_features))

    def fit_block(block, scratch):
        shape = (n_samples, block.stop - block.start)
        values = X[:, block]
        if values.dtype != np.float64:  # float32 data: converted one block at a time
            converted = _scratch_view(scratch[scratch.size // 2:], shape)
            converted[...] = values
            values = converted
        coef[:, block] = np.linalg.solve(gram, design.T @ values)
        resid = np.matmul(design, coef[:, block], out=_scratch_view(scratch, shape))
        np.subtract(values, resid, out=resid)
        resid_sum[:, block] = onehot.T @ resid
        np.square(resid, out=resid)
        resid_sq[:, block] = onehot.T @ resid

    step = _feature_step(n_samples, n_features=n_features)
    _run_blocks(fit_block, n_features, step, 2 * n_samples * step)

    counts = np.bincount(batch_idx, minlength=n_batches)
    if ref is None:
        grand_mean = (counts / n_samples) @ coef[:n_batches]
        var_pooled = resid_sq.sum(axis=0) / n_samples
    else:
        grand_mean = coef[ref].copy()
        var_pooled = resid_sq[ref] / counts[ref]
    # Mean square of the data over all rows (fitted values are orthogonal to residuals): the
    # scale against which a pooled variance counts as zero.
    mean_square = (np.einsum("pg,pg->g", gram @ coef, coef) + resid_sq.sum(axis=0)) / n_samples
    zero_variance = var_pooled <= _ZERO_VARIANCE_RTOL * mean_square
    var_pooled[zero_variance] = 0.0
    model = StandardizationModel(grand_mean, coef[n_batches:].copy(), var_pooled, zero_variance)

    resid_mean = resid_sum / counts[:, None]  # zero up to rounding
    scale = model.scale
    mean = (coef[:n_batches] - grand_mean + resid_mean) / scale
    ss = (resid_sq - counts[:, None] * resid_mean**2) / scale**2
    return model, mean, ss


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


def nonparametric_eb(n, gamma_hat, delta_hat, ss, budget=None):
    """Non-parametric EB: average the other features' (gamma, delta) weighted by likelihood.

    For feature ``i`` the weight of feature ``j != i`` is the normal likelihood of ``i``'s data
    under ``(gamma_hat_j, delta_hat_j)``, which depends on the data only through ``n``, the mean
    ``m_i`` and the centred sum of squares ``ss_i``::

        log L_ij = -n/2 log(2 pi d_j) - (ss_i + n (m_i - g_j)**2) / (2 d_j)

    Expanding the square makes the G x G matrix a rank-3 product
    ``[ss_i + n m_i**2, m_i, 1] @ [-1/(2 d_j), n g_j / d_j, -n/2 log(2 pi d_j) - n g_j**2/(2 d_j)]``,
    one matrix product per block of rows (``m`` and ``g`` are centred on the mean of
    ``gamma_hat`` first, so the expansion loses no precision that matters). The matrix is never
    held whole: blocks of rows of bounded size run on parallel threads and are normalized with a
    log-sum-exp, so no likelihood underflows (neuroCombat's give 0/0 = NaN there).
    """
    n_features = gamma_hat.shape[0]
    centred = gamma_hat - gamma_hat.mean()
    half_inv_delta = 0.5 / delta_hat
    data_terms = np.stack([ss + n * centred**2, centred, np.ones(n_features)], axis=1)
    param_terms = np.stack([
        -half_inv_delta,
        2.0 * n * centred * half_inv_delta,
        -0.5 * n * np.log(2.0 * np.pi * delta_hat) - n * centred**2 * half_inv_delta,
    ])
    targets = np.stack([gamma_hat, delta_hat, np.ones(n_features)])
    gamma_star = np.empty(n_features)
    delta_star = np.empty(n_features)

    def block_eb(rows, scratch):
        n_rows = rows.stop - rows.start
        loglik = np.matmul(data_terms[rows], param_terms,
                           out=_scratch_view(scratch, (n_rows, n_features)))
        lowest = loglik.min()
        # Leave feature i out of its own prior (and out of the maximum).
        diagonal = np.arange(n_rows), np.arange(rows.start, rows.stop)
        loglik[diagonal] = -np.inf
        largest = loglik.max(axis=1, keepdims=True)
        loglik -= largest
        if lowest - largest.max() < _LOG_WEIGHT_FLOOR:
            # Weights below exp(-700) are < 1e-304 of the largest, nothing at double
            # precision; clamping them keeps exp off its slow subnormal path (~25x slower).
            np.maximum(loglik, _LOG_WEIGHT_FLOOR, out=loglik)
            loglik[diagonal] = -np.inf
        np.exp(loglik, out=loglik)
        sums = targets @ loglik.T
        gamma_star[rows] = sums[0] / sums[2]
        delta_star[rows] = sums[1] / sums[2]

    step = _feature_step(n_features, budget, n_features)
    _run_blocks(block_eb, n_features, step, step * n_features)
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

    ``x* = (s - gamma*_b) / sqrt(delta*_b) * sigma + alpha + z @ beta``. With the location
    ``mu = alpha + z @ beta`` this is ``x* = a_b * x + (1 - a_b) * mu + c_b`` with
    ``a_b = 1 / sqrt(delta*_b)`` and ``c_b = -gamma*_b * sigma * a_b`` (``a_b = sqrt(delta*_b)``,
    ``c_b = gamma*_b * sigma`` for the inverse), so each block of features costs one row
    gather, one product with the data and one matrix product with the per-site design
    ``[onehot_b * (1, z)]``. Computed block by block into ``out`` (same dtype as ``X`` by
    default). Zero-variance features and the rows in ``passthrough_rows`` (the reference
    site's) are copied unchanged.
    """
    n_samples, n_features = X.shape
    n_batches = gamma_star.shape[0]
    if out is None:
        out = np.empty_like(X)
    scale = model.scale
    root = np.sqrt(delta_star)
    if inverse:
        slope, shift = root, gamma_star * scale
    else:
        slope, shift = 1.0 / root, -gamma_star * scale / root
    # Location terms [1 | z] @ [alpha; beta] times (1 - a_b), plus c_b, as one product.
    z1 = np.hstack([np.ones((n_samples, 1)), Z])
    site_design = (batch_onehot(batch_idx, n_batches)[:, :, None] * z1[:, None, :]).reshape(
        n_samples, -1)
    coefs = np.vstack([model.grand_mean[None, :], model.beta])  # (1 + n_covariates, n_features)
    weights = ((1.0 - slope)[:, None, :] * coefs[None, :, :])
    weights[:, 0, :] += shift
    weights = weights.reshape(-1, n_features)
    keep_rows = None if passthrough_rows is None or not passthrough_rows.any() else (
        passthrough_rows[:, None])
    keep_columns = model.zero_variance

    def adjust_block(block, scratch):
        shape = (n_samples, block.stop - block.start)
        values, result = X[:, block], out[:, block]
        # mode="clip" writes straight into the scratch ("raise" would buffer); the indices are
        # valid by construction.
        scaled = np.take(slope[:, block], batch_idx, axis=0, mode="clip",
                         out=_scratch_view(scratch[:scratch.size // 2], shape))
        np.multiply(scaled, values, out=scaled)
        location = np.matmul(site_design, weights[:, block],
                             out=_scratch_view(scratch[scratch.size // 2:], shape))
        np.add(scaled, location, out=result, casting="same_kind")
        if keep_rows is not None:
            np.copyto(result, values, where=keep_rows)
        keep = keep_columns[block]
        if keep.any():
            result[:, keep] = values[:, keep]

    step = _feature_step(n_samples, n_features=n_features)
    _run_blocks(adjust_block, n_features, step, 2 * n_samples * step)
    return out
