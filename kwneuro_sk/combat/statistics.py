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
(:func:`chunk_moments`), and two chunks are merged with the pairwise update of Chan, Golub &
LeVeque (1979) (:func:`merge_moments`): no raw sums of squares are ever formed, so data with a
large offset (T1 intensities around 1e4 with a standard deviation of 10) lose no precision.
Memory is that of the statistics, ``n_sites x (n_covariates + 2) x n_features`` values,
whatever the number of rows. Plain numpy; no pandas, no scikit-learn.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    max_abs : ndarray of shape (n_features,)
        Largest absolute value of each feature: the scale of its rounding, against which a
        pooled standard deviation counts as zero (as in :mod:`~kwneuro_sk.combat.model`).
    """

    n: np.ndarray
    zbar: np.ndarray
    xbar: np.ndarray
    czz: np.ndarray
    czx: np.ndarray
    cxx: np.ndarray
    max_abs: np.ndarray

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
    moments = SiteMoments.empty(n_batches, Z.shape[1], X.shape[1])
    if X.shape[0]:
        moments.max_abs[:] = np.maximum(X.max(axis=0), -X.min(axis=0))
    for k in np.unique(batch_idx):
        rows = batch_idx == k
        values = X[rows].astype(np.float64)  # a copy, centred in place
        covariates = Z[rows]
        moments.n[k] = values.shape[0]
        moments.xbar[k] = values.mean(axis=0)
        moments.zbar[k] = covariates.mean(axis=0)
        values -= moments.xbar[k]
        covariates = covariates - moments.zbar[k]
        moments.cxx[k] = np.einsum("ig,ig->g", values, values)
        moments.czx[k] = covariates.T @ values
        moments.czz[k] = covariates.T @ covariates
    return moments


def merge_moments(a, b):
    """Statistics of the union of two disjoint sets of rows (Chan et al. pairwise update).

    For each site, with ``d = mean_b - mean_a`` and ``w = n_a n_b / (n_a + n_b)``:
    ``C = C_a + C_b + w * d_z d_x'``; the means move by ``d * n_b / (n_a + n_b)``.
    """
    n = a.n + b.n
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(n > 0, b.n / n, 0.0)
        weight = np.where(n > 0, a.n * b.n / n, 0.0)
    dx = b.xbar - a.xbar
    dz = b.zbar - a.zbar
    return SiteMoments(
        n=n,
        zbar=a.zbar + share[:, None] * dz,
        xbar=a.xbar + share[:, None] * dx,
        czz=a.czz + b.czz + weight[:, None, None] * dz[:, :, None] * dz[:, None, :],
        czx=a.czx + b.czx + weight[:, None, None] * dz[:, :, None] * dx[:, None, :],
        cxx=a.cxx + b.cxx + weight[:, None] * dx**2,
        max_abs=np.maximum(a.max_abs, b.max_abs),
    )


def tree_merge(parts):
    """Merge a list of statistics pairwise, as a balanced tree."""
    parts = list(parts)
    if not parts:
        raise ValueError("no statistics to merge")
    while len(parts) > 1:
        parts = [
            merge_moments(parts[i], parts[i + 1]) if i + 1 < len(parts) else parts[i]
            for i in range(0, len(parts), 2)
        ]
    return parts[0]


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
    zero_variance = np.sqrt(var_pooled) <= model.constant_resolution(moments.max_abs)
    var_pooled[zero_variance] = 0.0
    standardization = model.StandardizationModel(grand_mean, beta, var_pooled, zero_variance)
    scale = standardization.scale
    return standardization, (intercepts - grand_mean) / scale, rss / scale**2


def location_scale_from_chunks(chunks):
    """A ``location_scale(batch_idx, n_batches, Z, ref)`` callable for the harmonizer's fit
    that merges the statistics given by ``chunks(batch_idx, n_batches, Z)`` (an iterable of
    :class:`SiteMoments`, merged in order as they arrive, so only two are held at once)."""

    def location_scale(batch_idx, n_batches, Z, ref):
        total = None
        for part in chunks(batch_idx, n_batches, Z):
            total = part if total is None else merge_moments(total, part)
        return fit_from_moments(total, ref)

    return location_scale
