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

Rows are added to the statistics in place, each site's about its running means
(:meth:`SiteStatistics.add_rows`), and two sets of statistics, keyed by site label and
covariate column (:class:`SiteStatistics`), are merged with the pairwise update of Chan, Golub
& LeVeque (1979) (:meth:`SiteStatistics.add`): no raw sums of squares are ever formed, so data
with a large offset (T1 intensities around 1e4 with a standard deviation of 10) lose no
precision.
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
    # The exponent bits alone are the power of two of a normal number (one cheap pass);
    # subnormal values, whose exponent field is 0, take frexp.
    power = (largest.view(np.int64) & _EXPONENT_BITS).view(np.float64)
    subnormal = (power == 0) & (largest > 0)
    if subnormal.any():
        power[subnormal] = np.ldexp(0.5, np.frexp(largest[subnormal])[1])
    return power


_EXPONENT_BITS = np.int64(0x7FF0000000000000)


def _add_rows(moments, X, local_idx, at, Z):
    """Add rows to ``moments`` in place: row ``i`` belongs to site ``at[local_idx[i]]``.

    Each site's new rows are taken about a reference: its running means (the site has rows)
    or the new rows' own means (it has none yet). With ``d`` a row's deviations from the
    reference, ``S1 = sum d`` and ``n`` the site's rows after the update, the centred sums
    grow by ``sum d d' - S1 S1' / n`` and the means by ``S1 / n`` (exact for any reference;
    small numbers, because the reference is close to the site's mean). Every product is
    computed on deviations, never on raw values, so a large offset loses no precision.
    """
    n_rows, n_features = X.shape
    n_local = len(at)
    order = np.argsort(local_idx, kind="stable")  # each site's rows together
    added = np.bincount(local_idx, minlength=n_local)
    bounds = np.concatenate([[0], np.cumsum(added)])
    had = moments.n[at].copy()
    total = had + added
    is_new = had == 0
    Z = Z[order]
    sites = []  # (destination, rows, weights): weights give S1 and the covariate sums
    for j, k in enumerate(at):
        rows = slice(int(bounds[j]), int(bounds[j + 1]))
        z = Z[rows]
        ref_z = z.mean(axis=0) if is_new[j] else moments.zbar[k].copy()
        dz = z - ref_z
        sum_dz = dz.sum(axis=0)
        # sum (dz - sum_dz / n) d' is the covariate-feature increment, in one product
        dz_centred = dz - sum_dz / total[j]
        moments.czz[k] += dz_centred.T @ dz
        moments.zbar[k] = ref_z + sum_dz / total[j]
        weights = np.vstack([np.ones(len(z)), dz_centred.T])
        sites.append((k, rows, weights))
    largest = np.empty(n_features)
    for block in model.feature_blocks(n_rows, n_features):
        values = np.asarray(X[order, block], dtype=np.float64)
        np.maximum(values.max(axis=0), -values.min(axis=0), out=largest[block])
        for j, (k, rows, weights) in enumerate(sites):
            d = values[rows]
            ref = d.mean(axis=0) if is_new[j] else moments.xbar[k, block].copy()
            d -= ref
            sums = weights @ d  # S1, then sum (dz - mean) d' per covariate column
            shift = sums[0] / total[j]
            moments.czx[k, :, block] += sums[1:]
            square = np.square(d, out=d).sum(axis=0)
            square -= sums[0] * shift
            moments.cxx[k, block] += square
            np.add(ref, shift, out=moments.xbar[k, block])
    np.maximum(moments.magnitude, power_of_two_below(largest), out=moments.magnitude)
    moments.n[at] = total


# Residual sums of squares at or below this many eps of the within-site sum of squares are
# rounding noise of the centred statistics (see fit_from_moments).
_EXPLAINED_FLOOR = 1024.0


def check_complete(moments):
    """Refuse statistics left part-updated by an interrupted :meth:`SiteStatistics.add_rows`."""
    if np.isnan(moments.n).any():
        raise ValueError(
            "these statistics are incomplete: adding rows to them was interrupted part-way "
            "(the earlier rows' statistics were updated in place), so no model can be fitted "
            "from them; start again from the first chunk (a new estimator, or fit)"
        )


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
    check_complete(moments)
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
    # Constant: a residual standard deviation at the rounding of the values, as in model;
    # or residuals below the rounding of the centred sums they are computed from (rss is
    # cxx less what the covariates explain, so a feature the covariates explain exactly is
    # left with ~eps * cxx, measured up to 6 eps: fit, from the residuals themselves, sees
    # it constant, and so must this route, or its tiny variance skews every EB prior).
    rows = slice(None) if ref is None else slice(ref, ref + 1)
    within = moments.cxx[rows].sum(axis=0)
    zero_variance = (np.sqrt(var_pooled) <= model.constant_resolution(moments.magnitude)) | (
        rss[rows].sum(axis=0) <= _EXPLAINED_FLOOR * np.finfo(np.float64).eps * within
    )
    var_pooled[zero_variance] = 0.0
    standardization = model.StandardizationModel(grand_mean, beta, var_pooled, zero_variance)
    scale = standardization.scale
    return standardization, (intercepts - grand_mean) / scale, rss / scale**2


