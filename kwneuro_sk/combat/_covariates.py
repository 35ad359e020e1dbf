"""Covariates of the ComBat design: which columns, and how they become numbers.

:class:`CovariateEncoding` is learned on the training rows (the levels of each categorical
covariate) and turns any covariate table into the numeric columns ``Z`` of the design
``[site one-hot | Z]``: categorical covariates one-hot encoded with the first (sorted) level as
reference, continuous covariates as they are, and smooth covariates (ComBat-GAM) as a
B-spline basis (scikit-learn's ``SplineTransformer``) whose knots are placed at quantiles of the
training values. Its state is plain data (column names, levels and knot positions), so a saved
model restores it exactly, without refitting anything.
"""

from __future__ import annotations

from numbers import Integral

import numpy as np
import pandas as pd
from sklearn.preprocessing import SplineTransformer

from kwneuro_sk.combat.statistics import sorted_labels


def column_list(cols, name):
    """``None``, one column name or a list of names -> a list of names, without repeats."""
    if cols is None:
        return []
    if isinstance(cols, str) or not np.iterable(cols):
        return [cols]
    cols = list(cols)
    if len(set(cols)) != len(cols):
        raise ValueError(f"{name} has repeated column names: {cols}")
    return cols


def format_labels(labels):
    """``[a, b, ...]`` with numpy scalars shown as Python values, for messages."""
    return "[" + ", ".join(repr(v.item() if isinstance(v, np.generic) else v) for v in labels) + "]"


def covariate_columns(batch_col, categorical_cols, continuous_cols, smooth_cols=None):
    """The categorical and continuous column lists, checked against each other and the site.

    With ``smooth_cols`` given (not None), the smooth column list is returned third.
    """
    categorical = column_list(categorical_cols, "categorical_cols")
    continuous = column_list(continuous_cols, "continuous_cols")
    smooth = column_list(smooth_cols, "smooth_cols")
    lists = [
        ("categorical_cols", categorical),
        ("continuous_cols", continuous),
        ("smooth_cols", smooth),
    ]
    for i, (name_a, a) in enumerate(lists):
        for name_b, b in lists[i + 1 :]:
            both = [c for c in a if c in b]
            if both:
                advice = (
                    "; a smooth term already includes the linear effect, so remove them from "
                    f"{name_a} (or from smooth_cols for a linear effect only)"
                    if name_b == "smooth_cols"
                    else f"; list each column in one of {name_a} and {name_b} only"
                )
                raise ValueError(f"columns {both} are in both {name_a} and {name_b}{advice}")
    if batch_col is not None and batch_col in categorical + continuous + smooth:
        raise ValueError(f"batch_col {batch_col!r} is also named as a covariate")
    if smooth_cols is None:
        return categorical, continuous
    return categorical, continuous, smooth


# --------------------------------------------------------------------------------------------
# Smooth covariates: a B-spline basis with knots at quantiles of the training values
# --------------------------------------------------------------------------------------------


def spline_knots(values, n_knots, column):
    """``n_knots`` knots at evenly spaced quantiles of the training ``values`` (first and last
    at the minimum and maximum), as ``SplineTransformer(knots="quantile")`` places them."""
    knots = np.quantile(np.asarray(values, dtype=np.float64), np.linspace(0, 1, n_knots))
    if np.any(np.diff(knots) <= 0):
        raise ValueError(
            f"smooth covariate {column!r} has too few distinct values "
            f"({len(np.unique(values))}) for smooth_knots={n_knots}: quantile knots coincide; "
            "lower smooth_knots or model it in continuous_cols"
        )
    return knots


def fixed_knots(smooth_knots, smooth):
    """Knot positions of each smooth column given by the ``smooth_knots`` parameter, or None
    when it is a number of knots (placed at quantiles of the training rows).

    ``smooth_knots`` may be one increasing sequence (the knots of every smooth column) or a
    dict mapping each smooth column to its increasing sequence.
    """
    if isinstance(smooth_knots, Integral) and not isinstance(smooth_knots, bool):
        return None
    if isinstance(smooth_knots, dict):
        missing = [c for c in smooth if c not in smooth_knots]
        extra = [c for c in smooth_knots if c not in smooth]
        if missing or extra:
            raise ValueError(
                f"smooth_knots as a dict must give the knots of each smooth_cols column "
                f"{list(smooth)}; missing {missing}, not smooth columns {extra}"
            )
        given = {col: smooth_knots[col] for col in smooth}
    else:
        given = {col: smooth_knots for col in smooth}
    knots = {}
    for col, value in given.items():
        try:
            array = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            array = None
        if (
            array is None
            or array.ndim != 1
            or len(array) < 2
            or not np.isfinite(array).all()
            or np.any(np.diff(array) <= 0)
        ):
            raise ValueError(
                f"smooth_knots of smooth covariate {col!r} must be a number of knots (>= 2) "
                f"or at least 2 finite, increasing knot positions; got {value!r}"
            )
        knots[col] = array
    return knots


