"""Covariates of the ComBat design: which columns, and how they become numbers.

:class:`CovariateEncoding` is learned on the training rows (the levels of each categorical
covariate) and turns any covariate table into the numeric columns ``Z`` of the design
``[site one-hot | Z]``: categorical covariates one-hot encoded with the first (sorted) level as
reference, continuous covariates as they are. Its state is plain data (column names and
levels), so a saved model restores it exactly, without refitting anything.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


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
    return "[" + ", ".join(repr(v.item() if isinstance(v, np.generic) else v)
                           for v in labels) + "]"


def covariate_columns(batch_col, categorical_cols, continuous_cols):
    """The categorical and continuous column lists, checked against each other and the site."""
    categorical = column_list(categorical_cols, "categorical_cols")
    continuous = column_list(continuous_cols, "continuous_cols")
    both = [c for c in categorical if c in continuous]
    if both:
        raise ValueError(f"columns {both} are in both categorical_cols and continuous_cols")
    if batch_col is not None and batch_col in categorical + continuous:
        raise ValueError(f"batch_col {batch_col!r} is also named as a covariate")
    return categorical, continuous


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

    def __init__(self, categorical, continuous, levels):
        self.categorical = list(categorical)
        self.continuous = list(continuous)
        self.levels = [np.asarray(lv, dtype=object) for lv in levels]

    @classmethod
    def fit(cls, frame, categorical, continuous):
        """Learn the levels of each categorical column from the training covariates."""
        levels = []
        for col in categorical:
            values = pd.unique(frame[col].astype(object))
            try:
                levels.append(np.asarray(sorted(values), dtype=object))
            except TypeError as exc:
                raise TypeError(f"categorical covariate {col!r} mixes level types that cannot "
                                f"be sorted: {format_labels(values)}") from exc
        return cls(categorical, continuous, levels)

    @property
    def names(self):
        """Names of the encoded columns: ``<col>_<level>`` for each non-reference level, then
        the continuous columns."""
        names = [f"{col}_{level}" for col, lv in zip(self.categorical, self.levels)
                 for level in lv[1:]]
        names += [str(c) for c in self.continuous]
        return np.asarray(names, dtype=object)

    def widths(self):
        """Number of encoded columns of each covariate, in the order of ``columns``."""
        return [len(lv) - 1 for lv in self.levels] + [1] * len(self.continuous)

    @property
    def columns(self):
        return self.categorical + self.continuous

    def transform(self, frame):
        """The covariate design ``Z`` (n_rows, n_encoded) of a validated covariate table."""
        parts = [np.empty((len(frame), 0))]
        for col, lv in zip(self.categorical, self.levels):
            values = frame[col].astype(object)
            codes = pd.Index(lv).get_indexer(values)
            if (codes < 0).any():
                unknown = pd.unique(values[codes < 0])
                raise ValueError(f"categorical covariate {col!r} has level(s) "
                                 f"{format_labels(unknown)} not seen in fit (seen: "
                                 f"{format_labels(lv)})")
            onehot = np.zeros((len(frame), len(lv)))
            onehot[np.arange(len(frame)), codes] = 1.0
            parts.append(onehot[:, 1:])
        if self.continuous:
            parts.append(frame[self.continuous].to_numpy(dtype=np.float64))
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
        return {"categorical_cols": list(self.categorical),
                "continuous_cols": list(self.continuous),
                "categories": [lv.tolist() for lv in self.levels]}

    @classmethod
    def from_state(cls, state):
        return cls(state["categorical_cols"], state["continuous_cols"], state["categories"])
