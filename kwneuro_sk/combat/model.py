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

* constant features (whose residual standard deviation is at the floating-point resolution of
  their values: exactly constant, or explained exactly by site and covariates) are passed
  through unchanged and take no part in the priors;
* the non-parametric likelihoods are computed in log space and normalized by their largest
  value, so they never underflow to 0/0. neuroCombat multiplies the densities themselves, about
  ``exp(-1.42 n)`` for standardized data: below the smallest double once a site has more than
  ~500 subjects, where its estimates become NaN (see ``docs/performance.rst``).

Features of any magnitude give exact results: those beyond ``2**+-400`` are scaled by an exact
power of two inside the fitting loop (see :func:`fit_location_scale`).

Performance: fitting reads each block of features once (coefficients, residuals and per-site
residual sums together), adjusting reads it once more; blocks of ~1 MiB stay in cache and run on
``n_jobs`` threads (a resolved positive int; results do not depend on it) with the BLAS held to
one thread. Memory beyond the output is a few arrays of one value per feature and site, plus
one scratch block per thread.
"""

from __future__ import annotations

import functools
import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from threadpoolctl import ThreadpoolController

# Elements (float64) of one temporary block: 128 Ki elements = 1 MiB, so that a block and its
# few temporaries stay in a core's L2 cache while every step of the computation runs on it,
# and the scratch stays a small fraction of the input.
BLOCK_ELEMENTS = 1 << 17
# Elements of one block of rows of the non-parametric EB's G x G log-likelihoods: 1 MiB, which
# measured fastest (blocks of 2 MiB and of 256 KiB both cost ~15% more per element).
EB_BLOCK_ELEMENTS = 1 << 17
# Features whose largest absolute value lies within 2**+-_SAFE_EXPONENT are fitted as they are;
# others are scaled by an exact power of two in the block loop.
_SAFE_EXPONENT = 400
# A feature is constant when the standard deviation of its residuals (what is left after the
# site and covariate effects are removed) is at most this many units of the floating-point
# resolution of its values (eps times its largest absolute value): rounding noise, not signal.
_CONSTANT_RESOLUTION = 32.0
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


def _run_blocks(function, n_items, step, scratch_size, n_jobs=1):
    """Call ``function(block, scratch)`` for slices ``block`` of ``range(n_items)``.

    Blocks are dealt to ``n_jobs`` threads (an already resolved positive int; numpy releases
    the GIL inside ufuncs and matrix products). The assignment of blocks does not depend on
    ``n_jobs`` and each block is computed alone, so the results are bit-identical for any
    ``n_jobs``. Each thread allocates one float64 ``scratch`` array of ``scratch_size``
    elements and reuses it for all its blocks. Each call must write only its own slice of the
    outputs. The BLAS library is held to one thread meanwhile: its threads on these small
    products only wait for each other, and ``n_jobs`` is the whole thread budget.
    """
    blocks = [slice(start, min(start + step, n_items)) for start in range(0, n_items, step)]
    n_workers = max(1, min(int(n_jobs), len(blocks)))

    def work(worker):
        scratch = np.empty(scratch_size)
        for block in blocks[worker::n_workers]:
            function(block, scratch)

    with single_blas_thread():
        if n_workers == 1:
            work(0)
            return
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            for _ in pool.map(work, range(n_workers)):
                pass


@functools.cache
def _blas_controller():
    """The thread-pool controller, inspected once (6-10 ms, the first limit included; limiting
    it after is ~70 us). Made at import, so that the first call costs what later calls do."""
    controller = ThreadpoolController()
    with controller.limit(limits=1, user_api="blas"):
        pass
    return controller


_blas_controller()


def single_blas_thread():
    """A context in which BLAS runs on one thread (thin matrix products, and products inside
    threads of our own: a BLAS pool only adds synchronisation there)."""
    return _blas_controller().limit(limits=1, user_api="blas")


def _scratch_view(scratch, shape):
    """The first ``prod(shape)`` elements of a scratch array, as an array of ``shape``."""
    return scratch[: math.prod(shape)].reshape(shape)


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
    # sigma itself, exact also where sigma**2 over- or underflows (features beyond ~1e154 or
    # below ~1e-154); None: computed from var_pooled.
    sigma: np.ndarray | None = None

    @property
    def scale(self):
        """sigma, with 1 for zero-variance features so that division is always defined."""
        sigma = np.sqrt(self.var_pooled) if self.sigma is None else self.sigma
        return np.where(self.zero_variance, 1.0, sigma)

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


def unit_columns(A):
    """``A`` with each column scaled to unit norm (zero columns left zero), for rank tests:
    the singular values of ``A`` itself depend on the columns' units (a scan time in Unix
    milliseconds drowns a site indicator), those of the scaled columns only on their
    directions."""
    norms = np.linalg.norm(A, axis=0)
    return np.divide(A, norms, out=np.zeros(A.shape), where=norms > 0)


def fit_location_scale(X, batch_idx, n_batches, Z, ref=None, *, n_jobs=1):
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
    n_jobs : int, default=1
        Threads (a positive int, already resolved).

    Each feature beyond ``2**+-400`` is scaled by an exact power of two (``2**-e``, with ``e``
    the binary exponent of its largest absolute value) inside the block loop, so that squares
    neither overflow nor underflow whatever the magnitude of the data: since such scaling is
    exact in floating point, the results equal those of the unscaled computation wherever that
    one neither overflows nor underflows, and stay exact beyond (``sigma`` is kept as such, since
    ``sigma**2`` may not be representable).

    A feature is *constant* (``zero_variance``, passed through unchanged) when the standard
    deviation of its residuals is at most ``_CONSTANT_RESOLUTION`` times ``eps * max|x|``: what
    is left after removing the site and covariate effects is rounding noise of its values.

    Returns
    -------
    model : StandardizationModel
    mean, ss : ndarrays of shape (n_batches, n_features)
        Per site, mean and sum of squared deviations of the standardized data (what
        :func:`standardized_moments` gives for the fitted rows).
    """
    n_samples, n_features = X.shape
    onehot = batch_onehot(batch_idx, n_batches)
    # Covariates centred (the site intercepts absorb their means, restored in grand_mean
    # below): the normal equations then keep their digits whatever the covariates' offset
    # (a scan time of 1.7e12 ms, 1e8 + age), as the centred statistics of partial_fit do.
    shift = Z.mean(axis=0)
    design = np.hstack([onehot, Z - shift])
    gram = design.T @ design
    coef = np.empty((design.shape[1], n_features))
    resid_sum = np.empty((n_batches, n_features))
    resid_sq = np.empty((n_batches, n_features))
    exponent = np.empty(n_features, dtype=np.int64)  # x is handled as 2**e * (x * 2**-e)
    magnitude = np.empty(n_features, dtype=np.int64)  # max|x| < 2**magnitude

    def fit_block(block, scratch):
        shape = (n_samples, block.stop - block.start)
        values = X[:, block]
        largest = np.maximum(values.max(axis=0), -values.min(axis=0)).astype(np.float64)
        # (at least -1022, so that 2**-e is finite also for subnormal data)
        magnitude[block] = np.maximum(np.frexp(largest)[1], -1022)
        # Features within 2**+-400 need no scaling (their squares neither overflow nor
        # underflow), so ordinary data are read as they are.
        exponent[block] = np.where(np.abs(magnitude[block]) <= _SAFE_EXPONENT, 0, magnitude[block])
        if values.dtype != np.float64 or exponent[block].any():
            # float32 data are converted one block at a time, together with the scaling.
            values = np.multiply(
                values,
                np.ldexp(1.0, -exponent[block]),
                out=_scratch_view(scratch[scratch.size // 2 :], shape),
            )
        coef[:, block] = np.linalg.solve(gram, design.T @ values)
        resid = np.matmul(design, coef[:, block], out=_scratch_view(scratch, shape))
        np.subtract(values, resid, out=resid)
        resid_sum[:, block] = onehot.T @ resid
        np.square(resid, out=resid)
        resid_sq[:, block] = onehot.T @ resid

    step = _feature_step(n_samples, n_features=n_features)
    _run_blocks(fit_block, n_features, step, 2 * n_samples * step, n_jobs)

    counts = np.bincount(batch_idx, minlength=n_batches)
    # Everything below in the scaled units first (exact), then scaled back by 2**e.
    if ref is None:
        grand_mean = (counts / n_samples) @ coef[:n_batches]
        var_scaled = resid_sq.sum(axis=0) / n_samples
    else:
        grand_mean = coef[ref].copy()
        var_scaled = resid_sq[ref] / counts[ref]
    sigma_scaled = np.sqrt(var_scaled)
    resolution = np.ldexp(
        _CONSTANT_RESOLUTION * np.finfo(np.float64).eps, magnitude - exponent
    )  # of the values (constant_resolution), scaled
    zero_variance = sigma_scaled <= resolution
    var_scaled[zero_variance] = 0.0
    sigma_scaled[zero_variance] = 0.0
    scale_scaled = np.where(zero_variance, 1.0, sigma_scaled)

    resid_mean = resid_sum / counts[:, None]  # zero up to rounding
    mean = (coef[:n_batches] - grand_mean + resid_mean) / scale_scaled
    ss = (resid_sq - counts[:, None] * resid_mean**2) / scale_scaled**2
    grand_mean -= shift @ coef[n_batches:]  # alpha of the uncentred covariates

    with np.errstate(over="ignore", under="ignore"):
        # sigma**2 is inf (or loses digits) for features beyond ~1e154 (below ~1e-154):
        # reported as such, while sigma itself is exact.
        var_pooled = np.ldexp(var_scaled, 2 * exponent)
    model = StandardizationModel(
        np.ldexp(grand_mean, exponent),
        np.ldexp(coef[n_batches:], exponent),
        var_pooled,
        zero_variance,
        sigma=np.ldexp(sigma_scaled, exponent),
    )
    return model, mean, ss


def constant_resolution(largest):
    """The residual standard deviation at or below which a feature whose largest absolute
    value is ``largest`` counts as constant: ``_CONSTANT_RESOLUTION * eps`` times the power of
    two above ``largest`` (the rounding noise of its values)."""
    magnitude = np.maximum(np.frexp(np.asarray(largest, dtype=np.float64))[1], -1022)
    return np.ldexp(_CONSTANT_RESOLUTION * np.finfo(np.float64).eps, magnitude)


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
            change = max(
                np.max(np.abs(g_new - g_old) / g_old), np.max(np.abs(d_new - d_old) / d_old)
            )
            g_old, d_old = g_new, d_new
            if not change > PARAMETRIC_TOL:
                break
        else:
            warnings.warn(
                f"parametric empirical Bayes did not converge in {PARAMETRIC_MAX_ITER} iterations",
                RuntimeWarning,
                stacklevel=3,
            )
    return g_new, d_new


def nonparametric_eb(n, gamma_hat, delta_hat, ss, budget=None, *, n_jobs=1):
    """Non-parametric EB: average the other features' (gamma, delta) weighted by likelihood.

    For feature ``i`` the weight of feature ``j != i`` is the normal likelihood of ``i``'s data
    under ``(gamma_hat_j, delta_hat_j)``, which depends on the data only through ``n``, the mean
    ``m_i`` and the centred sum of squares ``ss_i``::

        log L_ij = -n/2 log(2 pi d_j) - (ss_i + n (m_i - g_j)**2) / (2 d_j)

    Expanding the square makes the G x G matrix a rank-3 product ``[ss_i + n m_i**2, m_i, 1]
    @ [-1/(2 d_j), n g_j / d_j, -n/2 log(2 pi d_j) - n g_j**2/(2 d_j)]``,
    one matrix product per block of rows (``m`` and ``g`` are centred on the mean of
    ``gamma_hat`` first, so the expansion loses no precision that matters). The matrix is never
    held whole: blocks of rows of bounded size run on ``n_jobs`` threads.

    Each row is shifted by an upper bound of its log-likelihoods before ``exp``: the maximum
    of the normal likelihood over all ``(g, d)``, ``-n/2 (log(2 pi ss_i / n) + 1)``. The shift
    is folded into the matrix product as a fourth term, so a block costs one product, one
    ``exp`` and one product for the weighted sums (no pass for a row maximum). Log-weights
    below ``-700`` are clamped there (only when a cheap per-row bound says some may be), which
    keeps ``exp`` off its slow path for subnormal results. A row whose weights all come out
    below ``exp(-600)`` (its nearest feature far from the bound) is recomputed normalized by
    its exact largest log-likelihood (a log-sum-exp), so no row underflows to 0/0
    (neuroCombat's give NaN there).
    """
    n_features = gamma_hat.shape[0]
    centred = gamma_hat - gamma_hat.mean()
    half_inv_delta = 0.5 / delta_hat
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = -0.5 * n * (np.log(2.0 * np.pi * ss / n) + 1.0)
    exact_rows = ~np.isfinite(bound)
    bound[exact_rows] = 0.0
    data_terms = np.stack([ss + n * centred**2, centred, np.ones(n_features), -bound], axis=1)
    param_terms = np.stack(
        [
            -half_inv_delta,
            2.0 * n * centred * half_inv_delta,
            -0.5 * n * np.log(2.0 * np.pi * delta_hat) - n * centred**2 * half_inv_delta,
            np.ones(n_features),
        ]
    )
    # A lower bound of each row's shifted log-likelihoods, from the extremes of each term.
    low = (
        data_terms[:, 0] * param_terms[0].min()
        + np.minimum(
            data_terms[:, 1] * param_terms[1].min(), data_terms[:, 1] * param_terms[1].max()
        )
        + param_terms[2].min()
        - bound
    )
    targets = np.stack([gamma_hat, delta_hat, np.ones(n_features)], axis=1)
    gamma_star = np.empty(n_features)
    delta_star = np.empty(n_features)
    smallest_sum = math.exp(_LOG_WEIGHT_FLOOR + 100.0)

    def block_eb(rows, scratch):
        n_rows = rows.stop - rows.start
        weights = np.matmul(
            data_terms[rows], param_terms, out=_scratch_view(scratch, (n_rows, n_features))
        )
        if low[rows].min() < _LOG_WEIGHT_FLOOR:
            np.maximum(weights, _LOG_WEIGHT_FLOOR, out=weights)
        np.exp(weights, out=weights)
        weights[np.arange(n_rows), np.arange(rows.start, rows.stop)] = 0.0  # i not in its prior
        sums = weights @ targets
        with np.errstate(divide="ignore", invalid="ignore"):
            gamma_star[rows] = sums[:, 0] / sums[:, 2]
            delta_star[rows] = sums[:, 1] / sums[:, 2]
        far = ~(sums[:, 2] >= smallest_sum)
        exact_rows[rows] |= far

    step = _feature_step(n_features, budget or EB_BLOCK_ELEMENTS, n_features)
    _run_blocks(block_eb, n_features, step, step * n_features, n_jobs)
    for i in np.flatnonzero(exact_rows):  # rare: normalized by the exact maximum
        loglik = data_terms[i, :3] @ param_terms[:3]
        loglik[i] = -np.inf
        loglik -= loglik.max()
        weights = np.exp(np.maximum(loglik, _LOG_WEIGHT_FLOOR))
        weights[i] = 0.0
        gamma_star[i], delta_star[i], total = weights @ targets
        gamma_star[i] /= total
        delta_star[i] /= total
    return gamma_star, delta_star


def estimate_batch(n, mean, ss, *, eb, parametric, mean_only, usable=None, n_jobs=1):
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
    n_jobs : int, default=1
        Threads of the non-parametric EB (a positive int, already resolved).

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
            g_star, d_star = parametric_eb(
                n, g, d, s, est.gamma_bar, est.t2, est.a_prior, est.b_prior
            )
    else:
        g_star, d_star = nonparametric_eb(n, g, d, s, n_jobs=n_jobs)
    est.gamma_star[usable] = g_star
    est.delta_star[usable] = d_star
    return est


# --------------------------------------------------------------------------------------------
# Adjustment
# --------------------------------------------------------------------------------------------


def adjust(
    X,
    Z,
    batch_idx,
    model,
    gamma_star,
    delta_star,
    *,
    passthrough_rows=None,
    inverse=False,
    out=None,
    n_jobs=1,
):
    """Harmonize rows (or undo it with ``inverse=True``) with fitted estimates.

    ``x* = (s - gamma*_b) / sqrt(delta*_b) * sigma + alpha + z @ beta``. With the location
    ``mu = alpha + z @ beta`` this is ``x* = a_b * x + (1 - a_b) * mu + c_b`` with
    ``a_b = 1 / sqrt(delta*_b)`` and ``c_b = -gamma*_b * sigma * a_b`` (``a_b = sqrt(delta*_b)``,
    ``c_b = gamma*_b * sigma`` for the inverse), so each block of features costs one row
    gather, one product with the data and one matrix product with the per-site design
    ``[onehot_b * (1, z)]``. Computed block by block into ``out`` (same dtype as ``X`` by
    default), on ``n_jobs`` threads. Zero-variance features and the rows in
    ``passthrough_rows`` (the reference site's) are copied unchanged.
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
        n_samples, -1
    )
    coefs = np.vstack([model.grand_mean[None, :], model.beta])  # (1 + n_covariates, n_features)
    weights = (1.0 - slope)[:, None, :] * coefs[None, :, :]
    weights[:, 0, :] += shift
    weights = weights.reshape(-1, n_features)
    keep_rows = (
        None
        if passthrough_rows is None or not passthrough_rows.any()
        else (passthrough_rows[:, None])
    )
    keep_columns = model.zero_variance

    def adjust_block(block, scratch):
        shape = (n_samples, block.stop - block.start)
        values, result = X[:, block], out[:, block]
        # mode="clip" writes straight into the scratch ("raise" would buffer); the indices are
        # valid by construction.
        scaled = np.take(
            slope[:, block],
            batch_idx,
            axis=0,
            mode="clip",
            out=_scratch_view(scratch[: scratch.size // 2], shape),
        )
        np.multiply(scaled, values, out=scaled)
        location = np.matmul(
            site_design, weights[:, block], out=_scratch_view(scratch[scratch.size // 2 :], shape)
        )
        np.add(scaled, location, out=result, casting="same_kind")
        if keep_rows is not None:
            np.copyto(result, values, where=keep_rows)
        keep = keep_columns[block]
        if keep.any():
            result[:, keep] = values[:, keep]

    step = _feature_step(n_samples, n_features=n_features)
    _run_blocks(adjust_block, n_features, step, 2 * n_samples * step, n_jobs)
    return out