def quantile_knots(frame, smooth, smooth_knots):
    """Knots of each smooth column from the covariates of all the training rows: the given
    positions, or ``smooth_knots`` quantile knots (the rule of :meth:`CovariateEncoding.fit`)."""
    given = fixed_knots(smooth_knots, smooth)
    if given is not None:
        return given
    return {col: spline_knots(frame[col], smooth_knots, col) for col in smooth}


def spline_basis(values, knots, degree, extrapolation, column):
    """B-spline basis of ``values`` on ``knots`` (n_rows, n_knots + degree - 2).

    The last basis function is dropped (``include_bias=False``): the basis functions sum to
    one, which the site intercepts already span. Beyond the knots the basis follows
    ``extrapolation``: ``"linear"`` continues each function's slope at the boundary,
    ``"constant"`` holds its boundary value, ``"error"`` raises.
    """
    knots = np.asarray(knots, dtype=np.float64)
    spline = SplineTransformer(
        knots=knots[:, None], degree=int(degree), extrapolation=extrapolation, include_bias=False
    )
    spline.fit(knots[:, None])
    values = np.asarray(values, dtype=np.float64)[:, None]
    if not len(values):  # no rows (an empty chunk): the basis has its columns
        return np.empty((0, spline.n_features_out_))
    if extrapolation == "error":
        outside = (values[:, 0] < knots[0]) | (values[:, 0] > knots[-1])
        if outside.any():
            raise ValueError(
                f"smooth covariate {column!r} has value(s) "
                f"{format_labels(pd.unique(values[outside, 0])[:5])} outside the training range "
                f"[{knots[0]:g}, {knots[-1]:g}] (smooth_extrapolation='error')"
            )
    return spline.transform(values)


