"""Longitudinal ComBat (Beer et al. 2020): a linear mixed model per feature, for all features at
once.

The covariate model of longitudinal ComBat is, for feature ``v`` and visit ``j`` of subject
``s`` at site ``b``::

    y_jv = c_bv + z_j @ beta_v + u_sv + t_j * w_sv + e_jv,     e ~ N(0, sigma_v**2)

with a random intercept ``u_s`` per subject (and, with a random slope, ``w_s`` on the
continuous covariate ``t``), ``(u_s, w_s) ~ N(0, sigma_v**2 * L_v L_v')``: lme4's
``y ~ covariates + site + (1 | subject)`` or ``(1 + t | subject)``, fitted by REML.

Why no per-feature optimizer is needed
--------------------------------------
With ``psi = L L'`` the relative covariance and ``V_s = I + Z_s psi Z_s'`` (``Z_s = [1 | t]``
the subject's random-effect design), the REML criterion profiled over ``beta`` and
``sigma`` is (lme4's, up to a constant)::

    f(psi) = (n - p) log r(psi) + sum_s log|V_s| + log|X' V^-1 X|,
    r(psi) = min_beta (y - X beta)' V^-1 (y - X beta)

where ``X`` is the fixed design ``[site one-hot | covariates]`` (``p`` columns). Only
``r`` depends on the feature, and it does through per-subject sums: ``V_s^-1 = I - Z_s W_s
Z_s'`` with ``W_s = psi (I + Z_s' Z_s psi)^-1``, so every quadratic form is a sum over subjects
of products of ``Z_s' y_s`` and ``Z_s' X_s``. For a random intercept ``W_s`` depends only on
the subject's number of visits ``k``: the sums collapse to one term per distinct ``k``, and
one evaluation of ``f`` and of its exact derivative for every feature costs
``O(K p**2 n_features)`` whatever the number of rows. The variance ratio of every feature is
then found at once: ``f`` on a common grid of 62 ratios (``0`` and ``1e-6 .. 1e6``), then
the zero of the analytic derivative inside each feature's bracket (Illinois regula falsi,
bisection as fallback) to a relative step of ``1e-15`` (lme4's bobyqa stops at a trust radius
of ``2e-7`` in ``sqrt(psi)``). A feature
whose criterion rises from ``psi = 0`` has the boundary (singular) fit ``psi = 0``, which is
ordinary least squares, as lme4 reports it.

The random slope's ``2 x 2`` ``psi`` is found the same way for all features at once: the
criterion and its analytic gradient are evaluated for every feature in one pass of array
operations over the subjects (``W_s`` in closed form), and minimized over lme4's Cholesky
parameters ``L`` (from lme4's start ``L = I``) by BFGS run in lockstep over features, until
the step is below ``1e-13`` relative, the gradient below ``1e-11`` or the gain below ``1e-15``
of the criterion (``1e-12`` within ``1e-5`` of the boundary). The criterion depends on
``L L'`` only, so the search is unconstrained; a fit whose Cholesky diagonal has an entry
below ``1e-4`` is reported singular, as lme4's ``isSingular`` does. Where lme4's bounded
search stops on the boundary ``L_11 = 0`` at a saddle of the criterion, this search can go on
to a lower criterion (and so give another fit).

After the fit, longitudinal ComBat standardizes ``(y - fitted + a_b) / sigma``, where
``fitted`` includes the subject's random effects and ``a_b = c_b - sum_b' n_b' c_b' / n`` are
the site effects made to sum to zero weighted by site size, and shrinks the per-site means and
variances of the standardized data with 30 iterations of its own parametric empirical Bayes
(:func:`longitudinal_eb`); both follow ``R/longCombat.R`` (jcbeer/longCombat).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.sparse

from kwneuro_sk.combat import model
from kwneuro_sk.combat._inputs import row_labels

# Variance ratios (psi = sigma_subject**2 / sigma**2) of the common grid: 0 and a geometric
# grid, 5 points per decade.
_GRID = np.concatenate([[0.0], np.logspace(-6.0, 6.0, 61)])
# Largest number of steps of the root search of the derivative inside a grid bracket (width
# ratio ~2.5; bisection alone would reach 1e-16 relative in 56).
_MAX_ROOT_STEPS = 100
# lme4's isSingular tolerance: a Cholesky diagonal entry of the random-effect covariance
# (relative to sigma) below it is a boundary (singular) fit.
_SINGULAR_TOL = 1e-4
# Iterations of longitudinal ComBat's parametric empirical Bayes (longCombat's niter).
LONGITUDINAL_EB_ITERATIONS = 30
# Features per block of the mixed-model fit (bounds the per-feature p x p temporaries).
_BLOCK_FEATURES = 4096


@dataclass
class MixedModelFit:
    """Per-feature REML fits of the mixed model, for a block of features or all of them."""

    coef: np.ndarray  # (p, V) fixed effects on the design [site one-hot | covariates]
    sigma: np.ndarray  # (V,) residual standard deviation (REML, or MSR if asked)
    sigma_reml: np.ndarray  # (V,) REML residual standard deviation
    cov: np.ndarray  # (q, q, V) random-effect covariance relative to sigma_reml**2
    random_effects: np.ndarray  # (n_subjects, q, V) BLUPs (in units of the features)
    zero_variance: np.ndarray  # (V,) bool
    boundary: np.ndarray  # (V,) bool: singular fit (a variance component at 0)


def subject_codes(subjects, n_rows, column):
    """Subject labels of the rows, checked: ``(labels_sorted, code_of_each_row)``."""
    values = row_labels(subjects, n_rows, kind="subject", argument=f"subject column {column!r}")
    try:
        labels, codes = np.unique(values, return_inverse=True)
    except TypeError as exc:
        raise TypeError(
            f"subject labels ({column!r}) must be of one sortable type (all strings or all numbers)"
        ) from exc
    return labels, codes.reshape(-1)


def check_longitudinal_design(codes, n_subjects, n_random, column):
    """Refuse subject structures lme4 cannot fit (with the reason)."""
    n_rows = codes.shape[0]
    if n_rows <= n_subjects:
        raise ValueError(
            f"every subject in {column!r} has a single row ({n_subjects} subjects, {n_rows} "
            "rows): a subject's random intercept cannot be told apart from the residual "
            "without repeated visits. Use CombatHarmonizer without subject_col for "
            "cross-sectional data"
        )
    if n_random > 1 and n_rows <= n_random * n_subjects:
        raise ValueError(
            f"{n_rows} rows for {n_random * n_subjects} random effects ({n_subjects} subjects x "
            f"intercept and slope): a random slope needs more visits than that (as in lme4); "
            "use random_slope=None"
        )


def _subject_sums(codes, n_subjects, values):
    """Per-subject sums of the rows of ``values`` (n_rows, k) -> (n_subjects, k)."""
    indicator = scipy.sparse.csr_matrix(
        (np.ones(codes.shape[0]), (codes, np.arange(codes.shape[0]))),
        shape=(n_subjects, codes.shape[0]),
    )
    return np.asarray(indicator @ values)


def fit_mixed_model(Y, design, codes, n_subjects, times=None, *, sigma_method="reml"):
    """REML fits of ``y ~ design + (1 | subject)`` (or ``(1 + t | subject)``) for every column
    of ``Y``, by blocks of features.

    Parameters
    ----------
    Y : ndarray of shape (n_rows, n_features)
    design : ndarray of shape (n_rows, p)
        Full-rank fixed design ``[site one-hot | covariates]``.
    codes : ndarray of int, shape (n_rows,)
        Subject index of each row.
    n_subjects : int
    times : ndarray of shape (n_rows,) or None
        Values of the random-slope covariate; None fits a random intercept only.
    sigma_method : {"reml", "msr"}
        ``"reml"``: the REML residual standard deviation; ``"msr"``: the root mean squared
        conditional residual (longCombat's ``method="MSR"``).

    Returns
    -------
    MixedModelFit
    """
    n_features = Y.shape[1]  # at least 1: the harmonizer's input checks
    parts = []
    # The BLAS is held to one thread: its threads on these small products only wait for
    # each other (10x slower on a loaded 2-core machine).
    with model.single_blas_thread():
        for start in range(0, n_features, _BLOCK_FEATURES):
            block = slice(start, min(start + _BLOCK_FEATURES, n_features))
            Yb = np.asarray(Y[:, block], dtype=np.float64)
            parts.append(_fit_block(Yb, design, codes, n_subjects, times, sigma_method))
    return MixedModelFit(
        coef=np.concatenate([f.coef for f in parts], axis=1),
        sigma=np.concatenate([f.sigma for f in parts]),
        sigma_reml=np.concatenate([f.sigma_reml for f in parts]),
        cov=np.concatenate([f.cov for f in parts], axis=2),
        random_effects=np.concatenate([f.random_effects for f in parts], axis=2),
        zero_variance=np.concatenate([f.zero_variance for f in parts]),
        boundary=np.concatenate([f.boundary for f in parts]),
    )


def _fit_block(Y, design, codes, n_subjects, times, sigma_method):
    n_rows, p = design.shape
    dof = n_rows - p
    # Ordinary least squares first: the mixed model is fitted to the OLS residuals (scaled to
    # unit variance), so the quadratic forms below subtract numbers of the size of the noise,
    # not of the feature's mean.
    Q, R = np.linalg.qr(design)
    coef_ols = scipy.linalg.solve_triangular(R, Q.T @ Y)
    Y0 = Y - design @ coef_ols
    # the residuals' root mean square, divided by their largest value first: squares of
    # features around 1e200 (or 1e-200) would overflow (underflow) float64
    peak = np.abs(Y0).max(axis=0, initial=0.0)
    peak = np.where(peak > 0, peak, 1.0)
    Y0 /= peak
    scale = np.sqrt((Y0**2).sum(axis=0) / dof) * peak
    zero = scale <= model.constant_resolution(np.abs(Y).max(axis=0, initial=0.0))
    scale = np.where(zero | (scale == 0), 1.0, scale)
    Y0 *= peak / scale
    if times is None:
        psi, sol, pwrss, random_scaled = _random_intercept(Y0, design, codes, n_subjects)
        cov = psi[None, None, :]
        boundary = psi == 0
    else:
        cov, sol, pwrss, random_scaled, boundary = _random_slope(
            Y0, design, codes, n_subjects, times
        )
    coef = coef_ols + sol * scale
    sigma_reml = np.sqrt(pwrss / dof) * scale
    random_effects = random_scaled * scale
    if sigma_method == "msr":
        fitted = design @ coef + random_rows(random_effects, codes, times)
        sigma = ((Y - fitted) / scale).std(axis=0) * scale  # scaled: no overflow
    else:
        sigma = sigma_reml
    sigma = np.where(zero, 0.0, sigma)
    sigma_reml = np.where(zero, 0.0, sigma_reml)
    random_effects[..., zero] = 0.0
    cov[..., zero] = 0.0
    return MixedModelFit(coef, sigma, sigma_reml, cov, random_effects, zero, boundary)


def random_rows(random_effects, codes, times=None):
    """Each row's random-effect contribution ``u_s + t * w_s`` (n_rows, n_features)."""
    rows = random_effects[codes, 0, :]
    if times is not None and random_effects.shape[1] > 1:
        rows = rows + times[:, None] * random_effects[codes, 1, :]
    return rows


# ----------------------------------------------------------------------------------------------
# random intercept: one variance ratio per feature, all features at once
# ----------------------------------------------------------------------------------------------


class _InterceptSums:
    """The per-visit-count sums the REML criterion of a random intercept depends on."""

    def __init__(self, Y0, design, codes, n_subjects):
        n_rows, self.p = design.shape
        self.dof = n_rows - self.p
        counts = np.bincount(codes, minlength=n_subjects)
        self.k, kidx = np.unique(counts, return_inverse=True)  # distinct visit counts
        self.kidx = kidx
        self.n_of_k = np.bincount(kidx).astype(np.float64)
        SX = _subject_sums(codes, n_subjects, design)  # (S, p)
        SY = _subject_sums(codes, n_subjects, Y0)  # (S, V)
        self.SX, self.SY = SX, SY
        K = self.k.shape[0]
        self.M = np.stack([SX[kidx == i].T @ SX[kidx == i] for i in range(K)])  # (K,p,p)
        self.Rk = np.stack([SX[kidx == i].T @ SY[kidx == i] for i in range(K)])  # (K,p,V)
        self.Qk = np.stack([(SY[kidx == i] ** 2).sum(axis=0) for i in range(K)])  # (K,V)
        self.C = (Y0**2).sum(axis=0)
        self.A = design.T @ design

    def weights(self, psi):
        """``w_k = psi / (1 + k psi)`` and its derivative, shape (K, ...) like psi."""
        denom = 1.0 + np.multiply.outer(self.k, psi)
        return psi / denom, 1.0 / denom**2

    def criterion_common(self, psi):
        """f at one ratio ``psi`` shared by all features -> (V,)."""
        w = psi / (1.0 + self.k * psi)
        H = self.A - np.einsum("k,kpq->pq", w, self.M)
        b = -np.einsum("k,kpv->pv", w, self.Rk)  # (p, V)
        sign, logdet_h = np.linalg.slogdet(H)
        if sign <= 0:  # numerically singular at an extreme ratio
            return np.full(self.C.shape, np.inf)
        pwrss = self.C - w @ self.Qk - (b * np.linalg.solve(H, b)).sum(axis=0)
        logdet = logdet_h + self.n_of_k @ np.log1p(self.k * psi)
        return self.dof * np.log(pwrss) + logdet

    def solve(self, psi, features=slice(None)):
        """Per-feature H, b, solution and PWRSS of ``features`` at their ratios ``psi``."""
        w, dw = self.weights(psi)  # (K, V)
        H = self.A[None] - np.einsum("kv,kpq->vpq", w, self.M)
        Rk, Qk = self.Rk[:, :, features], self.Qk[:, features]
        b = -np.einsum("kv,kpv->vp", w, Rk)
        Hinv = np.linalg.inv(H)
        sol = np.einsum("vpq,vq->vp", Hinv, b)
        pwrss = self.C[features] - (w * Qk).sum(axis=0) - (b * sol).sum(axis=1)
        return w, dw, Hinv, sol, pwrss

    def derivative(self, psi, features=slice(None)):
        """d f / d psi of ``features`` (all by default), each at its own ``psi``."""
        w, dw, Hinv, sol, pwrss = self.solve(psi, features)
        # sum over subjects of k of (S_y - S_x . sol)**2, without forming subject residuals
        quad = (
            self.Qk[:, features]
            - 2.0 * np.einsum("kpv,vp->kv", self.Rk[:, :, features], sol)
            + np.einsum("vp,kpq,vq->kv", sol, self.M, sol)
        )
        d_pwrss = -(dw * quad).sum(axis=0)
        d_logdet_v = (
            self.n_of_k[:, None] * self.k[:, None] / (1.0 + np.multiply.outer(self.k, psi))
        ).sum(axis=0)
        d_logdet_h = -(dw * np.einsum("vpq,kqp->kv", Hinv, self.M)).sum(axis=0)
        return self.dof * d_pwrss / pwrss + d_logdet_v + d_logdet_h


def _random_intercept(Y0, design, codes, n_subjects):
    sums = _InterceptSums(Y0, design, codes, n_subjects)
    n_features = Y0.shape[1]
    crit = np.stack([sums.criterion_common(g) for g in _GRID])  # (G, V)
    best = np.argmin(crit, axis=0)
    lo = _GRID[np.maximum(best - 1, 0)]
    hi = _GRID[np.minimum(best + 1, _GRID.size - 1)]
    at_zero = best == 0
    if at_zero.any():  # rising from psi = 0: the boundary fit, as lme4 reports it
        d0 = sums.derivative(np.zeros(n_features))
        at_zero &= d0 >= 0
    psi = _root_in_brackets(sums.derivative, lo, hi)
    psi = np.where(at_zero, 0.0, psi)
    w, _, _, sol, pwrss = sums.solve(psi)
    # BLUP: u_s = w_s * (sum of the subject's marginal residuals)
    subject_resid = sums.SY - sums.SX @ sol.T  # (S, V)
    random = (w[sums.kidx] * subject_resid)[:, None, :]
    return psi, sol.T, pwrss, random


def _root_in_brackets(derivative, lo, hi):
    """The zero of ``derivative`` (increasing through it) in each feature's ``[lo, hi]``,
    for all features at once: the Illinois variant of regula falsi (superlinear), with a
    bisection step for a feature whose bracket has no sign change, each iteration evaluating
    only the features not yet converged (a relative step below 1e-15)."""
    lo, hi = lo.copy(), hi.copy()
    g_lo, g_hi = derivative(lo), derivative(hi)
    x = 0.5 * (lo + hi)
    side = np.zeros(lo.shape, dtype=np.int8)
    todo = np.flatnonzero(np.ones(lo.shape, dtype=bool))
    for _ in range(_MAX_ROOT_STEPS):
        if todo.size == 0:
            break
        a, b, ga, gb = lo[todo], hi[todo], g_lo[todo], g_hi[todo]
        straddles = (ga < 0) & (gb > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            secant = (a * gb - b * ga) / (gb - ga)
        inside = straddles & (secant > a) & (secant < b)
        new = np.where(inside, secant, 0.5 * (a + b))
        g = derivative(new, todo)
        rising = g > 0
        # the end replaced keeps its side; Illinois halves the other end's value when the
        # same end is replaced twice in a row
        stay_hi = rising & (side[todo] == 1)
        stay_lo = ~rising & (side[todo] == -1)
        hi[todo] = np.where(rising, new, b)
        g_hi[todo] = np.where(rising, g, gb)
        lo[todo] = np.where(rising, a, new)
        g_lo[todo] = np.where(rising, ga, g)
        g_lo[todo[stay_hi]] *= 0.5
        g_hi[todo[stay_lo]] *= 0.5
        side[todo] = np.where(rising, 1, -1)
        step = np.abs(new - x[todo])
        x[todo] = new
        done = (g == 0) | (step <= 1e-15 * new) | (hi[todo] - lo[todo] <= 1e-15 * hi[todo])
        todo = todo[~done]
    return x


# ----------------------------------------------------------------------------------------------
# random slope
# ----------------------------------------------------------------------------------------------


class _SlopeSums:
    """Per-subject sums the REML criterion of ``(1 + t | subject)`` depends on."""

    def __init__(self, Y0, design, codes, n_subjects, times):
        n_rows, self.p = design.shape
        self.dof = n_rows - self.p
        T = _slope_cross(codes, n_subjects, times)
        self.t00, self.t01, self.t11 = T[:, 0, 0], T[:, 0, 1], T[:, 1, 1]
        # Z_s' X_s and Z_s' y_s, with Z_s = [1 | t]
        self.ZX = np.stack(
            [
                _subject_sums(codes, n_subjects, design),
                _subject_sums(codes, n_subjects, times[:, None] * design),
            ],
            axis=1,
        )  # (S, 2, p)
        self.ZY = np.stack(
            [
                _subject_sums(codes, n_subjects, Y0),
                _subject_sums(codes, n_subjects, times[:, None] * Y0),
            ],
            axis=1,
        )  # (S, 2, V)
        zx0, zx1 = self.ZX[:, 0], self.ZX[:, 1]
        outer = lambda a, b: (a[:, :, None] * b[:, None, :]).reshape(a.shape[0], -1)  # noqa: E731
        self.P00, self.P11 = outer(zx0, zx0), outer(zx1, zx1)
        self.P01 = outer(zx0, zx1) + outer(zx1, zx0)
        self.C = (Y0**2).sum(axis=0)
        self.A = design.T @ design

    def evaluate(self, theta, features=None, gradient=True):
        """Criterion (and its gradient in lme4's Cholesky parameters) of the features
        (indices; all by default) at their own ``theta`` (V, 3) = (l11, l21, l22)."""
        ZY = self.ZY if features is None else self.ZY[:, :, features]
        C = self.C if features is None else self.C[features]
        l11, l21, l22 = theta[:, 0], theta[:, 1], theta[:, 2]
        p00, p01, p11 = l11 * l11, l11 * l21, l21 * l21 + l22 * l22  # psi = L L'
        t00, t01, t11 = self.t00[:, None], self.t01[:, None], self.t11[:, None]
        # M = I + T psi per subject and feature (S, V), its determinant and inverse N
        m00 = 1.0 + t00 * p00 + t01 * p01
        m01 = t00 * p01 + t01 * p11
        m10 = t01 * p00 + t11 * p01
        m11 = 1.0 + t01 * p01 + t11 * p11
        det = m00 * m11 - m01 * m10
        n00, n01, n10, n11 = m11 / det, -m01 / det, -m10 / det, m00 / det
        # W = psi N (symmetric): V_s^-1 = I - Z_s W_s Z_s'
        w00 = p00 * n00 + p01 * n10
        w01 = p00 * n01 + p01 * n11
        w11 = p01 * n01 + p11 * n11
        n_features = theta.shape[0]
        p = self.p
        H = self.A[None] - (w00.T @ self.P00 + w01.T @ self.P01 + w11.T @ self.P11).reshape(
            n_features, p, p
        )
        zy0, zy1 = ZY[:, 0], ZY[:, 1]
        zx0, zx1 = self.ZX[:, 0], self.ZX[:, 1]
        b = -((w00 * zy0 + w01 * zy1).T @ zx0 + (w01 * zy0 + w11 * zy1).T @ zx1)  # (V, p)
        yvy = C - (w00 * zy0**2 + 2.0 * w01 * zy0 * zy1 + w11 * zy1**2).sum(axis=0)
        sign, logdet_h = np.linalg.slogdet(H)
        Hinv = np.linalg.inv(H)
        sol = np.einsum("vpq,vq->vp", Hinv, b)
        pwrss = yvy - (b * sol).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            value = self.dof * np.log(pwrss) + np.log(det).sum(axis=0) + logdet_h
        value = np.where((sign > 0) & (pwrss > 0) & (det > 0).all(axis=0), value, np.inf)
        if not gradient:
            return value, None, (w00, w01, w11, sol, pwrss)
        # Z_s' r_s at the GLS solution, and a_s = N_s Z_s' r_s
        r0 = zy0 - zx0 @ sol.T
        r1 = zy1 - zx1 @ sol.T
        a0, a1 = n00 * r0 + n01 * r1, n10 * r0 + n11 * r1
        k = -self.dof / pwrss
        g00 = k * (a0 * a0).sum(axis=0)
        g01 = k * (a0 * a1).sum(axis=0)
        g11 = k * (a1 * a1).sum(axis=0)
        # + sum_s N_s T_s
        g00 += (n00 * t00 + n01 * t01).sum(axis=0)
        g01 += 0.5 * ((n00 * t01 + n01 * t11) + (n10 * t00 + n11 * t01)).sum(axis=0)
        g11 += (n10 * t01 + n11 * t11).sum(axis=0)
        # - sum_s N_s (ZX_s H^-1 ZX_s') N_s'
        # E_ab = zx_a H^-1 zx_b' for every subject and feature: products of the subjects'
        # outer products with the flattened inverses (H^-1 symmetric)
        flat = Hinv.reshape(n_features, p * p).T
        e00 = self.P00 @ flat  # (S, V)
        e01 = 0.5 * (self.P01 @ flat)
        e11 = self.P11 @ flat
        # (N E N')_ab = sum_cd N_ac E_cd N_bd
        q00 = n00 * (n00 * e00 + n01 * e01) + n01 * (n00 * e01 + n01 * e11)
        q01 = n00 * (n10 * e00 + n11 * e01) + n01 * (n10 * e01 + n11 * e11)
        q11 = n10 * (n10 * e00 + n11 * e01) + n11 * (n10 * e01 + n11 * e11)
        g00 -= q00.sum(axis=0)
        g01 -= q01.sum(axis=0)
        g11 -= q11.sum(axis=0)
        # df/dL = 2 G L (lower-triangular entries), G symmetric
        grad = np.stack(
            [2.0 * (g00 * l11 + g01 * l21), 2.0 * (g01 * l11 + g11 * l21), 2.0 * g11 * l22],
            axis=1,
        )
        return value, grad, (w00, w01, w11, sol, pwrss)


def _random_slope(Y0, design, codes, n_subjects, times):
    sums = _SlopeSums(Y0, design, codes, n_subjects, times)
    n_features = Y0.shape[1]
    theta = np.tile([1.0, 0.0, 1.0], (n_features, 1))  # lme4's start
    theta = _bfgs(lambda x, idx: sums.evaluate(x, idx)[:2], theta)
    _, _, (w00, w01, w11, sol, pwrss) = sums.evaluate(theta, gradient=False)
    l11, l21, l22 = theta[:, 0], theta[:, 1], theta[:, 2]
    cov = np.empty((2, 2, n_features))
    cov[0, 0], cov[0, 1], cov[1, 1] = l11 * l11, l11 * l21, l21 * l21 + l22 * l22
    cov[1, 0] = cov[0, 1]
    # BLUP u_s = W_s Z_s' r_s
    r0 = sums.ZY[:, 0] - sums.ZX[:, 0] @ sol.T
    r1 = sums.ZY[:, 1] - sums.ZX[:, 1] @ sol.T
    random = np.stack([w00 * r0 + w01 * r1, w01 * r0 + w11 * r1], axis=1)
    singular = (np.abs(l11) < _SINGULAR_TOL) | (np.abs(l22) < _SINGULAR_TOL)
    return cov, sol.T, pwrss, random, singular


def _bfgs(evaluate, x, max_iter=400):
    """BFGS with a backtracking (Armijo) line search, run in lockstep for many small
    problems: ``evaluate(x, idx)`` -> (values, gradients (., d)) of the problems ``idx`` at
    ``x`` (one row each; ``idx=None``: all)."""
    n, d = x.shape
    f, g = evaluate(x, None)
    # first step of unit length along the steepest descent; the inverse Hessian is rescaled
    # at the first update (s'y / y'y), as usual for BFGS
    Hinv = np.eye(d)[None] / np.maximum(10.0 * np.abs(g).max(axis=1), 1.0)[:, None, None]
    first = np.ones(n, dtype=bool)
    active = np.isfinite(f)
    for _ in range(max_iter):
        if not active.any():
            break
        direction = -np.einsum("vij,vj->vi", Hinv, g)
        slope = (direction * g).sum(axis=1)
        bad = slope >= 0  # not a descent direction: restart from the gradient
        if bad.any():
            Hinv[bad] = np.eye(d)
            direction[bad] = -g[bad]
            slope[bad] = -(g[bad] ** 2).sum(axis=1)
        # Armijo backtracking: the full step first, then, for the features still searching,
        # four step lengths per call (1/2, 1/8, 1/32, 1/128 of the last one tried); the
        # largest acceptable one is taken
        step = np.ones(n)
        todo = active.copy()
        x_new, f_new, g_new = x.copy(), f.copy(), g.copy()
        for attempt in range(15):
            idx = np.flatnonzero(todo)
            if idx.size == 0:
                break
            factors = np.ones(1) if attempt == 0 else 0.5 * 0.25 ** np.arange(4)
            k = factors.size
            lengths = step[idx][None, :] * factors[:, None]  # (k, m)
            trial = x[idx][None] + lengths[:, :, None] * direction[idx][None]
            ft, gt = evaluate(trial.reshape(-1, d), np.tile(idx, k))
            ft, gt = ft.reshape(k, -1), gt.reshape(k, -1, d)
            ok = ft <= f[idx][None] + 1e-4 * lengths * slope[idx][None]
            found = ok.any(axis=0)
            choice = np.argmax(ok, axis=0)  # the first (longest) acceptable step
            cols = np.flatnonzero(found)
            accepted = idx[cols]
            x_new[accepted] = trial[choice[cols], cols]
            f_new[accepted] = ft[choice[cols], cols]
            g_new[accepted] = gt[choice[cols], cols]
            todo[accepted] = False
            step[idx[~found]] *= factors[-1]
        stalled = todo  # no decrease found: converged to rounding
        s = x_new - x
        yv = g_new - g
        sy = (s * yv).sum(axis=1)
        update = active & ~stalled & (sy > 1e-300)
        rescale = update & first
        if rescale.any():
            yy = (yv[rescale] ** 2).sum(axis=1)
            Hinv[rescale] = np.eye(d)[None] * (sy[rescale] / yy)[:, None, None]
        first &= ~update
        if update.any():
            rho = 1.0 / sy[update]
            eye = np.eye(d)[None]
            left = eye - rho[:, None, None] * s[update][:, :, None] * yv[update][:, None, :]
            Hinv[update] = left @ Hinv[update] @ left.transpose(0, 2, 1) + rho[:, None, None] * (
                s[update][:, :, None] * s[update][:, None, :]
            )
        gain = f - f_new
        small = (
            (np.abs(s) <= 1e-13 * (1.0 + np.abs(x_new))).all(axis=1)
            | (np.abs(g_new).max(axis=1) <= 1e-11)
            | (gain <= 1e-15 * np.abs(f))
            # a boundary (singular) fit creeps towards its bound: a Cholesky diagonal entry
            # below 1e-5 (psi below 1e-10) with a negligible gain is there
            | ((gain <= 1e-12 * np.abs(f)) & (np.abs(x_new[:, [0, -1]]).min(axis=1) < 1e-5))
        )
        x, f, g = x_new, f_new, g_new
        active &= ~(stalled | small)
    return x


# ----------------------------------------------------------------------------------------------
# new subjects
# ----------------------------------------------------------------------------------------------


def predict_random_effects(residuals, codes, n_subjects, times, cov):
    """BLUPs of subjects from their own rows' marginal residuals ``y - fixed part``.

    ``u_s = psi Z_s' (I + Z_s psi Z_s')^-1 r_s`` with the fitted relative covariance ``psi``
    (per feature); for a random intercept ``u_s = psi / (1 + n_s psi) * sum(r_s)``.

    Returns
    -------
    ndarray of shape (n_subjects, q, n_features)
    """
    q = cov.shape[0]
    if q == 1:
        counts = np.bincount(codes, minlength=n_subjects).astype(np.float64)
        psi = cov[0, 0]
        w = psi[None, :] / (1.0 + counts[:, None] * psi[None, :])
        return (w * _subject_sums(codes, n_subjects, residuals))[:, None, :]
    Zr = np.stack(
        [
            _subject_sums(codes, n_subjects, residuals),
            _subject_sums(codes, n_subjects, times[:, None] * residuals),
        ],
        axis=1,
    )  # (S, 2, V)
    T = _slope_cross(codes, n_subjects, times)  # (S, 2, 2)
    M = np.eye(2)[None, None] + np.einsum("sab,bcv->svac", T, cov)  # I + T psi
    # u = psi (I + T psi)^-1 Z'r
    x = np.linalg.solve(M, Zr.transpose(0, 2, 1)[..., None])[..., 0]  # (S, V, 2)
    return np.einsum("abv,svb->sav", cov, x)


def _slope_cross(codes, n_subjects, times):
    t = times
    sums = _subject_sums(codes, n_subjects, np.stack([np.ones_like(t), t, t * t], axis=1))
    T = np.empty((n_subjects, 2, 2))
    T[:, 0, 0], T[:, 0, 1], T[:, 1, 0], T[:, 1, 1] = sums[:, 0], sums[:, 1], sums[:, 1], sums[:, 2]
    return T


# ----------------------------------------------------------------------------------------------
# empirical Bayes of longitudinal ComBat
# ----------------------------------------------------------------------------------------------


def longitudinal_eb(n, mean, ss, usable, niter=LONGITUDINAL_EB_ITERATIONS):
    """Parametric EB of one site as ``R/longCombat.R`` does it.

    Priors by the method of moments across features (as ComBat), then ``niter`` simultaneous
    updates from ``gamma* = postmean(delta_hat)``, ``delta* = postvar(gamma*)``: each step
    computes the new ``gamma*`` from the previous ``delta*`` and the new ``delta*`` from the
    previous ``gamma*`` (ComBat uses the new ``gamma*`` and stops at a relative change of
    1e-4). No convergence test: longCombat's fixed iteration count.

    Returns
    -------
    model.BatchEstimates
    """
    gamma_hat = np.where(usable, mean, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        delta_hat = ss / (n - 1)
    delta_hat = np.where(usable & (delta_hat != 0), delta_hat, 1.0)
    est = model.BatchEstimates(gamma_hat, delta_hat, gamma_hat.copy(), delta_hat.copy())
    if not usable.any():
        return est
    g, d, s = gamma_hat[usable], delta_hat[usable], ss[usable]
    est.gamma_bar, est.t2 = model.location_prior(g)
    est.a_prior, est.b_prior = model.scale_prior(d)
    a, b = est.a_prior, est.b_prior
    if not (np.isfinite(a) and np.isfinite(b)):
        g_star, d_star = model.postmean(g, est.gamma_bar, n, d, est.t2), d
    else:
        g_star = model.postmean(g, est.gamma_bar, n, d, est.t2)
        d_star = model.postvar(s + n * (g - g_star) ** 2, n, a, b)
        for _ in range(niter):
            g_next = model.postmean(g, est.gamma_bar, n, d_star, est.t2)
            d_star = model.postvar(s + n * (g - g_star) ** 2, n, a, b)
            g_star = g_next
    est.gamma_star[usable] = g_star
    est.delta_star[usable] = d_star
    return est
