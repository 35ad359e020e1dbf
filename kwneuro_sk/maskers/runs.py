"""Per-run inputs of 4D extraction: confounds tables and sample masks, checked and named.

Each run (a 4D image) gets its own confounds and its own sample mask. These helpers turn what a
user passes (one entry per run, or one entry for a single run) into plain arrays and check
each against the run's number of volumes, so that a wrong length or a missing file is a
ValueError or FileNotFoundError naming the run, never a deep exception inside
:func:`nilearn.signal.clean` and never one run's mask applied to another.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd


def per_run(value, n_runs, *, name) -> list:
    """One entry per run: ``None`` gives ``None`` for every run; a list or tuple must have
    ``n_runs`` entries; any other single value is accepted for a single run only."""
    if value is None:
        return [None] * n_runs
    if isinstance(value, (list, tuple)):
        if n_runs == 1 and len(value) != 1 and _is_one_entry(value):
            return [value]
        if len(value) != n_runs:
            raise ValueError(
                f"{name} has {len(value)} entries but imgs_list has {n_runs} runs; give one "
                f"entry per run (None for a run without {name})."
            )
        return list(value)
    if n_runs == 1:
        return [value]
    raise ValueError(
        f"{name} must be a list with one entry per run ({n_runs} runs), got one "
        f"{type(value).__name__} for all of them; a {name} belongs to one run."
    )


def _is_one_entry(value) -> bool:
    """Whether a list is itself one run's entry (a list of numbers: indices or a column)."""
    return len(value) > 0 and all(isinstance(v, (int, float, bool, np.number)) for v in value)


def read_confounds(confounds, *, run) -> np.ndarray | None:
    """One run's confounds as a float64 (n_scans, n_confounds) array.

    Accepts an array, a DataFrame, the path of a TSV/CSV table (with a header row, as fMRIPrep
    writes), or a list of those (joined column-wise). A missing file is a FileNotFoundError and
    a NaN a ValueError naming the run (and the column, for tables).
    """
    if confounds is None:
        return None
    if isinstance(confounds, (list, tuple)) and not _is_one_entry(confounds):
        parts = [read_confounds(part, run=run) for part in confounds]
        parts = [part for part in parts if part is not None]
        if not parts:
            return None
        lengths = {part.shape[0] for part in parts}
        if len(lengths) > 1:
            raise ValueError(
                f"confounds of {run}: the tables given for this run have different numbers "
                f"of rows {sorted(lengths)}."
            )
        return np.hstack(parts)
    source = "confounds"
    if isinstance(confounds, (str, os.PathLike)):
        path = os.fspath(confounds)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"confounds file of {run} not found: {path!r}")
        sep = "," if path.endswith(".csv") else "\t"
        try:
            confounds = pd.read_csv(path, sep=sep)
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(
                f"confounds file of {run} ({path!r}) cannot be read as a table: {error}"
            ) from None
        source = f"confounds file {path!r}"
    if isinstance(confounds, pd.Series):
        confounds = confounds.to_frame()
    if isinstance(confounds, pd.DataFrame):
        try:
            values = confounds.to_numpy(dtype=np.float64, na_value=np.nan)
        except (TypeError, ValueError):
            bad = [c for c in confounds.columns if not pd.api.types.is_numeric_dtype(confounds[c])]
            raise ValueError(f"{source} of {run}: column(s) {bad[:5]} are not numeric.") from None
        columns = [str(c) for c in confounds.columns]
    else:
        try:
            values = np.asarray(confounds, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(
                f"{source} of {run} must be numbers (an array, DataFrame or table path), got "
                f"{type(confounds).__name__}."
            ) from None
        columns = None
    if values.ndim == 1:
        values = values[:, np.newaxis]
    if values.ndim != 2:
        raise ValueError(
            f"{source} of {run} must be 2-D (n_scans, n_confounds), got {values.shape}."
        )
    bad = ~np.isfinite(values)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        column = repr(columns[col]) if columns is not None else str(col)
        count = int(bad.any(axis=0).sum())
        raise ValueError(
            f"{source} of {run} has a NaN or infinite value (column {column}, row {row}; "
            f"{count} column(s) affected). Fill or drop it first (fMRIPrep's derivative "
            "columns start with NaN: nilearn.interfaces.fmriprep.load_confounds fills them)."
        )
    return values


def check_volumes_left(n_volumes, minimum, *, run, needs, why):
    """Refuse a run left with fewer than ``minimum`` volumes (after its sample mask), naming
    the run, the count, what ``needs`` them and ``why``."""
    if n_volumes < minimum:
        raise ValueError(
            f"{run}: {n_volumes} volume(s) left after the sample mask; {needs} needs at least "
            f"{minimum} ({why})."
        )


def check_confounds_length(values, n_scans, *, run):
    """A confounds array must have one row per volume of its run."""
    if values is not None and values.shape[0] != n_scans:
        raise ValueError(
            f"confounds of {run} have {values.shape[0]} rows but the run has {n_scans} "
            "volumes; give one row per volume."
        )


def read_sample_mask(mask, n_scans, *, run) -> np.ndarray | None:
    """One run's sample mask as sorted volume indices to keep (nilearn's meaning).

    A boolean mask must have one entry per volume; integer indices must lie in
    ``[0, n_scans)`` and be unique.
    """
    if mask is None:
        return None
    values = np.asarray(mask)
    if values.ndim != 1:
        raise ValueError(f"sample_mask of {run} must be 1-D, got shape {values.shape}.")
    if values.dtype == bool:
        if values.size != n_scans:
            raise ValueError(
                f"sample_mask of {run} is a boolean mask of {values.size} entries but the run "
                f"has {n_scans} volumes; give one entry per volume."
            )
        values = np.flatnonzero(values)
    elif values.size and values.dtype.kind not in "iu":
        raise ValueError(
            f"sample_mask of {run} must hold volume indices (integers) or booleans, got "
            f"dtype {values.dtype}."
        )
    values = values.astype(np.intp)
    if values.size and (values.min() < 0 or values.max() >= n_scans):
        wrong = values[(values < 0) | (values >= n_scans)]
        raise ValueError(
            f"sample_mask of {run} has volume index {int(wrong[0])} but the run has {n_scans} "
            f"volumes (indices 0 to {n_scans - 1})."
        )
    if np.unique(values).size != values.size:
        raise ValueError(f"sample_mask of {run} lists a volume more than once.")
    if values.size == 0:
        raise ValueError(f"sample_mask of {run} keeps no volume.")
    return np.sort(values)
