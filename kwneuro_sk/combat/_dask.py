"""Dask input for :class:`~kwneuro_sk.CombatHarmonizer`: fit by a tree reduction, lazy transform.

``fit`` on a ``dask.array.Array`` (rows = subjects, sites and covariates as keyword arguments)
or a ``dask.dataframe.DataFrame`` (``batch_col`` route, or keywords) computes, for every block
of rows, the per-site centred statistics of :mod:`kwneuro_sk.combat.statistics`, merges them
pairwise up a balanced tree (one ``dask.compute``), and fits from the merged statistics: the
fitted attributes are plain numpy and equal those of the numpy path to rounding. Only the site
and covariate columns (one value per subject) are brought to the client.

``transform`` of a dask input returns a lazy collection of the same kind: ``map_blocks`` over
row blocks of an array, ``map_partitions`` over a DataFrame; each block is harmonized by the
numpy path (row by row, so blocks give what the whole input gives). Sites unseen in ``fit`` are
an error with ``unseen_batch="adapt"`` too: estimating a new site needs all its rows at once.

dask is imported only here, and only when the input is a dask collection.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd

from kwneuro_sk.combat import statistics
from kwneuro_sk.combat._covariates import format_labels
from kwneuro_sk.combat._inputs import (
    ColumnRoles,
    check_not_bool,
    missing_columns_message,
    read_metadata,
)


def is_dask(obj) -> bool:
    """Whether ``obj`` is a dask collection (checked without importing dask)."""
    return type(obj).__module__.split(".")[0] in ("dask", "dask_expr")


def _is_dataframe(obj):
    # A dask DataFrame exists only once dask.dataframe is imported: looking it up in
    # sys.modules keeps array input free of dask.dataframe (and of pyarrow, which it imports).
    dd = sys.modules.get("dask.dataframe")
    return dd is not None and isinstance(obj, dd.DataFrame)


def gather_metadata(batch, covariates):
    """``batch=`` / ``covariates=`` given as dask collections, computed (one value per
    subject: small), so that they are checked like in-memory ones."""
    if is_dask(batch):
        batch = batch.compute()
    if is_dask(covariates):
        covariates = covariates.compute()
    return batch, covariates


def fit(combat, X, batch, covariates):
    """Fit ``combat`` on a dask array or DataFrame (see the module docstring)."""
    import dask

    batch, covariates = gather_metadata(batch, covariates)

    roles = ColumnRoles.of(combat)
    names_in = names_out = None
    if _is_dataframe(X):
        columns = list(X.columns)
        meta = roles.metadata
        missing = [c for c in meta if c not in columns]
        if missing:
            raise ValueError(missing_columns_message(missing, columns))
        if meta and (batch is not None or covariates is not None):
            raise ValueError(
                f"batch=/covariates= were given as keywords while batch_col="
                f"{combat.batch_col!r} says they are columns of X; give them "
                "one way"
            )
        repeated = list(pd.Index(columns)[pd.Index(columns).duplicated()].unique())
        if repeated:
            raise ValueError(
                f"X has more than one column named {repeated} (dask input); give every column "
                "its own name"
            )
        features = roles.features(columns, route="dask")
        bad = [c for c in features if X[c].dtype.kind not in "iuf"]
        if bad:
            raise ValueError(
                f"feature column(s) {bad} are not numeric (text, categories or true/false "
                "values); name site and covariate columns in batch_col/categorical_cols/"
                "continuous_cols, or drop them"
            )
        if all(isinstance(c, str) for c in columns):
            names_in = columns
        names_out = [str(c) for c in features]
        n_features_in = len(columns)
        columns_in = list(columns)
        if meta:
            parts = dask.compute(*X[meta].to_delayed())
            small = pd.concat(parts, ignore_index=True)
            lengths = [len(p) for p in parts]
            batch, covariates = small[combat.batch_col], small[roles.covariates]
        else:
            lengths = list(dask.compute(*[dask.delayed(len)(p) for p in X.to_delayed()]))
        blocks = [[part] for part in X[features].to_delayed()]
        column_names = [features]
    else:
        if combat.batch_col is not None:
            raise TypeError(
                f"batch_col={combat.batch_col!r} needs X as a DataFrame holding "
                "the site column; for a dask array pass the sites with batch= "
                "and batch_col=None"
            )
        if X.ndim != 2:
            raise ValueError(
                f"X must be a 2-D dask array (subjects x features); got {X.ndim} dimension(s)"
            )
        if any(np.isnan(c) for c in X.chunks[0]):
            raise ValueError("X has unknown row chunk sizes; call X.compute_chunk_sizes() first")
        check_not_bool(X)
        if X.dtype.kind not in "iuf":
            raise ValueError(f"X must be numeric; got dtype {X.dtype}")
        n_features_in = X.shape[1]
        columns_in = None
        lengths = list(X.chunks[0])
        blocks = X.to_delayed().tolist()
        starts = np.cumsum((0,) + X.chunks[1])
        column_names = [list(range(a, b)) for a, b in zip(starts[:-1], starts[1:])]
    n_samples = int(sum(lengths))
    if not n_samples:
        raise ValueError(
            "X has no rows (dask input): ComBat is fitted on the rows of at least two sites"
        )
    offsets = np.cumsum([0] + lengths)
    # sites and covariates checked once, with row numbers of the whole input; the blocks then
    # go through the keyword route of row_statistics (the site and covariate columns of a
    # DataFrame are already on the client)
    sites, frame = read_metadata(batch, covariates, n_samples, roles, route="dask")
    chunker = combat.with_fixed_knots(frame).set_params(batch_col=None)
    block_statistics = dask.delayed(_block_statistics, pure=True)
    merge = dask.delayed(statistics.merge_all, pure=True)
    per_column = []
    for j, names in enumerate(column_names):
        parts = [
            block_statistics(
                chunker,
                row[j],
                sites[offsets[i] : offsets[i + 1]],
                frame.iloc[offsets[i] : offsets[i + 1]],
                names,
            )
            for i, row in enumerate(blocks)
        ]
        while len(parts) > 1:  # a balanced tree of pairwise merges
            parts = [
                merge(parts[k : k + 2]) if k + 1 < len(parts) else parts[k]
                for k in range(0, len(parts), 2)
            ]
        per_column.append(parts[0])
    return combat.fit_from_statistics(
        statistics.join_features(dask.compute(*per_column)),
        n_features_in=n_features_in,
        feature_names_in=names_in,
        feature_names_out=names_out,
        columns_in=columns_in,
    )


def _block_statistics(chunker, block, sites, covariates, column_names):
    values = np.asarray(block.to_numpy() if isinstance(block, pd.DataFrame) else block)
    if values.shape[0] != len(sites):
        raise ValueError(
            f"a block of X has {values.shape[0]} rows where {len(sites)} were expected"
        )
    with np.errstate(all="ignore"):
        bad = np.flatnonzero(~np.isfinite(values.sum(axis=0)))
    bad = bad[~np.isfinite(values[:, bad]).all(axis=0)] if bad.size else bad
    if bad.size:
        raise ValueError(
            f"X has NaN or infinite values in feature column(s) "
            f"{[column_names[i] for i in bad[:10]]}; ComBat needs finite values "
            "(impute or drop them first)"
        )
    return chunker.row_statistics(values, batch=sites, covariates=covariates)


def transform(combat, X, batch, covariates):
    """Lazy harmonization of a dask array or DataFrame with a fitted ``combat``."""
    batch, covariates = gather_metadata(batch, covariates)
    if _is_dataframe(X):
        return _transform_dataframe(combat, X, batch, covariates)
    if combat.batch_col is not None:
        raise TypeError(
            f"batch_col={combat.batch_col!r} needs X as a DataFrame holding the "
            "site column; for a dask array fit with batch= and batch_col=None"
        )
    if X.ndim != 2 or X.shape[1] != combat.n_features_in_:
        raise ValueError(
            f"X has shape {X.shape}; CombatHarmonizer is expecting {combat.n_features_in_} features"
        )
    if any(np.isnan(c) for c in X.chunks[0]):
        raise ValueError("X has unknown row chunk sizes; call X.compute_chunk_sizes() first")
    # sites and covariates checked here, with row numbers of the whole input (a block's
    # check would count rows from the block's start)
    batch, covariates = read_metadata(
        batch, covariates, X.shape[0], ColumnRoles.of(combat), route="dask"
    )
    _check_seen(combat, batch)
    dtype = np.float32 if X.dtype == np.float32 else np.float64
    X = X.rechunk({1: -1})  # a whole row per block: the model is per feature, rows stay rows

    def harmonize_block(block, block_info=None):
        start, stop = block_info[0]["array-location"][0]
        return combat.transform(
            block,
            batch=batch[start:stop],
            covariates=None if covariates is None else covariates.iloc[start:stop],
        )

    return X.map_blocks(
        harmonize_block, dtype=dtype, chunks=(X.chunks[0], (len(combat.grand_mean_),))
    )


def _transform_dataframe(combat, X, batch, covariates):
    import dask

    names = list(combat.get_feature_names_out())
    meta = pd.DataFrame({name: pd.Series(dtype=np.float64) for name in names})
    if combat.batch_col is not None:
        if combat.batch_col not in X.columns:
            raise ValueError(
                f"column(s) {[combat.batch_col]} not found in X (columns: {list(X.columns)})"
            )

        def harmonize_partition(part):
            _check_seen(combat, part[combat.batch_col].to_numpy())
            return pd.DataFrame(combat.transform(part), columns=names, index=part.index)

        return X.map_partitions(harmonize_partition, meta=meta)
    lengths = dask.compute(*[dask.delayed(len)(p) for p in X.to_delayed()])
    offsets = np.cumsum((0,) + tuple(lengths))
    batch, covariates = read_metadata(
        batch, covariates, int(offsets[-1]), ColumnRoles.of(combat), route="dask"
    )
    _check_seen(combat, batch)

    def harmonize_partition(part, partition_info=None):
        i = partition_info["number"]
        rows = slice(offsets[i], offsets[i + 1])
        return pd.DataFrame(
            combat.transform(
                part,
                batch=batch[rows],
                covariates=None if covariates is None else covariates.iloc[rows],
            ),
            columns=names,
            index=part.index,
        )

    return X.map_partitions(harmonize_partition, meta=meta)


def _check_seen(combat, sites):
    unseen = pd.unique(sites[pd.Index(combat.batches_).get_indexer(sites) < 0])
    if len(unseen):
        raise ValueError(
            f"site(s) {format_labels(unseen)} were not seen in fit (fitted sites: "
            f"{format_labels(combat.batches_)}); a dask input is harmonized block by block, so "
            "new sites cannot be estimated from it (unseen_batch='adapt' needs the rows in "
            "memory: compute them first)"
        )