class CovariateEncoding:
    """Categorical levels and continuous columns that make the covariate design ``Z``.

    Parameters
    ----------
    categorical : list
        Categorical covariate columns.
    continuous : list
        Continuous covariate columns.
    levels : list of ndarray
        Sorted levels of each categorical column (the first is the reference).
    """

    def __init__(
        self, categorical, continuous, levels, smooth=(), knots=(), degree=3, extrapolation="linear"
    ):
        self.categorical = list(categorical)
        self.continuous = list(continuous)
        self.levels = [np.asarray(lv, dtype=object) for lv in levels]
        self.smooth = list(smooth)
        self.knots = [np.asarray(k, dtype=np.float64) for k in knots]
        self.degree = int(degree)
        self.extrapolation = extrapolation

    @classmethod
    def fit(
        cls,
        frame,
        categorical,
        continuous,
        smooth=(),
        *,
        n_knots=5,
        degree=3,
        extrapolation="linear",
    ):
        """Learn the levels of each categorical column and the knots of each smooth column
        from the training covariates (``n_knots``: a number of quantile knots, or knot
        positions as in :func:`fixed_knots`)."""
        levels = []
        for col in categorical:
            values = pd.unique(frame[col].astype(object))
            what = f"levels of categorical covariate {col!r}"
            levels.append(np.asarray(sorted_labels(values, what), dtype=object))
        by_column = quantile_knots(frame, smooth, n_knots)
        knots = [by_column[col] for col in smooth]
        for col in smooth:
            width = len(by_column[col]) + degree - 2
            n_values = frame[col].nunique()
            if n_values <= width:
                # the basis and the site intercepts span at most n_values directions
                raise ValueError(
                    f"smooth covariate {col!r} has {n_values} distinct values, too few for its "
                    f"B-spline basis of {width} columns ({len(by_column[col])} knots, "
                    f"smooth_degree={degree}; it needs at least {width + 1} distinct values): "
                    "lower smooth_knots or smooth_degree, or model it in continuous_cols"
                )
        return cls(categorical, continuous, levels, smooth, knots, degree, extrapolation)

    @property
    def names(self):
        """Names of the encoded columns: ``<col>_<level>`` for each non-reference level, then
        the continuous columns."""
        names = [
            f"{col}_{level}" for col, lv in zip(self.categorical, self.levels) for level in lv[1:]
        ]
        names += [str(c) for c in self.continuous]
        names += [
            f"{col}_spline{j}"
            for col, width in zip(self.smooth, self._smooth_widths())
            for j in range(width)
        ]
        return np.asarray(names, dtype=object)

    def _smooth_widths(self):
        return [len(k) + self.degree - 2 for k in self.knots]

    def widths(self):
        """Number of encoded columns of each covariate, in the order of ``columns``."""
        return (
            [len(lv) - 1 for lv in self.levels] + [1] * len(self.continuous) + self._smooth_widths()
        )

    @property
    def columns(self):
        return self.categorical + self.continuous + self.smooth

    def transform(self, frame):
        """The covariate design ``Z`` (n_rows, n_encoded) of a validated covariate table."""
        parts = [np.empty((len(frame), 0))]
        for col, lv in zip(self.categorical, self.levels):
            values = frame[col].astype(object)
            codes = pd.Index(lv).get_indexer(values)
            if (codes < 0).any():
                unknown = pd.unique(values[codes < 0])
                raise ValueError(
                    f"categorical covariate {col!r} has level(s) "
                    f"{format_labels(unknown)} not seen in fit (seen: "
                    f"{format_labels(lv)})"
                )
            onehot = np.zeros((len(frame), len(lv)))
            onehot[np.arange(len(frame)), codes] = 1.0
            parts.append(onehot[:, 1:])
        if self.continuous:
            parts.append(frame[self.continuous].to_numpy(dtype=np.float64))
        for col, knots in zip(self.smooth, self.knots):
            parts.append(
                spline_basis(
                    frame[col].to_numpy(dtype=np.float64),
                    knots,
                    self.degree,
                    self.extrapolation,
                    col,
                )
            )
        return np.hstack(parts)

    def confounded_column(self, design, n_batches):
        """The first covariate whose columns add no new direction to ``design`` (which holds
        the ``n_batches`` site columns first, then ``transform``'s columns), or None."""
        stop = n_batches
        for col, width in zip(self.columns, self.widths()):
            stop += width
            if np.linalg.matrix_rank(design[:, :stop]) < stop:
                return col
        return None

    def state(self):
        """The encoding as plain data (for :class:`~kwneuro_sk.CombatEstimates`)."""
        state = {
            "categorical_cols": list(self.categorical),
            "continuous_cols": list(self.continuous),
            "categories": [lv.tolist() for lv in self.levels],
        }
        if self.smooth:  # only models with smooth covariates carry these keys
            state.update(
                {
                    "smooth_cols": list(self.smooth),
                    "smooth_knots": [k.copy() for k in self.knots],
                    "smooth_degree": self.degree,
                    "smooth_extrapolation": self.extrapolation,
                }
            )
        return state

    @classmethod
    def from_state(cls, state):
        return cls(
            state["categorical_cols"],
            state["continuous_cols"],
            state["categories"],
            state.get("smooth_cols", ()),
            state.get("smooth_knots", ()),
            state.get("smooth_degree", 3),
            state.get("smooth_extrapolation", "linear"),
        )


def raw_design(frame, categorical, continuous, smooth=None):
    """Unencoded covariate columns of a validated covariate table, for
    :class:`~kwneuro_sk.combat.statistics.SiteStatistics`: one indicator column per level of
    each categorical covariate present in ``frame`` (keyed ``("level", column, level)``), the
    values of each continuous covariate (``("value", column)``) and the B-spline basis of each
    smooth covariate on fixed knots (``("spline", column, j)``).

    Parameters
    ----------
    smooth : dict, default=None
        ``{column: {"knots": ..., "degree": ..., "extrapolation": ...}}``.

    Returns
    -------
    keys : list of tuple
    Z : ndarray of shape (n_rows, len(keys))
    """
    keys, parts = [], [np.empty((len(frame), 0))]
    for col in categorical:
        # sorted: chunks that hold the same levels get the same column order, and merge
        # without realignment
        codes, levels = pd.factorize(frame[col].to_numpy(dtype=object), sort=True)
        onehot = np.zeros((len(frame), len(levels)))
        onehot[np.arange(len(frame)), codes] = 1.0
        keys += [("level", col, level) for level in levels.tolist()]
        parts.append(onehot)
    for col in continuous:
        keys.append(("value", col))
        parts.append(frame[col].to_numpy(dtype=np.float64)[:, None])
    for col, spec in (smooth or {}).items():
        basis = spline_basis(
            frame[col].to_numpy(dtype=np.float64),
            spec["knots"],
            spec["degree"],
            spec["extrapolation"],
            col,
        )
        keys += [("spline", col, j) for j in range(basis.shape[1])]
        parts.append(basis)
    return keys, np.hstack(parts)
