"""Region names: from a list of names, a look-up table (DataFrame or TSV), or the label values."""

from __future__ import annotations

import os
import warnings
from collections import Counter

import numpy as np
import pandas as pd


def format_label(value) -> str:
    """Label value as a column name: ``3.0`` -> ``"3"``, ``2.5`` -> ``"2.5"``."""
    value = value.item() if isinstance(value, np.generic) else value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def region_names(labels, atlas_ids, *, has_background) -> dict:
    """Map every atlas label value (background excluded) to its name.

    Parameters
    ----------
    labels : None, list-like of str, DataFrame or path to a TSV
        ``None``: names are the label values. A list gives one name per region in increasing
        label order; it may also start with the background's name (one name more, the
        convention of nilearn atlases). A look-up table has columns ``index`` and ``name``.
    atlas_ids : ndarray
        Sorted label values of the atlas, background excluded.
    has_background : bool
        Whether the atlas contains the background label.
    """
    if labels is None:
        return {value: format_label(value) for value in atlas_ids.tolist()}
    if isinstance(labels, (str, os.PathLike, pd.DataFrame)):
        return _names_from_lut(_read_lut(labels), atlas_ids)
    names = list(np.asarray(labels, dtype=object).ravel())
    n_ids = atlas_ids.size
    if len(names) == n_ids + 1 and has_background:
        names = names[1:]
    if len(names) != n_ids:
        raise ValueError(
            f"labels has {len(names)} names but labels_img has {n_ids} regions "
            f"(label values {_preview(atlas_ids)}); give one name per region in increasing "
            "label order, optionally preceded by the background's name."
        )
    return _fill_empty_names(dict(zip(atlas_ids.tolist(), names)), "labels")


def _is_empty_name(name) -> bool:
    if name is None:
        return True
    if isinstance(name, float) and np.isnan(name):
        return True
    return isinstance(name, str) and not name.strip()


def _fill_empty_names(names: dict, where: str) -> dict:
    """Empty, None or NaN names become the label value, with a warning naming them."""
    empty = [value for value, name in names.items() if _is_empty_name(name)]
    if empty:
        warnings.warn(
            f"{where} has no name (an empty cell, None or NaN) for label values "
            f"{_preview(empty)}; their label values are used as names.",
            UserWarning,
            stacklevel=4,
        )
    return {
        value: format_label(value) if _is_empty_name(name) else str(name)
        for value, name in names.items()
    }


def unique_names(names, ids) -> np.ndarray:
    """Make names unique: each repeated name gets its label value as a suffix.

    A suffixed name can still meet a name already taken (``"left_2"`` listed for label 3 and
    ``"left"`` repeated for label 2); it is then suffixed again (``"left_2_2"``) until every
    name is unique, so the output columns always have distinct names.
    """
    names = list(names)
    counts = Counter(names)
    kept_as_given = {name for name in names if counts[name] == 1}
    taken, result = set(), []
    for name, value in zip(names, ids):
        candidate = f"{name}_{format_label(value)}" if counts[name] > 1 else name
        while candidate in taken or (candidate != name and candidate in kept_as_given):
            candidate = f"{candidate}_{format_label(value)}"
        taken.add(candidate)
        result.append(candidate)
    return np.array(result, dtype=object)


def _read_lut(labels) -> pd.DataFrame:
    if isinstance(labels, pd.DataFrame):
        lut = labels
    else:
        path = os.fspath(labels)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"labels look-up table not found: {path!r}")
        try:
            lut = pd.read_csv(path, sep="\t")
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(
                f"labels look-up table {path!r} cannot be read as a TSV table: "
                f"{' '.join(str(error).split())}"
            ) from None
        lut.attrs["source"] = f"labels look-up table {path!r}"
    missing = {"index", "name"} - set(lut.columns)
    if missing:
        raise ValueError(
            f"labels look-up table must have columns 'index' and 'name'; missing {sorted(missing)}."
        )
    return lut


def _names_from_lut(lut, atlas_ids) -> dict:
    index = pd.to_numeric(lut["index"], errors="coerce")
    bad = index.isna().to_numpy()
    if bad.any():
        row = int(bad.argmax())
        where = lut.attrs.get("source", "the labels look-up table")
        raise ValueError(
            f"{where}: column 'index' must hold label values (numbers); row {row} has "
            f"{lut['index'].iloc[row]!r}"
        )
    where = lut.attrs.get("source", "the labels look-up table")
    repeated = index[index.duplicated(keep=False)]
    if repeated.size:
        value = repeated.iloc[0]
        rows = np.flatnonzero((index == value).to_numpy()).tolist()
        raise ValueError(
            f"{where}: label value {format_label(value)} is listed {len(rows)} times in column "
            f"'index' (rows {rows}, names {lut['name'].iloc[rows].tolist()}); give each label "
            "value one row."
        )
    by_index = dict(zip(index.tolist(), lut["name"].tolist()))
    names, unnamed = {}, []
    for value in atlas_ids.tolist():
        if value in by_index:
            names[value] = by_index[value]
        else:
            unnamed.append(value)
            names[value] = format_label(value)
    names = _fill_empty_names(names, where)
    if unnamed:
        warnings.warn(
            f"labels look-up table has no name for label values {_preview(unnamed)}; "
            "their label values are used as names.",
            UserWarning,
            stacklevel=3,
        )
    return names


def _preview(values, n=10) -> str:
    values = [format_label(v) for v in np.asarray(values).tolist()]
    more = ", ..." if len(values) > n else ""
    return "[" + ", ".join(values[:n]) + more + "]"
