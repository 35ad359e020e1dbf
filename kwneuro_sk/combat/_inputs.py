"""Input handling of the ComBat estimators: one call's X, sites and covariates, validated once.

Sites and covariates reach an estimator either as columns of a DataFrame ``X`` (``batch_col``)
or as the keyword arguments ``batch=`` / ``covariates=``. :func:`read_rows` turns either form
into :class:`Rows`: a float feature matrix, one site label per row and a covariate table with a
positional index, raising errors that name the offending column, row or argument.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from pandas.api.types import is_numeric_dtype
from sklearn.utils.validation import check_array


@dataclass
class Rows:
    """One call's input, split into features, site labels and covariates."""

    features: np.ndarray  # (n_samples, n_features) float32 or float64
    sites: np.ndarray  # (n_samples,) labels
    covariates: pd.DataFrame  # (n_samples, n_covariate_columns), positional index


def metadata_columns(batch_col, covariate_cols):
    """Columns of X that are not features in the columns route."""
    return {batch_col, *covariate_cols}


def feature_columns(X, batch_col, covariate_cols):
    """Feature columns of a DataFrame X (everything but site and covariates in the columns
    route)."""
    if batch_col is None:
        return list(X.columns)
    meta = metadata_columns(batch_col, covariate_cols)
    return [c for c in X.columns if c not in meta]


def read_rows(X, batch, covariates, *, batch_col, covariate_cols, continuous, from_columns):
    """Split the input of one call into features, sites and covariates, validated.

    Parameters
    ----------
    X : DataFrame or array-like
    batch, covariates : keyword-route site labels and covariate table (or None)
    batch_col : hashable or None
    covariate_cols : list
        Categorical then continuous covariate columns.
    continuous : list
        The continuous ones (must be numeric).
    from_columns : bool
        Read sites and covariates from the columns of X.
    """
    if from_columns:
        if batch is not None or covariates is not None:
            given = "batch" if batch is not None else "covariates"
            raise ValueError(
                f"{given}= was given as a keyword while batch_col={batch_col!r} says "
                "sites and covariates are columns of X; give them one way: drop the "
                "keyword, or set batch_col=None")
        if not isinstance(X, pd.DataFrame):
            raise TypeError(
                f"batch_col={batch_col!r} needs X as a pandas DataFrame holding the "
                f"site column; got {type(X).__name__}. If a preceding step turned X into "
                "an array, call its set_output(transform='pandas'); or pass the sites "
                "with batch= and batch_col=None")
        missing = [c for c in [batch_col, *covariate_cols] if c not in X.columns]
        if missing:
            raise ValueError(_missing_columns_message(missing, X.columns))
        features = X[feature_columns(X, batch_col, covariate_cols)]
        sites = X[batch_col]
        cov_frame = X[covariate_cols]
    else:
        if batch is None:
            raise ValueError(
                "CombatHarmonizer needs the site of each row: set batch_col to the site "
                "column of a DataFrame X, or pass batch=")
        features = X
        sites = batch
        if covariate_cols:
            if not isinstance(covariates, pd.DataFrame):
                raise TypeError(
                    f"covariates= must be a pandas DataFrame holding {covariate_cols}; got "
                    f"{type(covariates).__name__}")
            missing = [c for c in covariate_cols if c not in covariates.columns]
            if missing:
                raise ValueError(f"covariate column(s) {missing} not found in covariates= "
                                 f"(columns: {list(covariates.columns)})")
            cov_frame = covariates[covariate_cols]
        else:  # only the columns named in categorical_cols/continuous_cols are used
            cov_frame = pd.DataFrame(index=range(np.shape(X)[0]))

    features = feature_array(features)
    n_samples = features.shape[0]
    sites = site_labels(sites, n_samples)
    cov_frame = covariate_frame(cov_frame, n_samples, continuous)
    return Rows(features, sites, cov_frame)


def _missing_columns_message(missing, columns):
    msg = (f"column(s) {missing} not found in X (columns: {list(columns)}). "
           "CombatHarmonizer reads the site and covariate columns from X")
    renamed = [c for c in columns if any(str(c).endswith("__" + str(m)) for m in missing)]
    if renamed:
        msg += (f"; X has {renamed}: a ColumnTransformer prefixed the names, so set "
                "verbose_feature_names_out=False on it")
    else:
        msg += ("; if a preceding step dropped them, keep them with "
                "ColumnTransformer(..., remainder='passthrough', "
                "verbose_feature_names_out=False).set_output(transform='pandas')")
    return msg


def feature_array(features):
    """The feature matrix as float32/float64, finite, with columns named in errors."""
    if isinstance(features, pd.DataFrame):
        bad = [c for c in features.columns if not is_numeric_dtype(features[c])]
        if bad:
            raise ValueError(
                f"feature column(s) {bad} are not numeric; name site and covariate "
                "columns in batch_col/categorical_cols/continuous_cols, or drop them")
        names = list(features.columns)
    else:
        names = None
    array = check_array(features, dtype=(np.float64, np.float32), ensure_all_finite=False,
                        input_name="X")
    # A column sum is non-finite when the column holds NaN/inf (or overflows): only those
    # columns are checked value by value, so no full-size mask is built.
    with np.errstate(all="ignore"):
        suspect = np.flatnonzero(~np.isfinite(array.sum(axis=0)))
    bad = suspect[~np.isfinite(array[:, suspect]).all(axis=0)]
    if bad.size:
        labels = [names[i] for i in bad] if names is not None else bad.tolist()
        raise ValueError(f"X has NaN or infinite values in feature column(s) {labels[:10]}"
                         f"{' ...' if len(labels) > 10 else ''}; ComBat needs finite "
                         "values (impute or drop them first)")
    return array


def site_labels(sites, n_samples):
    """One site label per row, as a numpy array (categoricals as their categories' dtype)."""
    if isinstance(sites, pd.DataFrame) or np.ndim(sites) != 1:
        raise ValueError("batch must be a 1-D sequence of site labels, one per row of X; "
                         f"got shape {np.shape(sites)}")
    sites = sites if isinstance(sites, pd.Series) else pd.Series(sites)
    if len(sites) != n_samples:
        raise ValueError(f"batch has {len(sites)} site labels for {n_samples} rows of X")
    missing = pd.isna(sites).to_numpy()
    if missing.any():
        raise ValueError(f"site labels are missing (NaN/None) in row(s) "
                         f"{np.flatnonzero(missing)[:10].tolist()}")
    if isinstance(sites.dtype, pd.CategoricalDtype):
        sites = sites.astype(sites.cat.categories.dtype)
    return sites.to_numpy()


def covariate_frame(frame, n_samples, continuous):
    """The covariate table with a positional index, complete, continuous columns numeric."""
    if len(frame) != n_samples:
        raise ValueError(f"covariates have {len(frame)} rows for {n_samples} rows of X")
    frame = frame.reset_index(drop=True)
    for col in frame.columns:
        if frame[col].isna().any():
            rows = np.flatnonzero(frame[col].isna().to_numpy())[:10].tolist()
            raise ValueError(f"covariate {col!r} has missing values (NaN) in row(s) {rows}")
    for col in continuous:
        if not is_numeric_dtype(frame[col]) or frame[col].dtype == bool:
            raise ValueError(f"continuous covariate {col!r} is not numeric (dtype "
                             f"{frame[col].dtype}); list it in categorical_cols instead")
        if not np.isfinite(frame[col].to_numpy(dtype=np.float64)).all():
            raise ValueError(f"continuous covariate {col!r} has infinite values")
    return frame
