"""CovBat (Chen et al. 2022): ComBat, then ComBat of the leading principal component scores.

ComBat equalizes each feature's site mean and variance; the covariance between features still
differs by site, which is what multivariate classifiers pick up. CovBat takes the ComBat
residuals ``e = x* - alpha - z @ beta``, standardizes them (``std_var``), computes their
principal components on the training rows, and removes the site location and scale of the
leading ``K`` component scores with a ComBat without covariates and without empirical Bayes.
The adjusted scores are projected back and the covariate effects added again.

The math is in the small functions below; :class:`CovBatHarmonizer` is the scikit-learn
estimator. The numbers equal the authors' R implementation (``covfam`` with ``model = lm`` in
the ComBatFamily package) to rounding; ``tests/data/README.md`` says how that was checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
from sklearn.base import _fit_context
from sklearn.utils._param_validation import Interval

from kwneuro_sk.combat import _dask, model
from kwneuro_sk.combat.harmonizer import CombatHarmonizer, unfitted_on_failure

# --------------------------------------------------------------------------------------------
# The math, as pure functions on arrays
# --------------------------------------------------------------------------------------------


@dataclass
class ResidualPCA:
    """Principal components of the ComBat residuals of the training rows.

    ``scores = ((e - center) / scale) @ components.T`` (R's ``prcomp(e, center=TRUE,
    scale.=std.var)``): ``scale`` is the standard deviation (``n - 1``) with ``std_var``, and 1
    otherwise (and 1 for a constant residual).
    """

    center: np.ndarray  # (n_features,)
    scale: np.ndarray  # (n_features,)
    components: np.ndarray  # (n_pcs, n_features), orthonormal rows, by decreasing variance
    explained_variance: np.ndarray  # (n_pcs,) variance of each score (sdev ** 2)


def residual_pca(residuals, *, std_var):
    """PCA of residuals (rows are samples), as R's ``prcomp(center=TRUE, scale.=std_var)``.

    Parameters
    ----------
    residuals : ndarray of shape (n_samples, n_features)
    std_var : bool
        Divide each centered feature by its standard deviation before the PCA.

    Returns
    -------
    ResidualPCA
        With ``min(n_samples, n_features)`` components.
    """
    residuals = np.asarray(residuals, dtype=np.float64)
    n_samples, n_features = residuals.shape
    center = residuals.mean(axis=0)
    centered = residuals - center
    if std_var:
        scale = centered.std(axis=0, ddof=1)
        scale[~(scale > 0)] = 1.0  # a constant residual (zero-variance feature) stays 0
        centered /= scale
    else:
        scale = np.ones(n_features)
    components, variance = _principal_axes(centered)
    return ResidualPCA(center, scale, components, variance / (n_samples - 1))


def _principal_axes(Y):
    """Right singular vectors (rows) and squared singular values of ``Y``, largest first.

    From the eigen-decomposition of the smaller Gram matrix (``Y Y^T`` when there are fewer
    rows than columns): for 300 x 50,000 residuals this is one n x n product instead of an SVD
    of the whole matrix (4x faster). The eigenvectors of ``Y^T Y`` are the right singular
    vectors, those of ``Y Y^T`` the left ones ``U``, mapped by ``V = U^T Y / s``. Directions with
    a zero singular value are dropped (they carry no variance).
    """
    n_samples, n_features = Y.shape
    if n_samples < n_features:
        values, vectors = np.linalg.eigh(Y @ Y.T)
    else:
        values, vectors = np.linalg.eigh(Y.T @ Y)
    order = np.argsort(values)[::-1][: min(n_samples, n_features)]
    values = np.clip(values[order], 0.0, None)
    vectors = vectors[:, order]
    keep = values > values[0] * 1e-24 if values[0] > 0 else values > 0
    values, vectors = values[keep], vectors[:, keep]
    if n_samples < n_features:
        components = (vectors.T @ Y) / np.sqrt(values)[:, None]
    else:
        components = vectors.T
    return components, values


def n_components_for_variance(explained_variance, percent_var):
    """Smallest number of components whose share of the total variance exceeds ``percent_var``.

    As ComBatFamily's ``which(cumsum(sdev^2 / sum(sdev^2)) > percent.var)[1]``.
    """
    share = np.cumsum(explained_variance) / np.sum(explained_variance)
    above = np.flatnonzero(share > percent_var)
    return int(above[0]) + 1 if above.size else len(share)


def pc_scores(residuals, pca, n_components):
    """Scores of rows on the leading ``n_components`` principal components:
    ``((e - center) / scale) @ V_K^T``, computed without a standardized copy of ``e``."""
    weights = pca.components[:n_components].T / pca.scale[:, None]
    return residuals @ weights - pca.center @ weights


def back_project(harmonized, scores, adjusted_scores, pca):
    """Replace the leading scores of rows by their adjusted values, in feature space.

    ``x_covbat = x* + ((scores_adjusted - scores) @ V_K) * scale``: on the training rows this
    is ComBatFamily's ``full_scores %*% t(rotation) * scale + center + stand.mean``, and it
    keeps the part of a new row outside the training components unchanged.
    """
    k = scores.shape[1]
    return harmonized + (adjusted_scores - scores) @ (pca.components[:k] * pca.scale)


# --------------------------------------------------------------------------------------------
# The estimator
# --------------------------------------------------------------------------------------------


class CovBatHarmonizer(CombatHarmonizer):
    """Remove site effects in means, variances and covariances (CovBat), fitted on training rows.

    CovBat (Chen et al. 2022, Human Brain Mapping) runs ComBat, then a principal component
    analysis of the ComBat residuals of the training rows, and a ComBat (no covariates, no
    empirical Bayes) of the leading component scores, which equalizes the site-specific
    covariance between features that ComBat leaves behind. New rows are harmonized with the
    stored ComBat estimates, principal components and score estimates.

    Sites and covariates reach it exactly as for :class:`~kwneuro_sk.CombatHarmonizer` (as
    columns of a DataFrame ``X`` named by ``batch_col``, ``categorical_cols`` and
    ``continuous_cols``, or as ``batch=`` / ``covariates=`` keywords), with the same options
    for the ComBat step.

    Parameters
    ----------
    batch_col, categorical_cols, continuous_cols, eb, parametric, mean_only, ref_batch, \
