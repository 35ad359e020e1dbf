"""ComBat's location/scale fit from per-site sufficient statistics, chunk by chunk.

The least-squares fit of ``x = [onehot(site) | Z] @ coef`` needs, per site ``k``, only

* ``n_k`` rows, the means ``zbar_k`` (covariates) and ``xbar_k`` (features),
* the centred cross products ``Czz_k = sum (z - zbar_k)(z - zbar_k)'`` (q x q),
  ``Czx_k = sum (z - zbar_k)(x - xbar_k)'`` (q x G) and ``Cxx_k = sum (x - xbar_k)**2`` (G).

Because the design holds one intercept per site, the covariate effects are the pooled
within-site regression (Frisch-Waugh-Lovell): ``beta = (sum_k Czz_k)^-1 sum_k Czx_k``; the site
intercepts are ``xbar_k - zbar_k @ beta`` and the residual sum of squares of site ``k`` is
``Cxx_k - 2 beta' Czx_k + beta' Czz_k beta``. Everything ComBat's estimates need follows
(:func:`fit_from_moments` returns what :func:`kwneuro_sk.combat.model.fit_location_scale` returns
for the same rows).

The statistics of a chunk of rows are computed about the chunk's own site means
(:func:`chunk_moments`), keyed by site label and covariate column (:class:`SiteStatistics`),
and two sets are merged with the pairwise update of Chan, Golub & LeVeque (1979)
(:meth:`SiteStatistics.add`): no raw sums of squares are ever formed, so data with a large
offset (T1 intensities around 1e4 with a standard deviation of 10) lose no precision.
:class:`SiteStatistics` is the one statistics object of the package: ``partial_fit``, federated
summaries, dask blocks and streamed volumes all produce and merge it, and
:meth:`kwneuro_sk.CombatHarmonizer.fit_from_statistics` fits from it.
Memory is that of the statistics, ``n_sites x (n_covariates + 2) x n_features`` values,
whatever the number of rows. Plain numpy; no pandas, no scikit-learn.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kwneuro_sk.combat import model


@dataclass
class SiteMoments:
    """Centred sufficient statistics of the rows seen so far, per site.

    Attributes
    ----------
    n : ndarray of shape (n_sites,)
        Rows per site (float, so that weights need no casts).
    zbar : ndarray of shape (n_sites, n_covariates)
    xbar : ndarray of shape (n_sites, n_features)
    czz : ndarray of shape (n_sites, n_covariates, n_covariates)
    czx : ndarray of shape (n_sites, n_covariates, n_features)
    cxx : ndarray of shape (n_sites, n_features)
    magnitude : ndarray of shape (n_features,)
        Largest absolute value of each feature rounded down to a power of two (0 for no rows
        or an all-zero feature): the scale of its rounding, against which a pooled standard
        deviation counts as zero (as in :mod:`~kwneuro_sk.combat.model`). Only the power of
        two is kept, never a row's exact value.
    """

    n: np.ndarray
    zbar: np.ndarray
    xbar: np.ndarray
    czz: np.ndarray
    czx: np.ndarray
    cxx: np.ndarray
    magnitude: np.ndarray

    @classmethod
    def empty(cls, n_sites, n_covariates, n_features):
        """The statistics of no rows."""
        return cls(
            np.zeros(n_sites),
            np.zeros((n_sites, n_covariates)),
            np.zeros((n_sites, n_features)),
            np.zeros((n_sites, n_covariates, n_covariates)),
            np.zeros((n_sites, n_covariates, n_features)),
            np.zeros((n_sites, n_features)),
            np.zeros(n_features),
        )


def power_of_two_below(largest):
    """``2**floor(log2(largest))`` elementwise (0 where ``largest`` is 0): all that the constant
    feature test needs of a feature's largest absolute value, and no row's exact value."""
    largest = np.asarray(largest, dtype=np.float64)
    return np.where(largest > 0, np.ldexp(0.5, np.frexp(largest)[1]), 0.0)


def chunk_moments(X, batch_idx, n_batches, Z):
    """Centred statistics of one chunk of rows, about each site's mean in the chunk.

    Parameters
    ----------
    X : ndarray of shape (n_rows, n_features), float32 or float64
    batch_idx : ndarray of int, shape (n_rows,)
    n_batches : int
    Z : ndarray of shape (n_rows, n_covariates)

    Returns
    -------
    SiteMoments
    """
    X = np.asarray(X)
    Z = np.asarray(Z, dtype=np.float64).reshape(X.shape[0], -1)
    n_rows, n_features = X.shape
    q = Z.shape[1]
    moments = SiteMoments.empty(n_batches, q, n_features)
    if not n_rows:
        return moments
    # All sites at once, one cache-sized block of features at a time: per-site means by a
    # product with the one-hot site matrix, the rows centred about their own site's means,
    # then the centred sums as matrix products. The products are thin (a chunk's rows by a
    # few sites or covariate columns): a BLAS thread pool only adds synchronisation to them
    # (6x slower on a loaded 2-core machine, bench_federated.py), so they run on one thread.
    with model.single_blas_thread():
        _fill_moments(moments, X, Z, batch_idx, n_batches)
    return moments


def _fill_moments(moments, X, Z, batch_idx, n_batches):
    n_rows, n_features = X.shape
    q = Z.shape[1]
    onehot = np.zeros((n_rows, n_batches))
    onehot[np.arange(n_rows), batch_idx] = 1.0
    counts = onehot.sum(axis=0)
    share = np.divide(onehot, counts, out=np.zeros_like(onehot), where=counts > 0)
    moments.n[:] = counts
    moments.zbar[:] = share.T @ Z
    zc = Z - moments.zbar[batch_idx]
    site_z = (onehot[:, :, None] * zc[:, None, :]).reshape(n_rows, n_batches * q)
    moments.czz[:] = (site_z.T @ zc).reshape(n_batches, q, q)
    czx = moments.czx.reshape(n_batches * q, n_features)
    for block in model.feature_blocks(n_rows, n_features):
        values = X[:, block]
        moments.magnitude[block] = power_of_two_below(
            np.maximum(values.max(axis=0), -values.min(axis=0))
        )
        xbar = share.T @ values
        moments.xbar[:, block] = xbar
        centred = np.subtract(values, xbar[batch_idx], dtype=np.float64)
        czx[:, block] = site_z.T @ centred
        moments.cxx[:, block] = onehot.T @ np.square(centred, out=centred)


def fit_from_moments(moments, ref=None):
    """ComBat's location/scale fit from merged statistics.

    Parameters
    ----------
    moments : SiteMoments
        Of all the rows, every site with at least one row.
    ref : int or None
        Index of the reference site.

    Returns
    -------
    model : kwneuro_sk.combat.model.StandardizationModel
    mean, ss : ndarrays of shape (n_batches, n_features)
        What :func:`kwneuro_sk.combat.model.fit_location_scale` returns for the same rows.
    """
    counts = moments.n
    n_samples = counts.sum()
    n_covariates = moments.zbar.shape[1]
    if n_covariates:
        beta = np.linalg.solve(moments.czz.sum(axis=0), moments.czx.sum(axis=0))
    else:
        beta = np.zeros((0, moments.xbar.shape[1]))
    intercepts = moments.xbar - moments.zbar @ beta
    rss = (
        moments.cxx
        - 2.0 * np.einsum("qg,kqg->kg", beta, moments.czx)
        + np.einsum("qg,kqr,rg->kg", beta, moments.czz, beta)
    )
    np.maximum(rss, 0.0, out=rss)
    if ref is None:
        grand_mean = (counts / n_samples) @ intercepts
        var_pooled = rss.sum(axis=0) / n_samples
    else:
        grand_mean = intercepts[ref].copy()
        var_pooled = rss[ref] / counts[ref]
    # Constant: a residual standard deviation at the rounding of the values, as in model.
    zero_variance = np.sqrt(var_pooled) <= model.constant_resolution(moments.magnitude)
    var_pooled[zero_variance] = 0.0
    standardization = model.StandardizationModel(grand_mean, beta, var_pooled, zero_variance)
    scale = standardization.scale
    return standardization, (intercepts - grand_mean) / scale, rss / scale**2


# --------------------------------------------------------------------------------------------
# Statistics keyed by site label and covariate column: what partial_fit, federated summaries,
# dask blocks and streamed volumes produce and merge
# --------------------------------------------------------------------------------------------


def _union(first, second, what):
    """Sorted union of two label sequences (a TypeError names labels of mixed types)."""
    merged = list(first) + [v for v in second if v not in set(first)]
    try:
        return sorted(merged)
    except TypeError as exc:
        raise TypeError(
            f"{what} labels must be of one sortable type (all strings or all numbers); got "
            f"{merged[:10]}"
        ) from exc


@dataclass
class SiteStatistics:
    """Per-site centred statistics of rows, keyed by site label and covariate column.

    The covariates enter *unencoded*: each level of a categorical covariate has its own
    indicator column (keyed ``("level", column, level)``), each continuous covariate its
    values (``("value", column)``), each smooth covariate the columns of its B-spline basis on
    fixed knots (``("spline", column, j)``; the knots, degree and extrapolation are in
    ``smooth``, and only statistics with the same ones merge). Merging two sets of
    statistics aligns sites and columns (a site or level absent from one side has zero rows
    there), so chunks, dask blocks and sites may hold different sites and levels.
    :meth:`encoded` picks the columns of the ComBat design (the first sorted level of each
    categorical covariate dropped) once all rows are merged: the statistics of a subset of
    columns are the rows and columns of the full ones.

    Attributes
    ----------
    sites : list
        Site labels, sorted; rows of the moments follow this order.
    columns : list of tuple
        Key of each covariate column of the moments.
    moments : SiteMoments
    smooth : dict
        ``{column: {"knots": list, "degree": int, "extrapolation": str}}`` of each smooth
        covariate (empty without smooth covariates).
    """

    sites: list
    columns: list
    moments: SiteMoments
    smooth: dict = field(default_factory=dict)

    @classmethod
    def of_rows(cls, X, sites, columns, Z, smooth=None):
        """Statistics of rows ``X`` with site labels ``sites`` and covariate columns ``Z``
        (keyed by ``columns``; ``smooth`` as the attribute)."""
        labels, batch_idx = np.unique(np.asarray(sites, dtype=object), return_inverse=True)
        moments = chunk_moments(X, batch_idx.ravel(), len(labels), Z)
        return cls(labels.tolist(), list(columns), moments, plain_smooth(smooth))

    @property
    def n_features(self):
        return self.moments.xbar.shape[1]

    def aligned(self, sites, columns):
        """The same statistics on a superset of sites and covariate columns."""
        if list(sites) == self.sites and list(columns) == self.columns:
            return self
        m = self.moments
        site_at = [sites.index(s) for s in self.sites]
        col_at = [columns.index(c) for c in self.columns]
        out = SiteMoments.empty(len(sites), len(columns), self.n_features)
        out.n[site_at] = m.n
        out.xbar[site_at] = m.xbar
        out.cxx[site_at] = m.cxx
        out.magnitude[:] = m.magnitude
        rows = np.ix_(site_at, col_at)
        out.zbar[rows] = m.zbar
        out.czx[rows] = m.czx
        out.czz[np.ix_(site_at, col_at, col_at)] = m.czz
        return SiteStatistics(list(sites), list(columns), out, self.smooth)

    def merge(self, other):
        """Statistics of the rows of ``self`` and ``other`` together (disjoint rows); neither
        is changed."""
        return merge_all([self, other])

    def add(self, other):
        """Add the statistics of other rows in place (sites and columns grow as needed) and
        return the result: O(size of the statistics of ``other``'s sites), whatever the
        number of rows. ``self``'s arrays must not be shared."""
        if other.n_features != self.n_features:
            raise ValueError(
                f"statistics of {other.n_features} features cannot be merged with statistics "
                f"of {self.n_features} features"
            )
        check_same_smooth(self.smooth, other.smooth)
        total = self
        new_sites = [s for s in other.sites if s not in set(self.sites)]
        new_columns = [c for c in other.columns if c not in set(self.columns)]
        if new_sites or new_columns:
            total = self.aligned(
                _union(self.sites, other.sites, "site"), self.columns + new_columns
            )
        dest, m = total.moments, other.moments
        position = {s: i for i, s in enumerate(total.sites)}
        same_columns = other.columns == total.columns
        col_at = None if same_columns else [total.columns.index(c) for c in other.columns]
        q = len(total.columns)
        for j, site in enumerate(other.sites):
            nb = m.n[j]
            if nb == 0:
                continue
            k = position[site]
            if same_columns:
                zb, czz_b = m.zbar[j], m.czz[j]
            else:  # the small covariate parts padded; czx added into its rows below
                zb = np.zeros(q)
                zb[col_at] = m.zbar[j]
                czz_b = np.zeros((q, q))
                czz_b[np.ix_(col_at, col_at)] = m.czz[j]
            rows = slice(None) if same_columns else col_at
            na = dest.n[k]
            if na == 0:
                dest.n[k], dest.zbar[k], dest.xbar[k] = nb, zb, m.xbar[j]
                dest.czz[k], dest.cxx[k] = czz_b, m.cxx[j]
                dest.czx[k] = 0.0
                dest.czx[k, rows] = m.czx[j]
                continue
            n = na + nb
            weight = na * nb / n
            dx = m.xbar[j] - dest.xbar[k]
            dz = zb - dest.zbar[k]
            dest.czx[k, rows] += m.czx[j]
            dest.czx[k] += np.outer(weight * dz, dx)
            dest.czz[k] += czz_b + weight * np.outer(dz, dz)
            dest.cxx[k] += m.cxx[j]
            dest.cxx[k] += weight * dx**2
            dest.xbar[k] += (nb / n) * dx
            dest.zbar[k] += (nb / n) * dz
            dest.n[k] = n
        np.maximum(dest.magnitude, m.magnitude, out=dest.magnitude)
        return total

    def levels(self, column):
        """Sorted levels of a categorical covariate seen in the rows."""
        return sorted(key[2] for key in self.columns if key[0] == "level" and key[1] == column)

    def encoded(self, categorical, continuous, smooth=()):
        """The moments of the ComBat design's covariate columns: for each categorical column
        its levels but the first (sorted), then the continuous columns, then the spline
        columns of each smooth column; and the levels."""
        levels = [self.levels(col) for col in categorical]
        keys = [("level", col, lv) for col, lvs in zip(categorical, levels) for lv in lvs[1:]]
        keys += [("value", col) for col in continuous]
        keys += [key for col in smooth for key in self.columns if key[:2] == ("spline", col)]
        at = [self.columns.index(k) for k in keys]
        m = self.moments
        moments = SiteMoments(
            n=m.n,
            zbar=m.zbar[:, at],
            xbar=m.xbar,
            czz=m.czz[:, at][:, :, at],
            czx=m.czx[:, at],
            cxx=m.cxx,
            magnitude=m.magnitude,
        )
        return moments, levels


def merge_all(parts):
    """Merge :class:`SiteStatistics` of disjoint rows into new statistics (the parts are not
    changed): each site's statistics are added once, so the cost is that of the parts'
    statistics, not (number of parts) x (all sites)."""
    parts = list(parts)
    if not parts:
        raise ValueError("no statistics to merge")
    sites, columns = [], []
    for part in parts:
        sites = _union(sites, part.sites, "site")
        columns += [c for c in part.columns if c not in set(columns)]
        check_same_smooth(parts[0].smooth, part.smooth)
    total = SiteStatistics(
        sites,
        columns,
        SiteMoments.empty(len(sites), len(columns), parts[0].n_features),
        parts[0].smooth,
    )
    for part in parts:
        total = total.add(part)
    return total


def join_features(parts):
    """Statistics of the same rows over consecutive blocks of features, joined along the
    features (dask's column blocks)."""
    first = parts[0]
    parts = [p.aligned(first.sites, first.columns) for p in parts]
    m = first.moments
    moments = SiteMoments(
        n=m.n,
        zbar=m.zbar,
        czz=m.czz,
        xbar=np.concatenate([p.moments.xbar for p in parts], axis=-1),
        czx=np.concatenate([p.moments.czx for p in parts], axis=-1),
        cxx=np.concatenate([p.moments.cxx for p in parts], axis=-1),
        magnitude=np.concatenate([p.moments.magnitude for p in parts], axis=-1),
    )
    return SiteStatistics(first.sites, first.columns, moments, first.smooth)


def plain_smooth(smooth):
    """The spline settings of smooth covariates as plain data (lists, int, str)."""
    return {
        col: {
            "knots": [float(k) for k in spec["knots"]],
            "degree": int(spec["degree"]),
            "extrapolation": str(spec["extrapolation"]),
        }
        for col, spec in (smooth or {}).items()
    }


def check_same_smooth(a, b):
    """Statistics with other spline knots, degree or extrapolation do not merge."""
    if a == b:
        return
    for col in list(a) + [c for c in b if c not in a]:
        if a.get(col) != b.get(col):
            raise ValueError(
                f"statistics with different B-spline settings for smooth covariate {col!r} "
                f"cannot be merged: {a.get(col)} vs {b.get(col)}; give every chunk or site "
                "the same smooth_knots, smooth_degree and smooth_extrapolation"
            )
