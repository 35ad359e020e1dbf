"""Input handling of the ComBat estimators: one call's X, sites and covariates, validated once.

This is the one input layer of every route into ComBat (arrays and DataFrames in memory, dask
collections, streamed volumes, the command line, model files):

- :class:`ColumnRoles` is the option set that says which column is what (site, categorical,
  continuous, smooth covariates), checked once (:meth:`ColumnRoles.from_params`);
- :func:`read_metadata` checks the sites and covariates of ``n_rows`` rows (from any route) and
  returns the site labels and a covariate table with a positional index;
- :func:`read_rows` splits one in-memory call's X (DataFrame columns or ``batch=`` /
  ``covariates=`` keywords) into :class:`Rows`, through :func:`read_metadata`.

Errors name the offending column, row or argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import pandas as pd
from pandas.api.types import is_bool_dtype, is_numeric_dtype
from sklearn.utils.validation import check_array

from kwneuro_sk.combat._covariates import covariate_columns


@dataclass(frozen=True)
class ColumnRoles:
    """Which columns are the site and which are covariates (and of what kind).

    Build it with :meth:`from_params` (or :meth:`of` an estimator, :meth:`from_info` of a model
    file's info), which checks the lists against each other once.
    """

    batch_col: object = None
    categorical: tuple = ()
    continuous: tuple = ()
    smooth: tuple = ()
    subject: object = None  # longitudinal ComBat: the subject column (or name of subjects=)

    @classmethod
    def from_params(
        cls,
        batch_col=None,
        categorical_cols=None,
        continuous_cols=None,
        smooth_cols=None,
        subject_col=None,
    ):
        """Checked roles from the estimator parameters of the same names."""
        categorical, continuous, smooth = covariate_columns(
            batch_col, categorical_cols, continuous_cols, smooth_cols=smooth_cols or []
        )
        if subject_col is not None:
            if subject_col == batch_col:
                raise ValueError(
                    f"subject_col={subject_col!r} is also batch_col: the subject and site "
                    "columns must differ"
                )
            if subject_col in [*categorical, *continuous, *smooth]:
                raise ValueError(
                    f"subject_col={subject_col!r} is also listed as a covariate; the subject "
                    "enters the model as a random effect only, so remove it from "
                    "categorical_cols/continuous_cols/smooth_cols"
                )
        return cls(batch_col, tuple(categorical), tuple(continuous), tuple(smooth), subject_col)

    @classmethod
    def of(cls, estimator):
        """Roles of a ComBat estimator's parameters (``batch_col``, ``*_cols``)."""
        return cls.from_params(
            estimator.batch_col,
            estimator.categorical_cols,
            estimator.continuous_cols,
            getattr(estimator, "smooth_cols", None),
            getattr(estimator, "subject_col", None),
        )

    @classmethod
    def from_info(cls, info):
        """Roles of a saved model (:attr:`CombatEstimates.info`)."""
        return cls.from_params(
            info.get("batch_col"),
            list(info.get("categorical_cols") or []),
            list(info.get("continuous_cols") or []),
            list(info.get("smooth_cols") or []),
            info.get("subject_col"),
        )

    @property
    def covariates(self):
        """Covariate columns: categorical, then continuous, then smooth."""
        return [*self.categorical, *self.continuous, *self.smooth]

    @property
    def numeric(self):
        """Covariate columns that must hold finite numbers (continuous and smooth)."""
        return [*self.continuous, *self.smooth]

    @property
    def metadata(self):
        """Columns of X that are not features in the columns route (none without batch_col)."""
        if self.batch_col is None:
            return []
        return [self.batch_col, *self.covariates, *self.subject_columns]

    @property
    def subject_columns(self):
        """``[subject]`` in longitudinal ComBat, else ``[]``."""
        return [] if self.subject is None else [self.subject]

    def features(self, columns, *, route=None):
        """The feature columns among ``columns`` (all of them without ``batch_col``); a
        ValueError when there are none (``route`` named in it)."""
        features = feature_columns_of(
            columns, self.batch_col, self.covariates + self.subject_columns
        )
        if not features:
            raise ValueError(
                f"X has no feature columns{f' ({route} input)' if route else ''}: its columns "
                f"{list(columns)[:10]} are all the site and covariate columns; ComBat "
                "harmonizes the other columns of X"
            )
        return features


def read_metadata(batch, covariates, n_rows, roles, *, route=None):
    """Sites and covariates of ``n_rows`` rows, checked: ``(site_labels, covariate_frame)``.

    Parameters
    ----------
    batch : array-like of shape (n_rows,)
        One site label per row (a Series, array or list).
    covariates : DataFrame or None
        Holds ``roles.covariates`` (other columns are ignored).
    n_rows : int
        Number of rows of X.
    roles : ColumnRoles
    route : str, optional
        Named in errors (e.g. ``"dask"``), for routes whose X is not in memory.

    Returns
    -------
    sites : ndarray of shape (n_rows,)
    covariate_frame : DataFrame of shape (n_rows, len(roles.covariates)), positional index
    """
    where = f" ({route} input)" if route else ""
    if batch is None:
        raise ValueError(
            f"CombatHarmonizer needs the site of each row{where}: set batch_col to the site "
            "column of a DataFrame X, or pass batch="
        )
    sites = site_labels(batch, n_rows, where=where)
    columns = roles.covariates
    if columns:
        if not isinstance(covariates, pd.DataFrame):
            raise TypeError(
                f"covariates= must be a pandas DataFrame holding {columns}{where}; got "
                f"{type(covariates).__name__}"
            )
        missing = [c for c in columns if c not in covariates.columns]
        if missing:
            raise ValueError(
                f"covariate column(s) {missing} not found in covariates={where} "
                f"(columns: {list(covariates.columns)})"
            )
        if not covariates.columns.is_unique:
            repeated = [c for c in columns if int((covariates.columns == c).sum()) > 1]
            if repeated:
                raise ValueError(
                    f"covariates={where} has more than one column named {repeated}; give "
                    "each covariate one column"
                )
        # Columns are read by name: a table of just these columns is used as it is (a
        # column subset of a small table costs more than the rest of the checks)
        exact = len(covariates.columns) == len(columns) and covariates.columns.is_unique
        frame = covariates if exact else covariates[columns]
    else:  # only the columns named in categorical_cols/continuous_cols/smooth_cols are used
        frame = pd.DataFrame(index=range(n_rows))
    return sites, covariate_frame(frame, n_rows, roles.numeric, where=where)


@dataclass
class Rows:
    """One call's input, split into features, site labels and covariates."""

    features: np.ndarray  # (n_samples, n_features) float32 or float64
    sites: np.ndarray  # (n_samples,) labels
    covariates: pd.DataFrame  # (n_samples, n_covariate_columns), positional index
    subjects: object = None  # (n_samples,) subject labels (longitudinal ComBat), unchecked


def metadata_columns(batch_col, covariate_cols):
    """Columns of X that are not features in the columns route."""
    return {batch_col, *covariate_cols}


def feature_columns(X, batch_col, covariate_cols):
    """Feature columns of a DataFrame X (everything but site and covariates in the columns
    route)."""
    return feature_columns_of(X.columns, batch_col, covariate_cols)


def feature_columns_of(columns, batch_col, covariate_cols):
    """Feature columns among ``columns`` (all of them when ``batch_col`` is None)."""
    if batch_col is None:
        return list(columns)
    meta = metadata_columns(batch_col, covariate_cols)
    return [c for c in columns if c not in meta]


def read_rows(X, batch, covariates, roles, *, from_columns, subjects=None, allow_empty=False):
    """Split the input of one in-memory call into features, sites and covariates, validated.

    Parameters
    ----------
    X : DataFrame or array-like
    batch, covariates : keyword-route site labels and covariate table (or None)
    roles : ColumnRoles
    from_columns : bool
        Read sites and covariates from the columns of X (``roles.batch_col``).
    subjects : array-like, optional
        Keyword-route subject labels (longitudinal ComBat, ``roles.subject`` set).
    allow_empty : bool, default=False
        Accept X with no rows (a chunk or block that adds or harmonizes nothing).
    """
    batch_col = roles.batch_col
    if subjects is not None and roles.subject is None:
        raise ValueError(
            "subjects= was given but subject_col is None; set subject_col (for example "
            "subject_col='subject') to fit longitudinal ComBat with a random effect per subject"
        )
    if from_columns:
        if batch is not None or covariates is not None or subjects is not None:
            given = (
                "batch"
                if batch is not None
                else "covariates"
                if covariates is not None
                else "subjects"
            )
            raise ValueError(
                f"{given}= was given as a keyword while batch_col={batch_col!r} says "
                "sites and covariates are columns of X; give them one way: drop the "
                "keyword, or set batch_col=None"
            )
        if not isinstance(X, pd.DataFrame):
            raise TypeError(
                f"batch_col={batch_col!r} needs X as a pandas DataFrame holding the "
                f"site column; got {type(X).__name__}. If a preceding step turned X into "
                "an array, call its set_output(transform='pandas'); or pass the sites "
                "with batch= and batch_col=None"
            )
        missing = [
            c for c in [batch_col, *roles.covariates, *roles.subject_columns] if c not in X.columns
        ]
        if missing:
            raise ValueError(missing_columns_message(missing, X.columns))
        features = X[roles.features(X.columns)]
        batch, covariates = X[batch_col], X[roles.covariates]
        if roles.subject is not None:
            subjects = X[roles.subject]
    else:
        if batch is None:
            raise ValueError(
                "CombatHarmonizer needs the site of each row: set batch_col to the site "
                "column of a DataFrame X, or pass batch="
            )
        if roles.subject is not None and subjects is None:
            raise ValueError(
                f"subject_col={roles.subject!r} (longitudinal ComBat) needs the subject of "
                "each row: pass subjects= beside batch= (or give X the subject column with "
                "batch_col set)"
            )
        check_same_index(X=X, batch=batch, covariates=covariates, subjects=subjects)
        features = X
    features = feature_array(features, allow_empty=allow_empty)
    sites, cov_frame = read_metadata(batch, covariates, features.shape[0], roles)
    return Rows(features, sites, cov_frame, subjects)


def check_same_index(**objects):
    """Raise when pandas objects given together (X, batch=, covariates=) carry the same rows in
    another order, or different row labels: their rows are paired by position, so nothing is
    aligned silently.

    A default index (0, 1, ..., n-1) carries no row labels (it is what a DataFrame made from an
    array, or the pandas output of a pipeline step given an array, has): against a labelled
    index with other labels it is not compared (the relaxed rule, e.g. X after a split with
    its original labels and a table made from arrays). Against a labelled index holding the
    same labels in another order (X shuffled, ``batch`` with a default index) it is refused:
    that is the same rows paired in two orders."""
    indexed = [
        (name, obj.index)
        for name, obj in objects.items()
        if isinstance(obj, (pd.Series, pd.DataFrame))
    ]
    for (name_a, index_a), (name_b, index_b) in pairwise(indexed):
        if index_a.equals(index_b) or len(index_a) != len(index_b):
            continue  # a different length is reported as a row-count mismatch, with the counts
        relaxed = _is_default_index(index_a) or _is_default_index(index_b)
        if relaxed and not _same_label_set(index_a, index_b):
            continue
        position = int(np.flatnonzero(np.asarray(index_a != index_b))[0])
        raise ValueError(
            f"{_argument(name_a)} and {_argument(name_b)} have "
            f"{'the same row labels in another order' if relaxed else 'different indexes'} (row "
            f"{position} is labelled {_label(index_a[position])} in {_argument(name_a)} and "
            f"{_label(index_b[position])} in {_argument(name_b)}); rows are paired by "
            "position, so give them the same index (for example .reset_index(drop=True) on "
            "each, after putting the rows in the same order, or reindex one like the other) "
            "or pass numpy arrays"
        )


def _same_label_set(index_a, index_b):
    try:
        return bool(
            index_a.is_unique
            and index_b.is_unique
            and index_a.sort_values().equals(index_b.sort_values())
        )
    except TypeError:  # labels of types that cannot be sorted together
        return set(index_a) == set(index_b)


def _is_default_index(index):
    return isinstance(index, pd.RangeIndex) and index.start == 0 and index.step == 1


def _label(value):
    return repr(value.item() if isinstance(value, np.generic) else value)


def _argument(name):
    return name if name == "X" else f"{name}="


def check_same_columns(columns, fitted_columns):
    """Raise unless a DataFrame's columns are those seen in fit, in the same order.

    Columns are matched by name (any hashable, integers included), never by position: a
    DataFrame with the fitted columns in another order is refused rather than harmonized with
    another column's parameters.
    """
    columns = list(columns)
    if len(columns) == len(fitted_columns) and all(
        _same_label(a, b) for a, b in zip(columns, fitted_columns)
    ):
        return
    fitted = pd.Index(fitted_columns, dtype=object, tupleize_cols=False)
    given = pd.Index(columns, dtype=object, tupleize_cols=False)
    missing = [c for c in fitted_columns if c not in given]
    unexpected = [c for c in columns if c not in fitted]
    if missing or unexpected:
        parts = ([f"missing {_preview(missing)}"] if missing else []) + (
            [f"not seen in fit {_preview(unexpected)}"] if unexpected else []
        )
        raise ValueError(
            f"X has other columns than in fit: {'; '.join(parts)}. Give X the "
            f"columns seen in fit, in their order: {_preview(fitted_columns)}"
        )
    position = next(
        i for i, (a, b) in enumerate(zip(columns, fitted_columns)) if not _same_label(a, b)
    )
    raise ValueError(
        f"X has the columns seen in fit in another order (column {position} is "
        f"{_label(columns[position])}, in fit it was {_label(fitted_columns[position])}); "
        "columns are matched by name, so reorder them as in fit, e.g. X[fitted_columns] "
        f"with fitted_columns = {_preview(fitted_columns)}"
    )


def check_harmonized_order(columns, names_out):
    """inverse_transform: harmonized columns named as ``get_feature_names_out()`` (as text,
    the way ``set_output(transform="pandas")`` names them) but in another order are refused;
    columns with other names are taken by position, as arrays are."""
    given = [str(c) for c in columns]
    expected = [str(c) for c in names_out]
    if given != expected and sorted(given) == sorted(expected):
        position = next(i for i, (a, b) in enumerate(zip(given, expected)) if a != b)
        raise ValueError(
            f"X has the harmonized features in another order (column {position} is "
            f"{given[position]!r}, get_feature_names_out() has {expected[position]!r}); "
            "columns are matched by name, so reorder them as get_feature_names_out()"
        )


def _same_label(a, b):
    """Column labels equal as pandas compares them (1 == 1.0), but True is not 1."""
    booleans = (bool, np.bool_)
    return isinstance(a, booleans) == isinstance(b, booleans) and bool(a == b)


def _preview(labels, n=10):
    labels = list(labels)
    return (
        "["
        + ", ".join(repr(v.item() if isinstance(v, np.generic) else v) for v in labels[:n])
        + (", ..." if len(labels) > n else "")
        + "]"
    )


def missing_columns_message(missing, columns):
    msg = (
        f"column(s) {missing} not found in X (columns: {list(columns)}). "
        "CombatHarmonizer reads the site and covariate columns from X"
    )
    renamed = [c for c in columns if any(str(c).endswith("__" + str(m)) for m in missing)]
    if renamed:
        msg += (
            f"; X has {renamed}: a ColumnTransformer prefixed the names, so set "
            "verbose_feature_names_out=False on it"
        )
    else:
        msg += (
            "; if a preceding step dropped them, keep them with "
            "ColumnTransformer(..., remainder='passthrough', "
            "verbose_feature_names_out=False).set_output(transform='pandas')"
        )
    return msg


def feature_array(features, *, allow_empty=False):
    """The feature matrix as float32/float64, finite, with columns named in errors (at least
    one row unless ``allow_empty``)."""
    if isinstance(features, pd.DataFrame):
        bad = [
            c
            for c in features.columns
            if not is_numeric_dtype(features[c]) or is_bool_dtype(features[c])
        ]
        if bad:
            raise ValueError(
                f"feature column(s) {bad} are not numeric (text, categories or true/false "
                "values); name site and covariate columns in batch_col/categorical_cols/"
                "continuous_cols, or drop them"
            )
        names = list(features.columns)
    else:
        check_not_bool(features)
        names = None
    array = check_array(
        features,
        dtype=(np.float64, np.float32),
        ensure_all_finite=False,
        ensure_min_samples=0 if allow_empty else 1,
        input_name="X",
    )
    # A column sum is non-finite when the column holds NaN/inf (or overflows): only those
    # columns are checked value by value, so no full-size mask is built.
    # The sum of all values is tried first (one fast pass over memory in its own order).
    with np.errstate(all="ignore"):
        total = array.sum() if array.size else 0.0
        suspect = [] if np.isfinite(total) else np.flatnonzero(~np.isfinite(array.sum(axis=0)))
    bad = suspect[~np.isfinite(array[:, suspect]).all(axis=0)] if len(suspect) else []
    bad = np.asarray(bad, dtype=np.intp)
    if bad.size:
        labels = [names[i] for i in bad] if names is not None else bad.tolist()
        raise ValueError(
            f"X has NaN or infinite values in feature column(s) {labels[:10]}"
            f"{' ...' if len(labels) > 10 else ''}; ComBat needs finite "
            "values (impute or drop them first)"
        )
    return array


def check_not_bool(X):
    """Refuse a boolean feature matrix: true/false values are labels, not measurements."""
    dtype = getattr(X, "dtype", None)
    if isinstance(dtype, np.dtype) and dtype.kind == "b":
        raise ValueError(
            "X has a boolean dtype; ComBat harmonizes measurements, not "
            "true/false values (pass a diagnosis or group as a covariate, or "
            "convert X to numbers first if that is really meant)"
        )


def site_labels(sites, n_samples, *, where=""):
    """One site label per row, as a numpy array (categoricals as their categories' dtype)."""
    return row_labels(sites, n_samples, kind="site", argument="batch", where=where)


def row_labels(values, n_samples, *, kind, argument, where=""):
    """One ``kind`` label per row (sites, subjects), as a numpy array, checked: 1-D, one per
    row, none missing; categoricals as their categories' dtype. Errors name ``argument``."""
    if isinstance(values, pd.DataFrame) or np.ndim(values) != 1:
        raise ValueError(
            f"{argument} must be a 1-D sequence of {kind} labels, one per row of X{where}; "
            f"got shape {np.shape(values)}"
        )
    # A plain array is checked as it is (a Series of a few labels costs more than the
    # checks); text comes out as object, as from a Series. Not a subclass: a masked array's
    # masked labels are missing, which only the Series sees; nor bytes, which a Series keeps
    # as they are.
    plain = type(values) is np.ndarray and values.dtype.kind in "iufUO"
    if not plain:
        values = values if isinstance(values, pd.Series) else pd.Series(values)
    if len(values) != n_samples:
        raise ValueError(
            f"{argument} has {len(values)} {kind} labels for {n_samples} rows of X{where}; "
            f"give one {kind} label per row"
        )
    missing = np.asarray(pd.isna(values))
    if missing.any():
        raise ValueError(
            f"{kind} labels{'' if argument == 'batch' else f' ({argument})'} are missing "
            f"(NaN/None) in row(s) {np.flatnonzero(missing)[:10].tolist()}"
        )
    if plain:
        return values.astype(object) if values.dtype.kind == "U" else values
    if isinstance(values.dtype, pd.CategoricalDtype):
        values = values.astype(values.cat.categories.dtype)
    return values.to_numpy()


def covariate_frame(frame, n_samples, continuous, *, where=""):
    """The covariate table with a positional index, complete, continuous columns numeric."""
    if len(frame) != n_samples:
        raise ValueError(f"covariates have {len(frame)} rows for {n_samples} rows of X{where}")
    frame = frame.reset_index(drop=True)
    missing = frame.isna().to_numpy()  # one check of the whole table, then the culprit
    if missing.any():
        j = int(np.flatnonzero(missing.any(axis=0))[0])
        rows = np.flatnonzero(missing[:, j])[:10].tolist()
        raise ValueError(
            f"covariate {frame.columns[j]!r} has missing values (NaN) in row(s) {rows}"
        )
    for col in continuous:
        column = frame[col]
        if not is_numeric_dtype(column) or column.dtype == bool:
            raise ValueError(
                f"continuous covariate {col!r} is not numeric (dtype "
                f"{column.dtype}); list it in categorical_cols instead"
            )
        if not np.isfinite(column.to_numpy(dtype=np.float64)).all():
            raise ValueError(f"continuous covariate {col!r} has infinite values")
    return frame