unseen_batch, smooth_cols, smooth_knots, smooth_degree, smooth_extrapolation
        As in :class:`~kwneuro_sk.CombatHarmonizer`, for the ComBat step. ``mean_only`` and
        ``ref_batch`` also apply to the score step; a site unseen in fit gets score estimates
        from its own rows with ``unseen_batch="adapt"``.
    percent_var : float in (0, 1), default=0.95
        Harmonize the fewest leading scores that explain more than this share of the residual
        variance (ComBatFamily's ``percent.var``).
    n_components : int, default=None
        Harmonize this many leading scores instead (ComBatFamily's ``n.pc``); overrides
        ``percent_var``.
    std_var : bool, default=True
        Scale each residual feature to unit variance before the PCA (ComBatFamily's
        ``std.var``).
    n_jobs : int, default=None
        Threads of the ComBat steps, as in :class:`CombatHarmonizer`.

    Attributes
    ----------
    n_components_ : int
        Number of harmonized scores ``K``.
    pca_center_, pca_scale_ : ndarray of shape (n_features_out,)
        Mean and scale of the training residuals used before the projection.
    components_ : ndarray of shape (K, n_features_out)
        Loadings of the harmonized principal components.
    explained_variance_ : ndarray of shape (min(n_samples, n_features_out),)
        Variance of every principal component score of the training residuals.
    explained_variance_ratio_ : ndarray of shape (min(n_samples, n_features_out),)
        Share of the total residual variance of each component.
    score_grand_mean_, score_var_pooled_ : ndarray of shape (K,)
        Pooled mean and variance of the scores (score ComBat's ``alpha`` and ``sigma**2``).
    score_gamma_hat_, score_delta_hat_ : ndarray of shape (n_batches, K)
        Per-site location and scale of the standardized scores (no EB: these are used).
    ... :
        Every fitted attribute of :class:`~kwneuro_sk.CombatHarmonizer`, for the ComBat step
        (``gamma_star_``, ``delta_star_``, ``beta_``, ...).

    See Also
    --------
    kwneuro_sk.CombatHarmonizer : the ComBat step alone.

    Notes
    -----
    With ``ref_batch=None`` the numbers equal ComBatFamily's ``covfam(data, bat, covar, lm,
    formula)`` (which runs the first ComBat with EB and the score ComBat without) to rounding.
    With ``ref_batch`` the ComBat step follows ``sva::ComBat`` (pooled variance of the reference
    site, reference rows unchanged), not ComBatFamily. :attr:`estimates_` holds the ComBat
    step only; :meth:`inverse_transform` is not available.

    Examples
    --------
    >>> import numpy as np
    >>> from kwneuro_sk import CovBatHarmonizer
    >>> rng = np.random.default_rng(0)
    >>> site = np.repeat(["a", "b", "c"], 30)
    >>> X = rng.normal(size=(90, 6))
    >>> X[site == "b"] += rng.normal(size=(30, 1)) * rng.normal(size=6)  # covariance of site b
    >>> covbat = CovBatHarmonizer(percent_var=0.9)
    >>> Xh = covbat.fit_transform(X, batch=site)
    >>> Xh.shape, covbat.components_.shape == (covbat.n_components_, 6)
    ((90, 6), True)
    """

    _parameter_constraints: dict = {
        **{
            name: constraint
            for name, constraint in CombatHarmonizer._parameter_constraints.items()
            if name not in ("subject_col", "random_slope", "sigma_method")
        },
        "percent_var": [Interval(Real, 0, 1, closed="neither")],
        "n_components": [Interval(Integral, 1, None, closed="left"), None],
        "std_var": ["boolean"],
    }

    def __init__(
        self,
        batch_col=None,
        categorical_cols=None,
        continuous_cols=None,
        *,
        eb=True,
        parametric=True,
        mean_only=False,
        ref_batch=None,
        unseen_batch="error",
        smooth_cols=None,
        smooth_knots=5,
        smooth_degree=3,
        smooth_extrapolation="linear",
        percent_var=0.95,
        n_components=None,
        std_var=True,
        n_jobs=None,
    ):
        # Every parameter is set here, none by CombatHarmonizer.__init__, whose longitudinal
        # options (subject_col, ...) CovBat does not have.
        for name, value in locals().items():
            if name not in ("self", "__class__", "percent_var", "n_components", "std_var"):
                setattr(self, name, value)
        self.percent_var = percent_var
        self.n_components = n_components
        self.std_var = std_var

    _PRIVATE_STATE = CombatHarmonizer._PRIVATE_STATE | {"_score_zero_variance"}

    def inverse_transform(self, X, *, batch=None, covariates=None):
        """Not available for CovBat.

        Raises
        ------
        NotImplementedError
        """
        raise NotImplementedError(
            "CovBatHarmonizer has no inverse_transform; CombatHarmonizer has one"
        )

    def _check_statistics_route(self, method):
        # partial_fit, site_summary and fit_from_summaries fit from per-site statistics; the
        # PCA of the residuals needs all the rows at once.
        raise AttributeError(
            f"CovBatHarmonizer has no {method}: the PCA of the ComBat residuals needs all "
            "the training rows in memory at once, which per-site statistics do not hold. "
            "Use fit on the pooled rows, or CombatHarmonizer for incremental and federated "
            "fits"
        )

    @classmethod
    def from_estimates(cls, estimates):
        """Not available: :attr:`estimates_` holds the ComBat step only.

        Raises
        ------
        NotImplementedError
        """
        raise NotImplementedError(
            "CovBatHarmonizer cannot be rebuilt from CombatEstimates (they hold the ComBat "
            "step only); pickle the fitted CovBatHarmonizer, or use "
            "CombatHarmonizer.from_estimates for the ComBat step"
        )

    # ---------------------------------------------------------------------------------------
    # fitting and applying
    # ---------------------------------------------------------------------------------------

    @unfitted_on_failure
    def fit(self, X, y=None, *, batch=None, covariates=None):
        """Fit ComBat, the PCA of its residuals and the ComBat of the PC scores.

        Parameters
        ----------
        X, y, batch, covariates
            As in :meth:`CombatHarmonizer.fit` (dask input is refused: the PCA needs the
            rows in memory).

        Returns
        -------
        self : CovBatHarmonizer
        """
        _refuse_dask_fit(X)
        return super().fit(X, y, batch=batch, covariates=covariates)

    @unfitted_on_failure
    @_fit_context(prefer_skip_nested_validation=True)
    def fit_transform(self, X, y=None, *, batch=None, covariates=None):
        """Fit on ``X`` and return its harmonized features (same as ``fit`` then ``transform``,
        without computing the ComBat step twice).

        Parameters
        ----------
        X, y, batch, covariates
            As in :meth:`fit`.

        Returns
        -------
        X_harmonized : ndarray of shape (n_samples, n_features_out)
        """
        _refuse_dask_fit(X)
        rows = self._read_rows(X, batch, covariates, reset=True)
        harmonized, residuals = self._fit_steps(rows)
        return self._adjust_scores(rows, harmonized, residuals)

    def _fit(self, rows):
        self._fit_steps(rows)
        return self

    def _fit_steps(self, rows):
        """Fit ComBat, the PCA and the score ComBat; return the rows' ComBat output and
        residuals."""
        super()._fit(rows)
        harmonized = super()._transform(rows)
        residuals = self._residuals(rows, harmonized)
        pca = residual_pca(residuals, std_var=self.std_var)
        n_pcs = len(pca.explained_variance)
        if self.n_components is not None:
            if self.n_components > n_pcs:
                raise ValueError(
                    f"n_components={self.n_components} is more than the {n_pcs} principal "
                    f"components of {residuals.shape[0]} rows x {residuals.shape[1]} features"
                )
            k = int(self.n_components)
        else:
            k = n_components_for_variance(pca.explained_variance, self.percent_var)
        self.n_components_ = k
        self.pca_center_, self.pca_scale_ = pca.center, pca.scale
        self.components_ = pca.components[:k].copy()
        self.explained_variance_ = pca.explained_variance
        self.explained_variance_ratio_ = pca.explained_variance / pca.explained_variance.sum()

        scores = pc_scores(residuals, pca, k)
        batch_idx = self._batch_indices(rows.sites)
        n_batches = len(self.batches_)
        standardization, mean, ss = model.fit_location_scale(
            scores, batch_idx, n_batches, np.empty((len(scores), 0)), ref=self._reference_index()
        )
        per_batch = [
            model.estimate_batch(
                self.n_samples_per_batch_[b],
                mean[b],
                ss[b],
                eb=False,
                parametric=True,
                mean_only=self.mean_only,
                usable=~standardization.zero_variance,
            )
            for b in range(n_batches)
        ]
        self.score_grand_mean_ = standardization.grand_mean
        self.score_var_pooled_ = standardization.var_pooled
        self._score_zero_variance = standardization.zero_variance
        self.score_gamma_hat_ = np.vstack([b.gamma_hat for b in per_batch])
        self.score_delta_hat_ = np.vstack([b.delta_hat for b in per_batch])
        ref = self._reference_index()
        if ref is not None:
            self.score_gamma_hat_[ref], self.score_delta_hat_[ref] = 0.0, 1.0
        return harmonized, residuals

    def _transform(self, rows):
        harmonized = super()._transform(rows)
        return self._adjust_scores(rows, harmonized, self._residuals(rows, harmonized))

    def _adjust_scores(self, rows, harmonized, residuals):
        """Score ComBat of rows from their ComBat output and residuals, projected back."""
        pca = ResidualPCA(
            self.pca_center_,
            self.pca_scale_,
            self.components_,
            self.explained_variance_[: self.n_components_],
        )
        scores = pc_scores(residuals, pca, self.n_components_)
        idx = self._batch_indices(rows.sites)
        gamma, delta = self.score_gamma_hat_, self.score_delta_hat_
        unseen = idx < 0
        if unseen.any():  # super()._transform has already checked unseen_batch
            gamma, delta, idx = self._adapt_scores(rows.sites, scores, idx)
        standardization = self._score_standardization()
        adjusted = model.adjust(
            scores,
            np.empty((len(scores), 0)),
            idx,
            standardization,
            gamma,
            delta,
            passthrough_rows=self._reference_rows(idx),
        )
        out = back_project(harmonized, scores, adjusted, pca)
        return out.astype(harmonized.dtype, copy=False)

    def _residuals(self, rows, harmonized):
        """ComBat residuals ``x* - alpha - z @ beta`` of rows, in float64."""
        Z = self._covariates.transform(rows.covariates)
        residuals = np.subtract(harmonized, self._standardization().grand_mean, dtype=np.float64)
        if Z.shape[1]:
            residuals -= Z @ self.beta_
        return residuals

    def _score_standardization(self):
        return model.StandardizationModel(
            self.score_grand_mean_,
            np.empty((0, self.n_components_)),
            self.score_var_pooled_,
            self._score_zero_variance,
        )

    def _adapt_scores(self, sites, scores, idx):
        """Score estimates for sites unseen in fit, from their rows here (no EB)."""
        idx = idx.copy()
        new_sites = list(dict.fromkeys(sites[idx < 0]))
        groups = []
        for j, site in enumerate(new_sites):
            members = np.flatnonzero(sites == site)
            idx[members] = len(self.batches_) + j
            groups.append(members)
        standardization = self._score_standardization()
        n, mean, ss = model.standardized_moments(
            scores, np.empty((len(scores), 0)), standardization, groups
        )
        new = [
            model.estimate_batch(
                n[k],
                mean[k],
                ss[k],
                eb=False,
                parametric=True,
                mean_only=self.mean_only,
                usable=~standardization.zero_variance,
            )
            for k in range(len(groups))
        ]
        gamma = np.vstack([self.score_gamma_hat_, *[b.gamma_hat for b in new]])
        delta = np.vstack([self.score_delta_hat_, *[b.delta_hat for b in new]])
        return gamma, delta, idx


__all__ = [
    "CovBatHarmonizer",
    "ResidualPCA",
    "back_project",
    "n_components_for_variance",
    "pc_scores",
    "residual_pca",
]


def _refuse_dask_fit(X):
    if _dask.is_dask(X):
        raise TypeError(
            f"CovBatHarmonizer cannot be fitted on a dask input ({type(X).__name__}): the PCA "
            "of the ComBat residuals needs all rows in memory; call .compute() on X first "
            "(a fitted CovBatHarmonizer transforms dask input block by block), or use "
            "CombatHarmonizer for the dask route"
        )
