"""Region reductions over a label-sorted voxel order.

A :class:`RegionPlan` is computed once per voxel grid (at ``fit`` for the atlas grid, on first
use for any other grid). It lists the labelled voxels sorted by output column, so that every
region is one contiguous segment of the gathered values. Per image the work is then a single
gather (``values = flat_data[plan.voxels]``) followed by segment reductions:

- sum, mean, variance and standard deviation use ``np.add.reduceat`` over the segments. This is
  the segment form of ``np.bincount(columns, weights=values)``: the same sums, but several times
  faster because the segments are contiguous, and it also works column-wise for 4D data;
- minimum and maximum use ``np.fmin.reduceat`` / ``np.fmax.reduceat`` (NaN-ignoring);
- median takes ``np.median`` of each segment, which partitions only that region's voxels.

Nothing here sorts a whole volume per image. NaN voxels are ignored by every strategy; a region
with no finite voxel gives NaN. Variance is the population variance (``ddof=0``), as in
``scipy.ndimage.variance`` which nilearn uses.

All functions are pure and take / return plain NumPy arrays.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

STRATEGIES = (
    "mean",
    "median",
    "sum",
    "minimum",
    "maximum",
    "variance",
    "standard_deviation",
)


@dataclass(frozen=True)
class RegionPlan:
    """Where the regions of an atlas live on one voxel grid.

    Attributes
    ----------
    voxels : ndarray of shape (n_labelled,)
        Flat voxel indices (Fortran order, as NIfTI data is stored) of the labelled voxels,
        sorted by output column.
    starts : ndarray of shape (n_segments,)
        Start of each region's segment in ``voxels``; only regions present on this grid.
    lengths : ndarray of shape (n_segments,)
        Number of voxels in each segment.
    columns : ndarray of shape (n_segments,)
        Output column of each segment.
    n_regions : int
        Number of output columns (regions fixed at fit, present here or not).
    """

    voxels: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    columns: np.ndarray
    n_regions: int

    def voxel_columns(self) -> np.ndarray:
        """Output column of every voxel in ``voxels``."""
        return np.repeat(self.columns, self.lengths)


def build_plan(atlas_flat, region_ids, background_label, mask_flat=None) -> RegionPlan:
    """Build the :class:`RegionPlan` of a flattened atlas.

    Parameters
    ----------
    atlas_flat : ndarray of shape (n_voxels,)
        Label value of every voxel (flattened in Fortran order).
    region_ids : ndarray of shape (n_regions,)
        Sorted label values that define the output columns. Atlas values not in it are
        ignored.
    background_label : float
        Label value that means "no region".
    mask_flat : ndarray of bool, shape (n_voxels,), optional
        Voxels outside the mask are treated as background.
    """
    region_ids = np.asarray(region_ids)
    inside = np.isfinite(atlas_flat) & (atlas_flat != background_label)
    if mask_flat is not None:
        inside &= mask_flat
    voxels = np.flatnonzero(inside)
    values = atlas_flat[voxels]
    if region_ids.size:
        position = np.searchsorted(region_ids, values).clip(max=region_ids.size - 1)
        known = region_ids[position] == values
    else:
        position = np.zeros(values.shape, dtype=np.intp)
        known = np.zeros(values.shape, dtype=bool)
    voxels, columns = voxels[known], position[known]
    # A narrow integer type lets NumPy use its radix sort for this stable sort.
    order = np.argsort(columns.astype(np.min_scalar_type(region_ids.size)), kind="stable")
    voxels, columns = voxels[order], columns[order]
    is_start = np.ones(columns.size, dtype=bool)
    is_start[1:] = columns[1:] != columns[:-1]
    starts = np.flatnonzero(is_start)
    lengths = np.diff(np.append(starts, columns.size))
    return RegionPlan(
        voxels=voxels.astype(np.intp),
        starts=starts.astype(np.intp),
        lengths=lengths.astype(np.intp),
        columns=columns[starts].astype(np.intp),
        n_regions=int(region_ids.size),
    )


def gather(flat_data, plan: RegionPlan) -> np.ndarray:
    """Values of the labelled voxels in plan order, shape (n_labelled, n_vols).

    float32 and float64 data keep their type (the reductions accumulate in float64 without a
    float64 copy of the whole gather); other types become float64.

    ``flat_data`` has shape (n_voxels, n_vols), voxels flattened in Fortran order. NIfTI data
    is Fortran-ordered, so each volume is contiguous: the gather then runs volume by volume on
    the transposed view (twice as fast as picking strided voxel rows for 4D runs).
    """
    dtype = flat_data.dtype if flat_data.dtype in (np.float32, np.float64) else np.float64
    if flat_data.shape[1] > 1 and flat_data.flags.f_contiguous:
        return np.take(flat_data.T, plan.voxels, axis=1).astype(dtype, copy=False).T
    return np.take(flat_data, plan.voxels, axis=0).astype(dtype, copy=False)


def reduce_regions(values, plan: RegionPlan, strategy: str) -> np.ndarray:
    """Reduce gathered voxel values to one value per region and volume.

    Parameters
    ----------
    values : ndarray of shape (n_labelled, n_vols)
        Output of :func:`gather` (float32 or float64; sums accumulate in float64).
    plan : RegionPlan
    strategy : str
        One of :data:`STRATEGIES`.

    Returns
    -------
    signals : ndarray of shape (n_vols, n_regions)
        float64; NaN for regions absent from the plan or without any finite voxel.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown strategy {strategy!r}; expected one of {STRATEGIES}.")
    n_vols = values.shape[1]
    signals = np.full((plan.n_regions, n_vols), np.nan)
    if plan.starts.size:
        finite = ~np.isnan(values)
        has_nan = not finite.all()
        segment_values = _REDUCERS[strategy](values, finite if has_nan else None, plan)
        signals[plan.columns] = segment_values
    return signals.T