# --------------------------------------------------------------------------------------------
# Statistics keyed by site label and covariate column: what partial_fit, federated summaries,
# dask blocks and streamed volumes produce and merge
# --------------------------------------------------------------------------------------------


def _not_in(items, existing):
    """The ``items`` not in ``existing``, in order (``existing`` hashed once, not per item)."""
    existing = set(existing)
    return [v for v in items if v not in existing]


def sorted_labels(labels, what):
    """``labels`` sorted; labels of types that do not sort together (``1`` and ``"1"``) are a
    TypeError naming ``what`` (``"site labels"``, ``"levels of categorical covariate 'sex'"``)
    and the labels."""
    labels = list(labels)
    try:
        return sorted(labels)
    except TypeError as exc:
        shown = [v.item() if isinstance(v, np.generic) else v for v in labels[:10]]
        raise TypeError(
            f"{what} must be of one sortable type (all strings or all numbers); got "
            f"{shown}{' ...' if len(labels) > 10 else ''}"
        ) from exc


def _union(first, second, what):
    """Sorted union of two label sequences (a TypeError names labels of mixed types)."""
    return sorted_labels(list(first) + _not_in(second, first), f"{what} labels")


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

    def __post_init__(self):
        # Columns only grow by new statistics (rows, merges, files): levels of types that
        # do not sort together are refused where they first meet, naming the covariate.
        for column in dict.fromkeys(key[1] for key in self.columns if key[0] == "level"):
            self.levels(column)

    @classmethod
    def of_rows(cls, X, sites, columns, Z, smooth=None):
        """Statistics of rows ``X`` with site labels ``sites`` and covariate columns ``Z``
        (keyed by ``columns``; ``smooth`` as the attribute)."""
        smooth = plain_smooth(smooth)
        empty = cls([], list(columns), SiteMoments.empty(0, len(columns), X.shape[1]), smooth)
        return empty.add_rows(X, sites, columns, Z, smooth)

    def add_rows(self, X, sites, columns, Z, smooth=None):
        """Add rows in place (sites and columns grow as needed) and return the result: the
        statistics of the rows seen before and of rows ``X`` with site labels ``sites`` and
        covariate columns ``Z`` (keyed by ``columns``; ``smooth`` as the attribute, which
        must equal this one's). The statistics merging ``of_rows`` of the new rows gives (up
        to rounding), at a fraction of the cost: no statistics of the new rows are made, each site's
        statistics are updated where they are. ``self``'s arrays must not be shared."""
        X = np.asarray(X)
        columns = list(columns)
        Z = np.asarray(Z, dtype=np.float64).reshape(X.shape[0], len(columns))
        if X.shape[1] != self.n_features:
            raise ValueError(
                f"rows of {X.shape[1]} features cannot be added to statistics of "
                f"{self.n_features} features"
            )
        check_same_smooth(self.smooth, plain_smooth(smooth))
        check_complete(self.moments)
        sites = np.asarray(sites, dtype=object)
        try:
            labels, local_idx = np.unique(sites, return_inverse=True)
        except TypeError:
            sorted_labels(dict.fromkeys(sites.tolist()), "site labels")  # names them
            raise
        labels = labels.tolist()
        total = self
        new_sites = _not_in(labels, self.sites)
        new_columns = _not_in(columns, self.columns)
        if new_sites or new_columns:
            total = self.aligned(_union(self.sites, labels, "site"), self.columns + new_columns)
        if not X.shape[0]:
            return total
        if columns != total.columns:  # the chunk's columns in the statistics' order
            padded = np.zeros((X.shape[0], len(total.columns)))
            padded[:, [total.columns.index(c) for c in columns]] = Z
            Z = padded
        position = {s: i for i, s in enumerate(total.sites)}
        at = np.array([position[s] for s in labels], dtype=np.intp)
        # The products are thin (a chunk's rows by a few covariate columns): a BLAS thread
        # pool only adds synchronisation to them (6x slower on a loaded 2-core machine,
        # bench_federated.py), so they run on one thread.
        try:
            # squares beyond the float range (features past ~1e150) are refused by name when
            # a model is fitted from the statistics, not warned about here
            with (
                model.single_blas_thread(),
                np.errstate(over="ignore", under="ignore", invalid="ignore"),
            ):
                _add_rows(total.moments, X, local_idx.ravel(), at, Z)
        except BaseException:
            if total is self:
                # Updated in place and stopped part-way (a KeyboardInterrupt, a MemoryError):
                # means moved, counts not. Restoring would cost a copy of the statistics on
                # every call, so they are marked unusable instead (counts NaN), and refused
                # by add_rows and fit_from_moments rather than giving a wrong model.
                self.moments.n[at] = np.nan
            raise
        return total

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
        new_sites = _not_in(other.sites, self.sites)
        new_columns = _not_in(other.columns, self.columns)
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
        return sorted_labels(
            (key[2] for key in self.columns if key[0] == "level" and key[1] == column),
            f"levels of categorical covariate {column!r}",
        )

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
        columns += _not_in(part.columns, columns)
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
