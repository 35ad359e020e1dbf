"""CombatHarmonizer: ComBat as a scikit-learn transformer (input handling and fitted state).

The math lives in :mod:`kwneuro_sk.combat.model`; this module turns DataFrames, site labels and
covariates into the arrays it needs, validates them once, and keeps the fitted state.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Hashable
from numbers import Integral

import joblib
import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context, clone
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import (
    _check_feature_names_in,
    check_array,
    check_is_fitted,
    validate_data,
)

from kwneuro_sk._params import N_JOBS
from kwneuro_sk.combat import _dask, longitudinal, model, statistics
from kwneuro_sk.combat._covariates import (
    CovariateEncoding,
    fixed_knots,
    format_labels,
    quantile_knots,
    raw_design,
)
from kwneuro_sk.combat._inputs import (
    ColumnRoles,
    Rows,
    check_harmonized_order,
    check_not_bool,
    check_same_columns,
    feature_columns,
    read_rows,
)
from kwneuro_sk.combat.estimates import FITTED_ARRAYS, CombatEstimates
from kwneuro_sk.combat.statistics import SiteStatistics
from kwneuro_sk.combat.summary import SiteSummary


def unfitted_on_failure(fit_method):
    """A fit method that starts from an unfitted estimator and, when it fails, leaves it
    unfitted (``NotFittedError``): never a model part from this fit, part from an earlier one
    (a refit refused after ``batches_`` was set transformed with the earlier estimates)."""

    @functools.wraps(fit_method)
    def fit_afresh(self, *args, **kwargs):
        self._discard_fitted_state()
        try:
            return fit_method(self, *args, **kwargs)
        except BaseException:
            self._discard_fitted_state()
            raise

    return fit_afresh


class CombatHarmonizer(TransformerMixin, BaseEstimator):
    """Remove site (scanner) effects with ComBat, fitted on training rows only.

    ComBat (Johnson et al. 2007; Fortin et al. 2017, 2018) models each feature as a grand
    mean plus covariate effects plus a site-specific location ``gamma`` and scale ``delta``,
    shrinks the site estimates towards priors estimated across features (empirical Bayes), and
    removes them while keeping the covariate effects. Samples are rows, features are columns.

    Sites and covariates reach the estimator in one of two ways, with identical numbers:

    1. as columns of ``X`` (a DataFrame): ``batch_col`` names the site column,
       ``categorical_cols``/``continuous_cols`` the covariate columns, every other column is a
       feature. This works with every splitter and scorer, since the site travels with its row;
    2. as keyword arguments ``batch=`` and ``covariates=`` (a DataFrame holding the named
       covariate columns) of :meth:`fit`, :meth:`transform` and :meth:`inverse_transform`, with
       ``batch_col=None``. They can be routed as metadata (``set_fit_request``).

    Parameters
    ----------
    batch_col : hashable, default=None
        Name of the site column of ``X``. ``None`` means sites come as ``batch=``.
    categorical_cols : str or list of str, default=None
        Categorical covariates whose effects are preserved (one-hot encoded, first level sorted
        as reference).
    continuous_cols : str or list of str, default=None
        Continuous covariates whose (linear) effects are preserved.
    eb : bool, default=True
        Shrink the site estimates with empirical Bayes. ``False`` uses the per-site
        least-squares estimates as they are.
    parametric : bool, default=True
        Parametric EB (normal / inverse-gamma priors, iterated posterior means) or
        non-parametric EB (likelihood-weighted average over the other features).
    mean_only : bool, default=False
        Adjust only the site location, not the scale. Allows sites with a single row.
    ref_batch : label, default=None
        Reference site: its rows are left unchanged and the other sites are mapped onto its
        mean and variance.
    unseen_batch : {"error", "adapt"}, default="error"
        What :meth:`transform` does with sites not seen in :meth:`fit`: raise a ValueError
        naming them, or estimate their location/scale (with the same EB shrinkage, priors from
        that site's own features) from the rows of that site in the call, holding the fitted
        covariate effects, grand mean and pooled variance fixed.
    smooth_cols : str or list of str, default=None
        Continuous covariates whose effects are preserved as smooth (nonlinear) curves, as in
        ComBat-GAM (Pomponio et al. 2020): each is expanded into a cubic B-spline basis
        (scikit-learn's :class:`~sklearn.preprocessing.SplineTransformer`) with knots at
        quantiles of its training values; the basis columns enter the design like any other
        covariate. Use it for age in lifespan cohorts whose sites cover different age ranges.
    smooth_knots : int, array-like of float or dict, default=5
        Number of knots of each smooth covariate, boundary knots (training minimum and maximum)
        included, placed at quantiles of the training values; or the knot positions
        themselves (increasing): one sequence for every smooth column, or a dict mapping each
        smooth column to its sequence. The basis has ``n_knots + smooth_degree - 2`` columns.
        More knots allow more wiggly curves. Fixed positions are what :meth:`partial_fit` and
        federated fits need (quantiles of all the rows are unknown to a chunk or a site);
        :meth:`fit` with the same positions gives the same model.
    smooth_degree : int, default=3
        Polynomial degree of the B-splines (3: cubic).
    smooth_extrapolation : {"linear", "constant", "error"}, default="linear"
        Values of new rows outside the training range of a smooth covariate: ``"linear"``
        continues the fitted curve along its slope at the boundary, ``"constant"`` holds it at
        its boundary value, ``"error"`` raises a ValueError naming the column.
    subject_col : hashable, default=None
        Longitudinal ComBat (Beer et al. 2020): the subject column of ``X`` (columns route),
        or with ``batch_col=None`` the name under which subjects come as ``subjects=``. The
        covariate model becomes a linear mixed model with a random intercept per subject,
        fitted by REML for every feature (lme4's ``y ~ covariates + site + (1 | subject)``);
        the site effects, standardization and empirical Bayes follow the authors'
        ``longCombat`` R code. See :ref:`longitudinal`. Not with ``ref_batch``.
    random_slope : hashable, default=None
        With ``subject_col``: a continuous covariate (one of ``continuous_cols``, e.g. time
        since baseline) that also gets a random slope per subject (lme4's
        ``(1 + time | subject)``).
    sigma_method : {"reml", "msr"}, default="reml"
        With ``subject_col``: the scale that standardizes each feature, longCombat's
        ``method``: the REML residual standard deviation, or the root mean squared
        conditional residual.
    n_jobs : int, default=None
        Threads for the blocks of features in fit, transform and inverse_transform.
        ``None`` means 1 unless in a :func:`joblib.parallel_config` context; ``-1`` means
        all CPUs available to the process (container limits respected). Results are
        bit-identical for any value.

    Attributes
    ----------
    batches_ : ndarray of shape (n_batches,)
        Site labels seen in fit, sorted. Rows of the per-site arrays follow this order.
    n_samples_per_batch_ : ndarray of shape (n_batches,)
        Training rows per site.
    grand_mean_ : ndarray of shape (n_features_out,)
        ``alpha``: sample-weighted mean of the site intercepts (the reference site's intercept
        with ``ref_batch``).
    beta_ : ndarray of shape (n_covariates, n_features_out)
        Covariate coefficients; rows are named by ``covariate_names_``.
    covariate_names_ : ndarray of str
        Names of the encoded covariate columns (``sex_M``, ``age``, ...).
    var_pooled_ : ndarray of shape (n_features_out,)
        Pooled residual variance ``sigma**2`` (of the reference site with ``ref_batch``).
    zero_variance_features_ : ndarray of bool, shape (n_features_out,)
        Constant features, passed through unchanged (with a UserWarning naming them): the
        standard deviation of their residuals after removing the site and covariate effects
        is at the floating-point resolution of their values (see the user guide, Numerics).
    gamma_hat_, delta_hat_ : ndarray of shape (n_batches, n_features_out)
        Per-site location and scale (variance) of the standardized data.
    gamma_star_, delta_star_ : ndarray of shape (n_batches, n_features_out)
        The estimates used for adjustment (after EB when ``eb=True``; ``0`` and ``1`` for the
        reference site).
    gamma_bar_, t2_, a_prior_, b_prior_ : ndarray of shape (n_batches,)
        EB priors per site, estimated across features: mean and variance of ``gamma_hat``;
        inverse-gamma shape and scale for ``delta_hat`` (NaN when not used).
    estimates_ : CombatEstimates
        The fitted model as plain data, for :meth:`CombatEstimates.save` and
        :meth:`from_estimates`. Its arrays are the arrays above (not copies).
    n_features_in_ : int
        Number of columns of ``X`` seen in fit (site and covariate columns included).
    feature_names_in_ : ndarray of str
        Column names of ``X`` seen in fit, when they are all strings. Column labels of any
        other type are kept too (and saved with :attr:`estimates_`), so that ``transform``
        matches DataFrame columns by name in every case.

    See Also
    --------
    kwneuro_sk.harmonize_volumes : voxel-wise ComBat on NIfTI images.

    Notes
    -----
    Numbers match neuroCombat 0.2.12 and R ``sva::ComBat`` to rounding for every option,
    including the parametric EB stopping rule. Differences, on purpose: new rows are harmonized
    with their own covariates (neuroCombatFromTraining uses the training mean); zero-variance
    features are passed through unchanged (neuroCombat divides by a placeholder variance);
    non-parametric likelihoods are computed in log space, so they do not underflow to NaN; a
    site with one row raises instead of switching every site to mean-only as sva does.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> from kwneuro_sk import CombatHarmonizer
    >>> rng = np.random.default_rng(0)
    >>> site = np.repeat(["siteA", "siteB", "siteC"], 20)
    >>> age = rng.uniform(20, 80, size=60).round()
    >>> X = pd.DataFrame(rng.normal(size=(60, 3)) + 0.02 * age[:, None], columns=["f1", "f2", "f3"])
    >>> X["f1"] += np.repeat([0.0, 1.5, -1.0], 20)  # a site effect
    >>> X["site"], X["age"] = site, age
    >>> combat = CombatHarmonizer(batch_col="site", continuous_cols=["age"])
    >>> Xh = combat.fit_transform(X)
    >>> Xh.shape
    (60, 3)
    >>> combat.get_feature_names_out().tolist()
    ['f1', 'f2', 'f3']
    >>> bool(np.ptp(pd.Series(Xh[:, 0]).groupby(site).mean()) < 0.5)
    True
    """

    _parameter_constraints: dict = {
        "batch_col": [Hashable, None],
        "categorical_cols": [str, "array-like", None],
        "continuous_cols": [str, "array-like", None],
        "eb": ["boolean"],
        "parametric": ["boolean"],
        "mean_only": ["boolean"],
        "ref_batch": "no_validation",
        "unseen_batch": [StrOptions({"error", "adapt"})],
        "smooth_cols": [str, "array-like", None],
        "smooth_knots": [Interval(Integral, 2, None, closed="left"), "array-like", dict],
        "smooth_degree": [Interval(Integral, 1, None, closed="left")],
        "smooth_extrapolation": [StrOptions({"linear", "constant", "error"})],
        "subject_col": [Hashable, None],
        "random_slope": [Hashable, None],
        "sigma_method": [StrOptions({"reml", "msr"})],
        "n_jobs": N_JOBS,
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
        subject_col=None,
        random_slope=None,
        sigma_method="reml",
        n_jobs=None,
    ):
        self.batch_col = batch_col
        self.categorical_cols = categorical_cols
        self.continuous_cols = continuous_cols
        self.eb = eb
        self.parametric = parametric
        self.mean_only = mean_only
        self.ref_batch = ref_batch
        self.unseen_batch = unseen_batch
        self.smooth_cols = smooth_cols
        self.smooth_knots = smooth_knots
        self.smooth_degree = smooth_degree
        self.smooth_extrapolation = smooth_extrapolation
        self.subject_col = subject_col
        self.random_slope = random_slope
        self.sigma_method = sigma_method
        self.n_jobs = n_jobs

    # ---------------------------------------------------------------------------------------
    # public API
    # ---------------------------------------------------------------------------------------

    @unfitted_on_failure
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None, *, batch=None, covariates=None, subjects=None):
        """Estimate site, covariate and EB parameters from training rows.

        Parameters
        ----------
        X : DataFrame or array-like of shape (n_samples, n_columns)
            Features; with ``batch_col`` set, a DataFrame that also holds the site and
            covariate columns. A ``dask.array.Array`` (rows chunked; sites and covariates as
            ``batch=``/``covariates=``) or a ``dask.dataframe.DataFrame`` is fitted by a tree
            reduction of per-block sufficient statistics, without gathering the rows; the
            fitted attributes are numpy arrays equal to those of the in-memory fit (see
            :ref:`large_cohorts`).
        y : None
            Ignored.
        batch : array-like of shape (n_samples,), default=None
            Site of each row, when ``batch_col`` is None.
        covariates : DataFrame of shape (n_samples, n_covariates), default=None
            Holds the ``categorical_cols``/``continuous_cols``, when ``batch_col`` is None.
        subjects : array-like of shape (n_samples,), default=None
            Subject of each row, when ``batch_col`` is None and ``subject_col`` is set
            (longitudinal ComBat).

        Returns
        -------
        self : CombatHarmonizer
        """
        if _dask.is_dask(X):  # a tree reduction of sufficient statistics
            self._refuse_longitudinal("dask input")
            return _dask.fit(self, X, batch, covariates)
        self._fit(self._read_rows(X, batch, covariates, reset=True, subjects=subjects))
        return self

    @unfitted_on_failure
    @_fit_context(prefer_skip_nested_validation=True)
    def fit_transform(self, X, y=None, *, batch=None, covariates=None, subjects=None):
        """Fit on ``X`` and return its harmonized features (same as ``fit`` then ``transform``).

        Parameters
        ----------
        X, y, batch, covariates, subjects
            As in :meth:`fit`.

        Returns
        -------
        X_harmonized : ndarray of shape (n_samples, n_features_out)
        """
        if _dask.is_dask(X):
            self._refuse_longitudinal("dask input")
            _dask.fit(self, X, batch, covariates)
            return _dask.transform(self, X, batch, covariates)
        rows = self._read_rows(X, batch, covariates, reset=True, subjects=subjects)
        self._fit(rows)
        return self._transform(rows)

    @available_if(lambda self: self._check_statistics_route("partial_fit"))
    def partial_fit(self, X, y=None, *, batch=None, covariates=None):
        """Add a chunk of training rows: after any sequence of calls, the model is that of
        :meth:`fit` on all the rows given so far.

        Each call adds its rows to the per-site sufficient statistics of the earlier calls,
        in place (:meth:`~kwneuro_sk.combat.statistics.SiteStatistics.add_rows`); the rows
        are not kept, and a chunk refused by the input checks changes nothing, nor does a
        chunk of no rows (checked against the earlier chunks' columns). Chunks may
        hold any subset of the sites and of the levels of a categorical covariate. The model
        (EB estimates included) is computed from the statistics when it is first used after
        a call (``transform``, a fitted attribute), so a loop of ``partial_fit`` calls costs
        about one ``fit`` (1.2-1.5x for 20 chunks, ``benchmarks/bench_federated.py``);
        errors that need all the rows (a single site, a confounded covariate) are raised
        then, and at every use after, until more chunks make the model possible. A failed
        :meth:`fit` (or fit from statistics or summaries) leaves the estimator unfitted.
        The site and covariate options (``batch_col``, ``categorical_cols``,
        ``continuous_cols``, ``smooth_*``) are those of the first chunk: a chunk after
        ``set_params`` of any of them is refused, naming them.
        :meth:`fit` discards the accumulated statistics; ``partial_fit`` after
        :meth:`fit` starts a new model (with a UserWarning: ``fit`` keeps no statistics).

        Every option of :meth:`fit` is supported; ``smooth_cols`` needs ``smooth_knots`` as
        knot positions (the default quantile knots of all the rows are unknown until the last
        chunk: a ValueError says so), and then equals :meth:`fit` with the same knots.

        Parameters
        ----------
        X : DataFrame or array-like of shape (n_rows, n_columns)
            A chunk of rows, with the columns of the first chunk. A block of a dask array is
            computed first.
        y : None
            Ignored.
        batch : array-like of shape (n_rows,), default=None
            Site of each row, when ``batch_col`` is None.
        covariates : DataFrame, default=None
            Covariate columns, when ``batch_col`` is None.

        Returns
        -------
        self : CombatHarmonizer

        Examples
        --------
        >>> import numpy as np
        >>> from kwneuro_sk import CombatHarmonizer
        >>> rng = np.random.default_rng(0)
        >>> X, site = rng.normal(size=(40, 3)), np.tile(["a", "b"], 20)
        >>> incremental = CombatHarmonizer()
        >>> for rows in np.array_split(np.arange(40), 4):
        ...     _ = incremental.partial_fit(X[rows], batch=site[rows])
        >>> whole = CombatHarmonizer().fit(X, batch=site)
        >>> bool(np.allclose(incremental.gamma_star_, whole.gamma_star_, rtol=1e-10))
        True
        """
        if _dask.is_dask(X):
            X = X.compute()
        first = getattr(self, "_partial_statistics", None) is None
        self._validate_params()
        self._check_incremental("partial_fit")
        options = self._statistics_options()
        if not first:
            self._check_options(
                self._partial_options,
                options,
                "partial_fit: the earlier chunks were",
                " (set_params between chunks): their statistics cannot take rows read under "
                "other options. Call fit on all the rows, or start a new estimator (clone) "
                "for the new options",
            )
        fitted = first and hasattr(self, "n_features_in_")
        before = dict(self.__dict__)  # a refused (or empty) chunk leaves the estimator as it was
        added = False
        try:
            if first:  # a new model: nothing of an earlier fit is kept
                self._discard_fitted_state()
            rows = self._read_rows(X, batch, covariates, reset=first, allow_empty=True)
            if len(rows.sites):  # an empty chunk is checked, and adds nothing
                self._partial_statistics = self._statistics_of(
                    rows, into=None if first else self._partial_statistics
                )
                self._partial_options = options
                added = True
        finally:
            if not added:
                self.__dict__.clear()
                self.__dict__.update(before)
        if not added:
            return self
        for name in self._FITTED_STATE:
            self.__dict__.pop(name, None)
        self._fit_pending = True
        if fitted:
            warnings.warn(
                f"{type(self).__name__} was fitted with fit() (or from summaries), which "
                "keeps no statistics of its rows: partial_fit starts a new model from "
                "this chunk",
                UserWarning,
                stacklevel=2,
            )
        return self

    @available_if(lambda self: self._check_statistics_route("site_summary"))
    def site_summary(self, X, *, batch=None, covariates=None, min_rows=10):
        """Summarize one site's rows for federated ComBat, without fitting anything.

        The summary holds per-site aggregates only (row counts, means, centred sums of
        squares and cross products; see :class:`~kwneuro_sk.SiteSummary` for every field and
        what it reveals), never a row. Save it with :meth:`SiteSummary.save` and send the
        file to the coordinator, who calls :meth:`fit_from_summaries` with the same options.
        The estimator itself is left unchanged.

        Parameters
        ----------
        X, batch, covariates
            As in :meth:`fit`: the rows of this site (one or more site labels).
        min_rows : int, default=10
            Smallest number of rows of each site in the summary; smaller sites are refused
            (their aggregates come too close to single rows).

        Returns
        -------
        summary : SiteSummary

        Examples
        --------
        >>> import numpy as np
        >>> from kwneuro_sk import CombatHarmonizer
        >>> rng = np.random.default_rng(0)
        >>> summary = CombatHarmonizer().site_summary(rng.normal(size=(12, 3)), batch=["a"] * 12)
        >>> summary.sites, summary.n_values
        (['a'], 10)
        """
        if isinstance(min_rows, bool) or not isinstance(min_rows, Integral) or min_rows < 1:
            raise ValueError(f"min_rows must be a positive integer; got {min_rows!r}")
        if _dask.is_dask(X):
            X = X.compute()
        helper = clone(self)
        helper._validate_params()
        helper._check_incremental("site_summary")
        rows = helper._read_rows(X, batch, covariates, reset=True)
        stats = helper._statistics_of(rows)
        helper._check_statistics_range(stats.moments.magnitude)  # before a useless summary
        small = [(s, int(n)) for s, n in zip(stats.sites, stats.moments.n) if n < min_rows]
        if small:
            raise ValueError(
                f"site(s) {format_labels([s for s, _ in small])} have "
                f"{[n for _, n in small]} rows, fewer than min_rows={min_rows}: a summary of "
                "so few rows comes close to revealing single rows. Pool them with another "
                "site, or lower min_rows if your data agreement allows it"
            )
        roles = ColumnRoles.of(self)
        for col in roles.categorical:
            values = rows.covariates[col].astype(object)
            for site in stats.sites:
                counts = values[rows.sites == site].value_counts()
                total = int(counts.sum())
                lonely = [lv for lv, c in counts.items() if c == 1 or (0 < total - c == 1)]
                if lonely:
                    raise ValueError(
                        f"categorical covariate {col!r} has level(s) {format_labels(lonely)} "
                        f"held by a single row of site {site!r} (or by all rows but one): "
                        "the summary would reveal that row's feature values. Merge rare "
                        "levels, or leave that row out"
                    )
        covariate_options = {
            "categorical_cols": list(roles.categorical),
            "continuous_cols": list(roles.continuous),
        }
        if roles.smooth:  # the knots themselves are in the statistics
            covariate_options["smooth_cols"] = list(roles.smooth)
        return SiteSummary(
            statistics=stats,
            covariates=covariate_options,
            features=helper._feature_description(),
            min_rows=int(min_rows),
        )

    @available_if(lambda self: self._check_statistics_route("fit_from_summaries"))
    @unfitted_on_failure
    def fit_from_summaries(self, summaries):
        """Fit from the :class:`~kwneuro_sk.SiteSummary` of several sites (federated ComBat).

        The result equals :meth:`fit` on the pooled rows of all the sites (to rounding), for
        every option (``smooth_cols`` with the knots fixed in advance, the same at every site:
        ``smooth_knots`` as knot positions): one round trip (each site sends its summary; the
        coordinator sends back the fitted model, e.g. saved with
        :meth:`CombatEstimates.save`, which each site applies to its own rows). The
        summaries must have been made with this harmonizer's ``batch_col``,
        ``categorical_cols`` and ``continuous_cols`` and hold the same features; a
        difference raises a ValueError naming it.

        Parameters
        ----------
        summaries : list of SiteSummary
            One or more per site (sites may appear in several summaries: their rows are
            merged).

        Returns
        -------
        self : CombatHarmonizer
            Fitted.
        """
        summaries = list(summaries) if np.iterable(summaries) else [summaries]
        if not summaries or not all(isinstance(s, SiteSummary) for s in summaries):
            raise TypeError("fit_from_summaries takes a non-empty list of SiteSummary objects")
        self._validate_params()
        self._check_incremental("fit_from_summaries", needs_knots=False)
        wanted = self._column_options()
        first = summaries[0].features
        for i, summary in enumerate(summaries):
            where = f"summary {i} (site(s) {format_labels(summary.sites)})"
            made_with = {
                "batch_col": summary.features["batch_col"],
                **{
                    name: list(summary.covariates.get(name, []))
                    for name in wanted
                    if name != "batch_col"
                },
            }
            self._check_options(
                made_with,
                wanted,
                f"{where} was",
                ": every site and the coordinator must use the same options",
            )
            for key in ("n_features_in", "feature_names", "columns_in"):
                if summary.features[key] != first[key]:
                    raise ValueError(
                        f"{where} has other features than summary 0: {key} "
                        f"{_preview_value(summary.features[key])} vs "
                        f"{_preview_value(first[key])}"
                    )
        return self.fit_from_statistics(
            statistics.merge_all(s.statistics for s in summaries),
            n_features_in=first["n_features_in"],
            feature_names_in=first["feature_names_in"],
            feature_names_out=first["feature_names"],
            columns_in=first["columns_in"],
        )

    def transform(self, X, *, batch=None, covariates=None, subjects=None):
        """Harmonize rows with the fitted estimates and the rows' own covariates.

        Each row's result depends only on that row (and, for sites unseen in fit with
        ``unseen_batch="adapt"``, on the other rows of its site in this call). With
        ``subject_col`` (longitudinal ComBat), rows of subjects seen in fit use their fitted
        random effects; the random effects of subjects new to the model are predicted from
        their own rows in this call (best linear unbiased prediction with the fitted variance
        components), so a new subject's result depends on its rows only.

        Parameters
        ----------
        X : DataFrame or array-like of shape (n_samples, n_columns)
            Same columns as in fit. DataFrame columns are matched by name, whatever their
            type (str, int, tuple): the fitted columns in another order, or other columns,
            raise a ValueError naming them. Arrays are taken by position.
        batch : array-like of shape (n_samples,), default=None
            Site of each row, when ``batch_col`` is None. When ``X``, ``batch`` and
            ``covariates`` are pandas objects, their indexes must be equal (rows are paired
            by position; a ValueError names the first differing row label).
        covariates : DataFrame, default=None
            Covariate columns, when ``batch_col`` is None.
        subjects : array-like of shape (n_samples,), default=None
            Subject of each row, when ``batch_col`` is None and ``subject_col`` is set.

        Returns
        -------
        X_harmonized : ndarray of shape (n_samples, n_features_out)
            Only the feature columns, float32 for float32 input, float64 otherwise. For a
            dask array or DataFrame, a lazy collection of the same kind (one block at a time;
            sites unseen in fit raise, also with ``unseen_batch="adapt"``).
        """
        check_is_fitted(self)
        if _dask.is_dask(X):  # lazy: map_blocks / map_partitions
            self._refuse_longitudinal("dask input")
            return _dask.transform(self, X, batch, covariates)
        rows = self._read_rows(
            X, batch, covariates, reset=False, subjects=subjects, allow_empty=True
        )
        if not len(rows.sites):  # no rows (a dask partition emptied by a filter)
            return np.empty((0, len(self.grand_mean_)), dtype=rows.features.dtype)
        return self._transform(rows)

    def inverse_transform(self, X, *, batch=None, covariates=None, subjects=None):
        """Map harmonized features back to each row's site scale.

        Parameters
        ----------
        X : DataFrame or array-like of shape (n_samples, n_features_out)
            Harmonized features, as returned by :meth:`transform`. With ``batch_col`` set, a
            DataFrame that also holds the site and covariate columns may be given instead of
            ``batch=`` / ``covariates=``.
        batch : array-like of shape (n_samples,), default=None
            Site of each row (required unless the site column is in ``X``).
        covariates : DataFrame, default=None
            Covariate columns (required unless they are in ``X``).
        subjects : array-like of shape (n_samples,), default=None
            Subject of each row (longitudinal ComBat, unless the subject column is in ``X``);
            only subjects seen in fit (the random effects of new subjects were predicted from
            their unharmonized rows).

        Returns
        -------
        X_original : ndarray of shape (n_samples, n_features_out)
        """
        check_is_fitted(self)
        from_columns = (
            self.batch_col is not None
            and isinstance(X, pd.DataFrame)
            and self.batch_col in X.columns
        )
        if isinstance(X, pd.DataFrame) and self._feature_names_out is not None:
            given = (
                feature_columns(X, self.batch_col, self._metadata_columns())
                if from_columns
                else list(X.columns)
            )
            check_harmonized_order(given, self._feature_names_out)
        rows = self._split(X, batch, covariates, from_columns=from_columns, subjects=subjects)
        n_out = len(self.grand_mean_)
        if rows.features.shape[1] != n_out:
            raise ValueError(
                f"inverse_transform expects the {n_out} harmonized features "
                f"{format_labels(self.get_feature_names_out())}; "
                f"got {rows.features.shape[1]} columns"
            )
        idx = self._batch_indices(rows.sites)
        if (idx < 0).any():
            raise ValueError(
                "inverse_transform needs sites seen in fit; unseen: "
                f"{format_labels(pd.unique(rows.sites[idx < 0]))}"
            )
        offset = None
        if self._longitudinal():
            offset = self._random_effect_rows(rows, idx, inverse=True)
        Z = self._covariates.transform(rows.covariates)
        features = rows.features if offset is None else rows.features - offset
        result = model.adjust(
            features,
            Z,
            idx,
            self._standardization(),
            self.gamma_star_,
            self.delta_star_,
            passthrough_rows=self._reference_rows(idx),
            inverse=True,
            n_jobs=self._threads(),
        )
        return result if offset is None else self._add_offset(result, offset, rows.features)

    def get_feature_names_out(self, input_features=None):
        """Names of the harmonized feature columns (site and covariate columns excluded).

        Parameters
        ----------
        input_features : array-like of str, default=None
            Input column names, checked as scikit-learn does: they must equal
            ``feature_names_in_`` when that is set, and number ``n_features_in_``. Without
            column names in fit, the output names are ``input_features`` (less the site and
            covariate columns) or ``x0, x1, ...``.

        Returns
        -------
        feature_names_out : ndarray of str objects
        """
        check_is_fitted(self, "grand_mean_")
        names = _check_feature_names_in(self, input_features, generate_names=False)
        if input_features is not None and self._feature_names_out is None:
            meta = set(self._metadata_columns()) | {self.batch_col}
            return np.asarray([str(n) for n in names if n not in meta], dtype=object)
        if self._feature_names_out is None:
            return np.asarray([f"x{i}" for i in range(len(self.grand_mean_))], dtype=object)
        return self._feature_names_out.copy()

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    @classmethod
    def from_estimates(cls, estimates):
        """Rebuild a fitted harmonizer from :class:`~kwneuro_sk.CombatEstimates`.

        The result transforms exactly as the harmonizer that produced ``estimates`` (for
        instance after :meth:`CombatEstimates.save` and :meth:`CombatEstimates.load`).

        Parameters
        ----------
        estimates : CombatEstimates
            As given by :attr:`estimates_`.

        Returns
        -------
        combat : CombatHarmonizer
            Fitted.

        Examples
        --------
        >>> import numpy as np
        >>> from kwneuro_sk import CombatHarmonizer
        >>> rng = np.random.default_rng(0)
        >>> X, site = rng.normal(size=(20, 4)), np.repeat(["a", "b"], 10)
        >>> fitted = CombatHarmonizer().fit(X, batch=site)
        >>> rebuilt = CombatHarmonizer.from_estimates(fitted.estimates_)
        >>> bool(np.array_equal(rebuilt.transform(X, batch=site), fitted.transform(X, batch=site)))
        True
        """
        estimates.check()
        info = estimates.info
        combat = cls(
            batch_col=info["batch_col"],
            categorical_cols=list(info["categorical_cols"]) or None,
            continuous_cols=list(info["continuous_cols"]) or None,
            eb=info["eb"],
            parametric=info["parametric"],
            mean_only=info["mean_only"],
            ref_batch=info["ref_batch"],
            unseen_batch=info["unseen_batch"],
        )
        if info.get("smooth_cols"):
            combat.set_params(
                smooth_cols=list(info["smooth_cols"]),
                smooth_knots=len(info["smooth_knots"][0]),
                smooth_degree=int(info["smooth_degree"]),
                smooth_extrapolation=info["smooth_extrapolation"],
            )
        if info.get("subject_col") is not None:  # longitudinal ComBat
            combat.set_params(
                subject_col=info["subject_col"],
                random_slope=info["random_slope"],
                sigma_method=info["sigma_method"],
            )
            combat.subjects_ = np.asarray(info["subjects"])
            for name in _LONGITUDINAL_ARRAYS:
                setattr(combat, name, np.asarray(estimates.estimates[name[:-1]]))
        for name in FITTED_ARRAYS:
            setattr(combat, name + "_", np.asarray(estimates.estimates[name]))
        sigma = estimates.estimates.get("sigma")  # absent from files of earlier releases
        combat._sigma = None if sigma is None else np.asarray(sigma, dtype=np.float64)
        combat.batches_ = np.asarray(info["batches"])
        combat.n_samples_per_batch_ = np.asarray(info["n_samples_per_batch"])
        combat.n_features_in_ = int(info["n_features_in"])
        if info["feature_names_in"] is not None:
            combat.feature_names_in_ = np.asarray(info["feature_names_in"], dtype=object)
        columns = info.get("columns_in", info["feature_names_in"])
        combat._columns_in = None if columns is None else list(columns)
        combat._covariates = CovariateEncoding.from_state(info)
        combat.covariate_names_ = combat._covariates.names
        names = info["feature_names"]
        combat._feature_names_out = None if names is None else np.asarray(names, dtype=object)
        combat.estimates_ = estimates
        return combat

    # ---------------------------------------------------------------------------------------
    # fitting and applying
    # ---------------------------------------------------------------------------------------

    def _fit(self, rows):
        """Fit on the rows in memory (fits from statistics: :meth:`fit_from_statistics`)."""
        try:
            self.batches_, batch_idx, counts = np.unique(
                rows.sites, return_inverse=True, return_counts=True
            )
        except TypeError as exc:
            raise TypeError(
                "site labels must be of one sortable type (all strings or all "
                f"numbers); got {format_labels(pd.unique(rows.sites))}"
            ) from exc
        self.n_samples_per_batch_ = counts
        n_batches = len(self.batches_)
        if n_batches < 2:
            raise ValueError(
                f"ComBat needs at least two sites; all rows (n_samples="
                f"{len(rows.sites)}) are from site {format_labels(self.batches_)}"
            )
        ref = self._reference_index()
        if not self.mean_only and (counts < 2).any():
            raise ValueError(
                f"site(s) {format_labels(self.batches_[counts < 2])} have a single row, so "
                "their variance cannot be estimated; use mean_only=True to adjust only the site "
                "means, or drop or merge those sites"
            )

        roles = ColumnRoles.of(self)
        self._covariates = CovariateEncoding.fit(
            rows.covariates,
            roles.categorical,
            roles.continuous,
            roles.smooth,
            n_knots=self.smooth_knots,
            degree=self.smooth_degree,
            extrapolation=self.smooth_extrapolation,
        )
        self.covariate_names_ = self._covariates.names
        Z = self._covariates.transform(rows.covariates)
        self._check_design(batch_idx, n_batches, Z)
        if self._longitudinal():
            return self._fit_longitudinal(rows, batch_idx, counts, Z)
        standardization, mean, ss = model.fit_location_scale(
            rows.features, batch_idx, n_batches, Z, ref=ref, n_jobs=self._threads()
        )
        return self._finish_fit(counts, ref, standardization, mean, ss)

    def _fit_longitudinal(self, rows, batch_idx, counts, Z):
        """Longitudinal ComBat: REML mixed model of every feature, then longCombat's EB."""
        n_batches = len(counts)
        column = self.subject_col
        labels, codes = longitudinal.subject_codes(rows.subjects, len(batch_idx), column)
        times = self._slope_values(rows.covariates)
        longitudinal.check_longitudinal_design(
            codes, len(labels), 1 if times is None else 2, column
        )
        design = model.design_matrix(batch_idx, n_batches, Z)
        fit = longitudinal.fit_mixed_model(
            rows.features, design, codes, len(labels), times, sigma_method=self.sigma_method
        )
        intercepts = fit.coef[:n_batches]
        grand_mean = counts @ intercepts / counts.sum()
        with np.errstate(over="ignore", under="ignore"):  # sigma**2 beyond ~1e154: inf
            var_pooled = fit.sigma**2
        standardization = model.StandardizationModel(
            grand_mean, fit.coef[n_batches:], var_pooled, fit.zero_variance, sigma=fit.sigma
        )
        offset = longitudinal.random_rows(fit.random_effects, codes, times)
        groups = [np.flatnonzero(batch_idx == k) for k in range(n_batches)]
        _, mean, ss = model.standardized_moments(rows.features - offset, Z, standardization, groups)
        self.subjects_ = labels
        self.random_effects_ = fit.random_effects
        self.random_effects_cov_ = fit.cov
        self.batch_effects_ = intercepts - grand_mean
        self.singular_fit_ = fit.boundary
        return self._finish_fit(counts, None, standardization, mean, ss)

    def _longitudinal(self):
        return getattr(self, "subject_col", None) is not None

    def _refuse_longitudinal(self, route):
        if self._longitudinal():
            raise ValueError(
                f"subject_col is not supported with {route}: longitudinal ComBat fits each "
                "subject's random effect from all of that subject's rows at once; give the "
                "rows in memory (a numpy array or pandas DataFrame)"
            )

    def _check_longitudinal_options(self):
        """Options that longitudinal ComBat does not combine with, refused by name."""
        if not self._longitudinal():
            if getattr(self, "random_slope", None) is not None:
                raise ValueError(
                    f"random_slope={self.random_slope!r} needs subject_col (the subject "
                    "whose slope varies)"
                )
            return
        if self.ref_batch is not None:
            raise ValueError(
                "ref_batch is not supported with subject_col: longitudinal ComBat centres the "
                "site effects on their size-weighted mean (as longCombat does)"
            )
        slope = self.random_slope
        if slope is not None and slope not in ColumnRoles.of(self).continuous:
            raise ValueError(
                f"random_slope={slope!r} must be one of continuous_cols "
                f"{list(ColumnRoles.of(self).continuous)}: the slope's fixed effect is "
                "modelled with it (as in lme4's y ~ time + (1 + time | subject))"
            )

    def _slope_values(self, covariates):
        if self.random_slope is None:
            return None
        return covariates[self.random_slope].to_numpy(dtype=np.float64)

    def _random_effect_rows(self, rows, idx, Z=None, *, inverse=False):
        """Each row's random-effect offset: fitted for subjects seen in fit, predicted from
        their rows here for new subjects (refused by ``inverse_transform``)."""
        column = self.subject_col
        labels, codes = longitudinal.subject_codes(rows.subjects, len(idx), column)
        times = self._slope_values(rows.covariates)
        fitted_codes = pd.Index(self.subjects_).get_indexer(labels)
        known = fitted_codes >= 0
        n_features = self.random_effects_.shape[2]
        offset = np.zeros((len(idx), n_features))
        seen_rows = known[codes]
        if seen_rows.any():
            offset[seen_rows] = longitudinal.random_rows(
                self.random_effects_,
                fitted_codes[codes[seen_rows]],
                None if times is None else times[seen_rows],
            )
        if seen_rows.all():
            return offset
        new_labels = labels[~known]
        if inverse:
            raise ValueError(
                f"inverse_transform needs subjects seen in fit; new: "
                f"{format_labels(new_labels[:10])}: their random effects were predicted from "
                "their unharmonized rows, which are not at hand here"
            )
        new_rows = np.flatnonzero(~seen_rows)
        unseen_site = idx[new_rows] < 0
        if unseen_site.any():
            raise ValueError(
                f"subject(s) {format_labels(pd.unique(labels[codes[new_rows][unseen_site]])[:10])} "
                "are new and at site(s) not seen in fit: a new subject's random effect is "
                "predicted from its residuals after the fitted site effect, unknown for a new "
                "site"
            )
        if Z is None:
            Z = self._covariates.transform(rows.covariates)
        features = np.asarray(rows.features[new_rows], dtype=np.float64)
        fixed = self.grand_mean_ + self.batch_effects_[idx[new_rows]] + Z[new_rows] @ self.beta_
        _, new_codes = np.unique(codes[new_rows], return_inverse=True)
        predicted = longitudinal.predict_random_effects(
            features - fixed,
            new_codes.reshape(-1),
            int(new_codes.max()) + 1,
            None if times is None else times[new_rows],
            self.random_effects_cov_,
        )
        offset[new_rows] = longitudinal.random_rows(
            predicted, new_codes.reshape(-1), None if times is None else times[new_rows]
        )
        return offset

    @staticmethod
    def _add_offset(result, offset, features):
        """``result + offset`` in the dtype of the input features."""
        out = np.asarray(result, dtype=np.float64) + offset
        return out.astype(features.dtype, copy=False)

    def _finish_fit(self, counts, ref, standardization, mean, ss):
        """EB estimates and fitted state from the location/scale fit."""
        usable = ~standardization.zero_variance
        if self.eb and usable.sum() < 2:
            raise ValueError(
                "eb=True estimates the priors across features and needs at least 2 features "
                f"with non-zero variance; got {int(usable.sum())} feature(s). Use eb=False."
            )
        per_batch = self._estimate_sites(counts, mean, ss, usable)
        self.grand_mean_ = standardization.grand_mean
        self.beta_ = standardization.beta
        self.var_pooled_ = standardization.var_pooled
        self.zero_variance_features_ = standardization.zero_variance
        self._sigma = standardization.sigma  # exact also where var_pooled_ over/underflows
        for name in ("gamma_hat", "delta_hat", "gamma_star", "delta_star"):
            setattr(self, name + "_", np.vstack([getattr(b, name) for b in per_batch]))
        for name in ("gamma_bar", "t2", "a_prior", "b_prior"):
            setattr(self, name + "_", np.array([getattr(b, name) for b in per_batch]))
        if ref is not None:
            self.gamma_star_[ref] = 0.0
            self.delta_star_[ref] = 1.0
        self.estimates_ = CombatEstimates(
            estimates={
                **{name: getattr(self, name + "_") for name in FITTED_ARRAYS},
                "sigma": self._standardization().scale * ~self.zero_variance_features_,
                **{
                    name[:-1]: getattr(self, name)
                    for name in _LONGITUDINAL_ARRAYS
                    if self._longitudinal()
                },
            },
            info={
                "batches": self.batches_,
                "n_samples_per_batch": self.n_samples_per_batch_,
                "ref_batch": self.ref_batch,
                "feature_names": self._feature_names_out,
                "covariate_names": self.covariate_names_,
                "batch_col": self.batch_col,
                **self._covariates.state(),
                "eb": self.eb,
                "parametric": self.parametric,
                "mean_only": self.mean_only,
                "unseen_batch": self.unseen_batch,
                "n_features_in": self.n_features_in_,
                "feature_names_in": getattr(self, "feature_names_in_", None),
                "columns_in": self._columns_in,
                **(
                    {
                        "subject_col": self.subject_col,
                        "random_slope": self.random_slope,
                        "sigma_method": self.sigma_method,
                        "subjects": self.subjects_,
                    }
                    if self._longitudinal()
                    else {}
                ),
            },
        )
        if self.zero_variance_features_.any():
            names = self.get_feature_names_out()[self.zero_variance_features_]
            warnings.warn(
                f"{names.size} feature(s) are constant after removing the site and covariate "
                f"effects and are passed through unchanged: {format_labels(names[:5])}"
                + (" ..." if names.size > 5 else ""),
                UserWarning,
                stacklevel=4,
            )
        return self

    @available_if(lambda self: self._check_statistics_route("row_statistics"))
    def row_statistics(self, X, *, batch=None, covariates=None):
        """Per-site statistics of rows, without fitting: what :meth:`partial_fit`,
        :meth:`site_summary`, dask input and streamed
        :func:`~kwneuro_sk.harmonize_volumes` compute for each chunk of rows.

        The estimator is left unchanged. Statistics of disjoint rows merge with
        :meth:`SiteStatistics.add <kwneuro_sk.combat.statistics.SiteStatistics.add>` (or
        :func:`~kwneuro_sk.combat.statistics.merge_all`), in any grouping, and
        :meth:`fit_from_statistics` fits from them: the model of :meth:`fit` on all the rows.

        Parameters
        ----------
        X, batch, covariates
            As in :meth:`fit`. With ``smooth_cols``, ``smooth_knots`` must be knot positions.

        Returns
        -------
        statistics : kwneuro_sk.combat.statistics.SiteStatistics

        Examples
        --------
        >>> import numpy as np
        >>> from kwneuro_sk import CombatHarmonizer
        >>> from kwneuro_sk.combat.statistics import merge_all
        >>> rng = np.random.default_rng(0)
        >>> X, site = rng.normal(size=(40, 3)), np.tile(["a", "b"], 20)
        >>> combat = CombatHarmonizer()
        >>> parts = [combat.row_statistics(X[r], batch=site[r]) for r in np.split(np.arange(40), 4)]
        >>> _ = combat.fit_from_statistics(merge_all(parts), n_features_in=3)
        >>> whole = CombatHarmonizer().fit(X, batch=site)
        >>> bool(np.allclose(combat.gamma_star_, whole.gamma_star_, rtol=1e-10))
        True
        """
        if _dask.is_dask(X):
            X = X.compute()
        helper = clone(self)
        helper._validate_params()
        helper._check_incremental("row_statistics")
        return helper._statistics_of(
            helper._read_rows(X, batch, covariates, reset=True, allow_empty=True)
        )

    def with_fixed_knots(self, covariates):
        """A copy whose ``smooth_knots`` are the knot positions :meth:`fit` would place on
        these covariates (quantiles of each smooth column), for fits from statistics.

        With the covariates of all the training rows at hand, :meth:`partial_fit` (and
        :meth:`row_statistics`) on the copy equals :meth:`fit` on the original. Without
        ``smooth_cols`` the copy has the same parameters; with knot positions already given,
        the same knots (as the dict), and ``covariates`` must still hold the smooth columns.

        Parameters
        ----------
        covariates : DataFrame
            Holds the ``smooth_cols`` of all the training rows.

        Returns
        -------
        combat : CombatHarmonizer
            Unfitted, with ``smooth_knots`` a dict of knot positions.

        Examples
        --------
        >>> import numpy as np, pandas as pd
        >>> from kwneuro_sk import CombatHarmonizer
        >>> ages = pd.DataFrame({"age": np.arange(20, 70, 2.0)})
        >>> fixed = CombatHarmonizer(smooth_cols="age", smooth_knots=3).with_fixed_knots(ages)
        >>> fixed.smooth_knots["age"].tolist()
        [20.0, 44.0, 68.0]
        """
        self._validate_params()
        smooth = ColumnRoles.of(self).smooth
        helper = clone(self)
        if not smooth:
            return helper
        if not isinstance(covariates, pd.DataFrame):
            raise TypeError(
                f"covariates must be a DataFrame holding smooth_cols {list(smooth)}; got "
                f"{type(covariates).__name__}"
            )
        for col in smooth:
            if col not in covariates.columns:
                raise ValueError(
                    f"smooth covariate {col!r} not found in covariates (columns: "
                    f"{list(covariates.columns)})"
                )
            try:
                values = covariates[col].to_numpy(dtype=np.float64)
            except (TypeError, ValueError):
                values = np.array([np.nan])
            if not np.isfinite(values).all():
                raise ValueError(
                    f"smooth covariate {col!r} must hold finite numbers to place its knots"
                )
        return helper.set_params(smooth_knots=quantile_knots(covariates, smooth, self.smooth_knots))

    @available_if(lambda self: self._check_statistics_route("fit_from_statistics"))
    @unfitted_on_failure
    def fit_from_statistics(
        self,
        statistics,
        *,
        n_features_in=None,
        feature_names_in=None,
        feature_names_out=None,
        columns_in=None,
    ):
        """Fit from merged per-site statistics of all the training rows (the one fit of
        :meth:`partial_fit`, :meth:`fit_from_summaries`, dask input and streamed
        :func:`~kwneuro_sk.harmonize_volumes`).

        Parameters
        ----------
        statistics : kwneuro_sk.combat.statistics.SiteStatistics
            From :meth:`row_statistics` of chunks of rows, merged. Made with this
            estimator's covariate options (the smooth knots they hold are used).
        n_features_in : int, default=None
            Number of input columns: by default the statistics' number of features, plus
            the site and covariate columns when ``batch_col`` is set.
        feature_names_in, feature_names_out, columns_in : list, default=None
            Column names, when known.

        Returns
        -------
        self : CombatHarmonizer
            Fitted (see :meth:`row_statistics` for an example).
        """
        if not isinstance(statistics, SiteStatistics):
            raise TypeError(
                "fit_from_statistics takes the SiteStatistics of row_statistics (merged); got "
                f"{type(statistics).__name__}"
            )
        self._validate_params()
        self._check_incremental("fit_from_statistics", needs_knots=False)
        if n_features_in is None:  # the features, and the site and covariate columns of X
            n_features_in = statistics.n_features + len(ColumnRoles.of(self).metadata)
        self._check_statistics_columns(
            statistics, n_features_in, feature_names_in, feature_names_out, columns_in
        )
        self.n_features_in_ = int(n_features_in)
        if feature_names_in is not None:
            self.feature_names_in_ = np.asarray(feature_names_in, dtype=object)
        self._feature_names_out = (
            None if feature_names_out is None else np.asarray(feature_names_out, dtype=object)
        )
        self._columns_in = None if columns_in is None else list(columns_in)
        try:
            merged = statistics.aligned(sorted(statistics.sites), statistics.columns)
        except TypeError as exc:
            raise TypeError(
                "site labels must be of one sortable type (all strings or all numbers); got "
                f"{format_labels(statistics.sites)}"
            ) from exc
        return self._fit_statistics(merged)

    def _check_statistics_columns(
        self, stats, n_features_in, feature_names_in, feature_names_out, columns_in
    ):
        """The column counts and names given to :meth:`fit_from_statistics` agree with the
        statistics (and each other), and the statistics hold this estimator's covariates."""
        n_features = stats.n_features
        roles = ColumnRoles.of(self)
        metadata = roles.metadata
        if (
            isinstance(n_features_in, bool)
            or not isinstance(n_features_in, Integral)
            or n_features_in < n_features
            or (not metadata and n_features_in != n_features)
        ):
            raise ValueError(
                f"n_features_in must be the number of input columns: the statistics' "
                f"{n_features} features"
                + (" and the site and covariate columns" if metadata else "")
                + f"; got {n_features_in!r}"
            )
        for name, value, size in (
            ("feature_names_in", feature_names_in, n_features_in),
            ("columns_in", columns_in, n_features_in),
            ("feature_names_out", feature_names_out, n_features),
        ):
            if value is not None and len(value) != size:
                raise ValueError(
                    f"{name} has {len(value)} names for {size} "
                    f"{'features' if name == 'feature_names_out' else 'input columns'}"
                )
        missing = [col for col in roles.categorical if not stats.levels(col)]
        missing += [col for col in roles.continuous if ("value", col) not in stats.columns]
        if missing:
            raise ValueError(
                f"the statistics were made without covariate(s) {missing}; this harmonizer "
                f"has categorical_cols={list(roles.categorical)} and "
                f"continuous_cols={list(roles.continuous)}: make the statistics with the "
                "same covariate options"
            )

    # Fitted state computed from the statistics on first use after partial_fit.
    _FITTED_STATE = frozenset(
        {
            "batches_",
            "n_samples_per_batch_",
            "covariate_names_",
            "grand_mean_",
            "beta_",
            "var_pooled_",
            "zero_variance_features_",
            "gamma_hat_",
            "delta_hat_",
            "gamma_star_",
            "delta_star_",
            "gamma_bar_",
            "t2_",
            "a_prior_",
            "b_prior_",
            "estimates_",
            "_covariates",
            "_sigma",
        }
    )

    # Fitted state that does not end in "_", discarded with the fitted attributes.
    _PRIVATE_STATE = frozenset(
        {
            "_covariates",
            "_sigma",
            "_columns_in",
            "_feature_names_out",
            "_partial_statistics",
            "_partial_options",
            "_fit_pending",
        }
    )

    def _discard_fitted_state(self):
        """Remove every fitted attribute (and the statistics of partial_fit): unfitted."""
        params = set(self._get_param_names())
        for name in list(self.__dict__):
            fitted = name.endswith("_") and not name.startswith("__") and name not in params
            if fitted or name in self._PRIVATE_STATE:
                del self.__dict__[name]

    def __getattr__(self, name):
        # Only called for attributes not set: the fitted state after partial_fit.
        state = self.__dict__
        if name in CombatHarmonizer._FITTED_STATE and state.get("_fit_pending"):
            state["_fit_pending"] = False  # while the model is computed
            try:
                self._fit_statistics(state["_partial_statistics"])
            except BaseException:
                # no part of a model: the error (one site, a confounded covariate) is raised
                # again on the next use, and later chunks may still be added
                for fitted in CombatHarmonizer._FITTED_STATE:
                    state.pop(fitted, None)
                state["_fit_pending"] = True
                raise
            return state[name]
        if name in CombatHarmonizer._STATISTICS_ROUTES:
            # hidden by available_if: say why (CovBatHarmonizer), not just "no attribute"
            self._check_statistics_route(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    _STATISTICS_ROUTES = frozenset(
        {
            "partial_fit",
            "row_statistics",
            "fit_from_statistics",
            "site_summary",
            "fit_from_summaries",
        }
    )

    def _check_statistics_route(self, method):
        """Whether the estimator can be fitted from statistics (``available_if`` check)."""
        return True

    def _check_incremental(self, method, needs_knots=True):
        """Options that statistics of chunks or sites cannot serve, refused by name."""
        if getattr(self, "subject_col", None) is not None:  # longitudinal ComBat
            raise ValueError(
                f"{method} does not support subject_col: longitudinal ComBat estimates each "
                "subject's random effect from all of that subject's rows, which per-site "
                "statistics do not hold; fit on the pooled rows"
            )
        smooth = ColumnRoles.of(self).smooth
        if smooth and needs_knots and fixed_knots(self.smooth_knots, smooth) is None:
            raise ValueError(
                f"{method} with smooth_cols needs the B-spline knots fixed in advance: "
                f"smooth_knots={self.smooth_knots} places them at quantiles of all the "
                "training rows, unknown to a chunk or a site. Give the knot positions, e.g. "
                f"smooth_knots={{{smooth[0]!r}: [20, 35, 50, 65, 80]}} (fit with the same "
                "knots gives the same model), fit on the pooled rows, or model the covariate "
                "in continuous_cols"
            )

    def _column_options(self):
        """Which columns are sites and covariates (options of per-site statistics)."""
        roles = ColumnRoles.of(self)
        return {
            "batch_col": self.batch_col,
            "categorical_cols": list(roles.categorical),
            "continuous_cols": list(roles.continuous),
            "smooth_cols": list(roles.smooth),
        }

    def _statistics_options(self):
        """The options that decide what per-site statistics hold: which columns are sites
        and covariates, and how covariates become design columns (knots fixed)."""
        smooth = self._smooth_settings()
        return {
            **self._column_options(),
            "smooth_knots": {col: spec["knots"] for col, spec in smooth.items()},
            "smooth_degree": self.smooth_degree if smooth else None,
            "smooth_extrapolation": self.smooth_extrapolation if smooth else None,
        }

    @staticmethod
    def _check_options(made_with, options, what, advice):
        """Refuse statistics ``made_with`` other options than ``options``, naming each."""
        changed = [name for name, value in options.items() if made_with.get(name) != value]
        if changed:
            raise ValueError(
                f"{what} made with "
                + ", ".join(f"{name}={made_with.get(name)!r}" for name in changed)
                + "; this harmonizer has "
                + ", ".join(f"{name}={options[name]!r}" for name in changed)
                + advice
            )

    def _feature_description(self):
        """Feature names and counts as plain data (for a SiteSummary)."""
        names_in = getattr(self, "feature_names_in_", None)
        plain = statistics_plain_list
        return {
            "n_features_in": int(self.n_features_in_),
            "feature_names_in": plain(names_in),
            "columns_in": plain(self._columns_in),
            "feature_names": plain(self._feature_names_out),
            "batch_col": self.batch_col,
        }

    def _smooth_settings(self):
        """Spline settings of each smooth column on fixed knots (for SiteStatistics)."""
        roles = ColumnRoles.of(self)
        knots = fixed_knots(self.smooth_knots, roles.smooth) or {}
        return statistics.plain_smooth(
            {
                col: {
                    "knots": knots[col],
                    "degree": self.smooth_degree,
                    "extrapolation": self.smooth_extrapolation,
                }
                for col in roles.smooth
            }
        )

    def _statistics_of(self, rows, into=None):
        """Per-site statistics of validated rows (covariates unencoded), or ``into`` with
        the rows added in place."""
        roles = ColumnRoles.of(self)
        smooth = self._smooth_settings()
        keys, Z = raw_design(rows.covariates, roles.categorical, roles.continuous, smooth)
        if into is not None:
            return into.add_rows(rows.features, rows.sites, keys, Z, smooth)
        return SiteStatistics.of_rows(rows.features, rows.sites, keys, Z, smooth)

    def _fit_statistics(self, stats):
        """Fit from merged :class:`~kwneuro_sk.combat.statistics.SiteStatistics` (feature
        names and counts already set)."""
        statistics.check_complete(stats.moments)  # not left part-updated by an interruption
        self._check_statistics_range(stats.moments.magnitude)
        roles = ColumnRoles.of(self)
        sites = np.array(stats.sites)
        self.batches_ = sites.astype(object) if sites.dtype.kind == "U" else sites
        counts = np.rint(stats.moments.n).astype(np.int64)
        self.n_samples_per_batch_ = counts
        n_batches = len(self.batches_)
        if n_batches < 2:
            raise ValueError(
                f"ComBat needs at least two sites; all rows (n_samples={int(counts.sum())}) "
                f"are from site {format_labels(self.batches_)}"
            )
        ref = self._reference_index()
        if not self.mean_only and (counts < 2).any():
            raise ValueError(
                f"site(s) {format_labels(self.batches_[counts < 2])} have a single row, so "
                "their variance cannot be estimated; use mean_only=True to adjust only the site "
                "means, or drop or merge those sites"
            )
        self._check_smooth_settings(stats.smooth, roles.smooth)
        moments, levels = stats.encoded(roles.categorical, roles.continuous, roles.smooth)
        self._covariates = CovariateEncoding(
            roles.categorical,
            roles.continuous,
            levels,
            roles.smooth,
            [stats.smooth[col]["knots"] for col in roles.smooth],
            self.smooth_degree,
            self.smooth_extrapolation,
        )
        self.covariate_names_ = self._covariates.names
        n_design = n_batches + moments.zbar.shape[1]
        if counts.sum() <= n_design:
            raise ValueError(
                f"{int(counts.sum())} rows for {n_design} design columns ({n_batches} "
                f"sites + {moments.zbar.shape[1]} covariate columns) leave no residual degrees "
                "of freedom, so the pooled variance cannot be estimated; give more rows or "
                "fewer covariates"
            )
        # The rank test on the pooled within-site scatter of the covariates with unit
        # diagonal (the Gram matrix of their within-site deviations scaled to unit norm, as
        # fit's test): independent of units and offsets. A covariate whose within-site
        # scatter is at the rounding of its values (constant in every site) has none.
        within = moments.czz.sum(axis=0)
        spread = np.sqrt(np.maximum(np.diag(within), 0.0))
        rounding = 64 * np.finfo(np.float64).eps * np.abs(moments.zbar).max(axis=0, initial=0.0)
        spread[spread <= np.sqrt(counts.sum()) * rounding] = 0.0
        scale = np.divide(1.0, spread, out=np.zeros_like(spread), where=spread > 0)
        within = within * np.outer(scale, scale)
        stop = 0
        for col, width in zip(self._covariates.columns, self._covariates.widths()):
            stop += width
            if np.linalg.matrix_rank(within[:stop, :stop], hermitian=True) < stop:
                raise ValueError(
                    f"covariate {col!r} is confounded with site (or with the covariates "
                    "before it): the design matrix [site one-hot | covariates] is "
                    "rank-deficient, so its effect cannot be told apart from the site effect. "
                    "Remove it from categorical_cols/continuous_cols, or check that each site "
                    "has more than one value of it."
                )
        standardization, mean, ss = statistics.fit_from_moments(moments, ref)
        return self._finish_fit(counts, ref, standardization, mean, ss)

    def _check_statistics_range(self, magnitude):
        """Statistics hold sums of squared deviations: features beyond ~1e150 overflow them
        and features below ~1e-150 underflow them (fit scales each feature by a power of two
        first; statistics merged across chunks and sites cannot). Refused by name."""
        extreme = (magnitude >= 2.0**500) | ((magnitude > 0) & (magnitude < 2.0**-500))
        if extreme.any():
            names = self._feature_names_out
            where = np.flatnonzero(extreme)
            labels = [names[i] if names is not None else f"x{i}" for i in where[:10]]
            raise ValueError(
                f"feature(s) {labels}{' ...' if len(where) > 10 else ''} have values beyond "
                "1e150 or below 1e-150 in absolute value: per-site statistics (partial_fit, "
                "site summaries, dask and streamed input) hold their squares, which overflow "
                "or underflow there. Multiply those features by a power of ten first, or fit "
                "on the pooled rows (fit scales each feature exactly)"
            )

    def _check_smooth_settings(self, given, smooth):
        """The spline settings of statistics agree with this estimator's smooth options."""
        if list(given) != list(smooth):
            raise ValueError(
                f"the statistics were made with smooth covariates {list(given)}; this "
                f"harmonizer has smooth_cols={list(smooth)}"
            )
        fixed = fixed_knots(self.smooth_knots, smooth)
        for col in smooth:
            spec = given[col]
            wanted = {"degree": self.smooth_degree, "extrapolation": self.smooth_extrapolation}
            if fixed is not None:
                wanted["knots"] = [float(k) for k in fixed[col]]
            elif len(spec["knots"]) != self.smooth_knots:
                wanted["knots"] = f"{self.smooth_knots} knots"
            for key, value in wanted.items():
                if spec[key] != value:
                    raise ValueError(
                        f"the statistics of smooth covariate {col!r} were made with "
                        f"{key}={spec[key]!r}; this harmonizer has {value!r}"
                    )

    def _transform(self, rows):
        Z = self._covariates.transform(rows.covariates)
        idx = self._batch_indices(rows.sites)
        if self._longitudinal():
            offset = self._random_effect_rows(rows, idx, Z)
            shifted = Rows(rows.features - offset, rows.sites, rows.covariates)
            return self._add_offset(self._transform_rows(shifted, Z, idx), offset, rows.features)
        return self._transform_rows(rows, Z, idx)

    def _transform_rows(self, rows, Z, idx):
        gamma_star, delta_star = self.gamma_star_, self.delta_star_
        unseen = idx < 0
        if unseen.any():
            new_sites = pd.unique(rows.sites[unseen])
            if self.unseen_batch not in ("error", "adapt"):  # set_params after fit
                raise ValueError(
                    f"unseen_batch must be 'error' or 'adapt'; got {self.unseen_batch!r}"
                )
            if self.unseen_batch == "error":
                raise ValueError(
                    f"site(s) {format_labels(new_sites)} were not seen in fit (fitted sites: "
                    f"{format_labels(self.batches_)}); set unseen_batch='adapt' to estimate a new "
                    "site's location and scale from its rows in the transform call"
                )
            gamma_star, delta_star, idx = self._adapt(rows, Z, idx, new_sites)
        return model.adjust(
            rows.features,
            Z,
            idx,
            self._standardization(),
            gamma_star,
            delta_star,
            passthrough_rows=self._reference_rows(idx),
            n_jobs=self._threads(),
        )

    def _adapt(self, rows, Z, idx, new_sites):
        """Estimates for sites unseen in fit, from their rows here; fitted state untouched."""
        standardization = self._standardization()
        idx = idx.copy()
        groups = []
        for j, site in enumerate(new_sites):
            members = np.flatnonzero(rows.sites == site)
            if members.size < 2 and not self.mean_only:
                raise ValueError(
                    f"site {site!r} was not seen in fit and has a single row here; "
                    "unseen_batch='adapt' estimates a new site's scale from at least 2 of its "
                    "rows (or use mean_only=True)"
                )
            idx[members] = len(self.batches_) + j
            groups.append(members)
        n, mean, ss = model.standardized_moments(rows.features, Z, standardization, groups)
        usable = ~standardization.zero_variance
        new = self._estimate_sites(n, mean, ss, usable)
        gamma_star = np.vstack([self.gamma_star_, *[b.gamma_star for b in new]])
        delta_star = np.vstack([self.delta_star_, *[b.delta_star for b in new]])
        return gamma_star, delta_star, idx

    def _standardization(self):
        return model.StandardizationModel(
            self.grand_mean_,
            self.beta_,
            self.var_pooled_,
            self.zero_variance_features_,
            sigma=getattr(self, "_sigma", None),
        )

    def _estimate_sites(self, n, mean, ss, usable):
        """EB location/scale estimates of each site (row) from its standardized moments."""
        if self._longitudinal() and self.eb and self.parametric and not self.mean_only:
            return [
                longitudinal.longitudinal_eb(n[k], mean[k], ss[k], usable) for k in range(len(n))
            ]
        return [
            model.estimate_batch(
                n[k],
                mean[k],
                ss[k],
                eb=self.eb,
                parametric=self.parametric,
                mean_only=self.mean_only,
                usable=usable,
                n_jobs=self._threads(),
            )
            for k in range(len(n))
        ]

    def _threads(self):
        """``n_jobs`` resolved by joblib (parallel_config, container CPU limits)."""
        return max(1, joblib.effective_n_jobs(self.n_jobs))

    def _reference_index(self):
        if self.ref_batch is None:
            return None
        position = pd.Index(self.batches_).get_indexer([self.ref_batch])[0]
        if position < 0:
            raise ValueError(
                f"ref_batch={self.ref_batch!r} is not among the sites "
                f"{format_labels(self.batches_)}"
            )
        return int(position)

    def _reference_rows(self, idx):
        ref = self._reference_index()
        return None if ref is None else idx == ref

    def _batch_indices(self, sites):
        return pd.Index(self.batches_).get_indexer(sites)

    # ---------------------------------------------------------------------------------------
    # covariates and input handling (the parsing itself lives in _inputs / _covariates)
    # ---------------------------------------------------------------------------------------

    def _check_design(self, batch_idx, n_batches, Z):
        design = model.design_matrix(batch_idx, n_batches, Z)
        if design.shape[0] <= design.shape[1]:
            raise ValueError(
                f"{design.shape[0]} rows for {design.shape[1]} design columns ({n_batches} "
                f"sites + {Z.shape[1]} covariate columns) leave no residual degrees of freedom, "
                "so the pooled variance cannot be estimated; give more rows or fewer "
                "covariates (or smaller smooth_knots)"
            )
        # The rank test on the covariates centred (the site columns span the constant) and
        # every column scaled to unit norm: its answer does not depend on units or offsets.
        design = model.unit_columns(np.hstack([design[:, :n_batches], Z - Z.mean(axis=0)]))
        if np.linalg.matrix_rank(design) == design.shape[1]:
            return
        col = self._covariates.confounded_column(design, n_batches)
        if col is not None:
            raise ValueError(
                f"covariate {col!r} is confounded with site (or with the covariates "
                "before it): the design matrix [site one-hot | covariates] is "
                "rank-deficient, so its effect cannot be told apart from the site effect. "
                "Remove it from categorical_cols/continuous_cols, or check that each site "
                "has more than one value of it."
            )
        raise ValueError(
            "the design matrix [site one-hot | covariates] is rank-deficient: "
            f"{design.shape[0]} rows for {design.shape[1]} columns"
        )

    def _read_rows(self, X, batch, covariates, *, reset, subjects=None, allow_empty=False):
        if isinstance(X, pd.DataFrame):
            # Columns are matched by name, whatever their type: scikit-learn checks string
            # names (feature_names_in_, with its own messages); the labels seen in fit are
            # kept and checked here when either side has integers, tuples or mixed types.
            fitted_columns = None if reset else getattr(self, "_columns_in", None)
            if fitted_columns is not None and not (
                all(isinstance(c, str) for c in fitted_columns)
                and all(isinstance(c, str) for c in X.columns)
            ):
                check_same_columns(X.columns, fitted_columns)
            if not all(isinstance(c, str) for c in X.columns):
                X_checked = X.set_axis(range(X.shape[1]), axis=1)
                validate_data(self, X_checked, reset=reset, skip_check_array=True)
            else:
                validate_data(self, X, reset=reset, skip_check_array=True)
        else:
            if self.batch_col is None:
                # Arrays and array-likes get scikit-learn's own messages (1-D, sparse,
                # complex, empty) before anything else is looked at.
                check_not_bool(X)
                X = check_array(
                    X,
                    dtype=(np.float64, np.float32),
                    ensure_all_finite=False,
                    ensure_min_samples=0 if allow_empty else 1,
                    input_name="X",
                )
            validate_data(self, X, reset=reset, skip_check_array=True)
        if reset:
            self._check_longitudinal_options()
        rows = self._split(
            X,
            batch,
            covariates,
            from_columns=self.batch_col is not None,
            subjects=subjects,
            allow_empty=allow_empty,
        )
        if reset:
            self._columns_in = list(X.columns) if isinstance(X, pd.DataFrame) else None
            self._feature_names_out = (
                np.asarray(
                    [str(c) for c in feature_columns(X, self.batch_col, self._metadata_columns())],
                    dtype=object,
                )
                if isinstance(X, pd.DataFrame)
                else None
            )
        return rows

    def _metadata_columns(self):
        roles = ColumnRoles.of(self)
        return roles.covariates + roles.subject_columns

    def _split(self, X, batch, covariates, *, from_columns, subjects=None, allow_empty=False):
        return read_rows(
            X,
            batch,
            covariates,
            ColumnRoles.of(self),
            from_columns=from_columns,
            subjects=subjects,
            allow_empty=allow_empty,
        )


# Fitted arrays of longitudinal ComBat kept in CombatEstimates.estimates (without the "_").
_LONGITUDINAL_ARRAYS = ("random_effects_", "random_effects_cov_", "batch_effects_", "singular_fit_")


def statistics_plain_list(values):
    """A list of plain Python values (numpy scalars unwrapped), or None."""
    if values is None:
        return None
    return [v.item() if isinstance(v, np.generic) else v for v in values]


def _preview_value(value):
    if isinstance(value, list) and len(value) > 6:
        return f"[{', '.join(map(repr, value[:5]))}, ...] ({len(value)} items)"
    return repr(value)