def _counts(finite, plan):
    """Number of finite values per segment and volume, shape (n_segments, n_vols)."""
    if finite is None:
        return plan.lengths[:, np.newaxis].astype(np.float64)
    return np.add.reduceat(finite, plan.starts, axis=0, dtype=np.float64)


def _zero_nan(values, finite):
    return values if finite is None else np.where(finite, values, 0.0)


def _empty_to_nan(result, counts):
    return np.where(counts == 0, np.nan, result)


def _segment_add(values, starts):
    """``np.add.reduceat(values, starts, axis=0)`` accumulated in float64, casting float32
    values a block of volumes at a time (about 8 MB), never the whole gather at once."""
    if values.dtype == np.float64:
        return np.add.reduceat(values, starts, axis=0)
    sums = np.empty((starts.size, values.shape[1]))
    for cols in _volume_blocks(values):
        sums[:, cols] = np.add.reduceat(values[:, cols].astype(np.float64), starts, axis=0)
    return sums


def _segment_sum(values, finite, plan):
    sums = _segment_add(_zero_nan(values, finite), plan.starts)
    return _empty_to_nan(sums, _counts(finite, plan))


def _segment_mean(values, finite, plan):
    counts = _counts(finite, plan)
    sums = _segment_add(_zero_nan(values, finite), plan.starts)
    with np.errstate(invalid="ignore", divide="ignore"):
        return _empty_to_nan(sums / counts, counts)


def _segment_variance(values, finite, plan):
    """Two-pass population variance: mean first, then mean squared deviation, a block of
    volumes at a time (the float64 deviations of the whole gather are never held at once)."""
    counts = _counts(finite, plan)
    mean = _segment_mean(values, finite, plan)
    squares = np.empty_like(mean)
    for cols in _volume_blocks(values):
        deviation = values[:, cols].astype(np.float64) - np.repeat(
            mean[:, cols], plan.lengths, axis=0
        )
        deviation = _zero_nan(deviation, None if finite is None else finite[:, cols])
        squares[:, cols] = np.add.reduceat(deviation * deviation, plan.starts, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        variance = squares / counts
    return _empty_to_nan(variance, counts)


def _volume_blocks(values):
    """Slices of about 2**20 gathered values (8 MB in float64) along the volume axis."""
    step = max(1, (1 << 20) // max(values.shape[0], 1))
    return [slice(first, first + step) for first in range(0, values.shape[1], step)]


def _segment_std(values, finite, plan):
    return np.sqrt(_segment_variance(values, finite, plan))


def _segment_minimum(values, finite, plan):
    # fmin ignores NaN unless every value of the segment is NaN, which then gives NaN.
    return np.fmin.reduceat(values, plan.starts, axis=0)


def _segment_maximum(values, finite, plan):
    return np.fmax.reduceat(values, plan.starts, axis=0)


def _segment_median(values, finite, plan):
    median = np.nanmedian if finite is not None else np.median
    ends = plan.starts + plan.lengths
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN segment -> NaN
        return np.stack(
            [
                median(values[start:end].astype(np.float64), axis=0)
                for start, end in zip(plan.starts, ends)
            ]
        )


_REDUCERS = {
    "mean": _segment_mean,
    "median": _segment_median,
    "sum": _segment_sum,
    "minimum": _segment_minimum,
    "maximum": _segment_maximum,
    "variance": _segment_variance,
    "standard_deviation": _segment_std,
}
