"""ConnectomeExtractor: one vectorized connectome per subject from its 4D run, as a transformer.

Rows are subjects. Each row's run is cleaned and reduced to region time series by a masker
(:class:`~kwneuro_sk.LabelsMasker`, or any masker with nilearn's ``transform_imgs``) with that
row's own confounds and sample mask, and the time series become a connectome with nilearn's
:class:`~nilearn.connectome.ConnectivityMeasure`. What a connectivity kind learns (the tangent
reference) is learned in :meth:`ConnectomeExtractor.fit`, from the training rows only.
"""

from __future__ import annotations

import inspect
import os

import joblib
import numpy as np
import pandas as pd
from nibabel.spatialimages import SpatialImage
from nilearn.connectome import ConnectivityMeasure
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context, clone
from sklearn.utils._param_validation import HasMethods, StrOptions
from sklearn.utils.validation import check_is_fitted

from kwneuro_sk import images as _images
from kwneuro_sk._params import MEMORY, N_JOBS, check_memory
from kwneuro_sk.maskers.runs import check_volumes_left, read_confounds

KINDS = ("correlation", "partial correlation", "tangent", "covariance", "precision")

# Masker parameters that change neither the numbers nor their order: left out of the cache key.
_NOT_IN_KEY = {"memory", "memory_level", "n_jobs", "verbose", "reports"}


def _load_confounds_parameters():
    from nilearn.interfaces.fmriprep import load_confounds

    return sorted(set(inspect.signature(load_confounds).parameters) - {"img_files"})


class ConnectomeExtractor(TransformerMixin, BaseEstimator):
    """One vectorized connectome per subject, from its 4D run, its confounds and sample mask.

    ``X`` has one row per subject: a DataFrame with a column of 4D images (paths or nibabel
    images) and, optionally, a column of per-row confounds and a column of per-row sample
    masks; or a plain list of runs. Each run is cleaned and reduced to region time series by a
    clone of ``masker`` (``masker.transform_imgs`` with that row's confounds and sample mask),
    and the time series give a connectome with nilearn's
    :class:`~nilearn.connectome.ConnectivityMeasure` of the chosen ``kind``, vectorized (its
    lower triangle, row by row).

    The connectivity measure is fitted in :meth:`fit` on the rows given there only: the
    ``"tangent"`` reference (the geometric mean of the training covariances) never sees a test
    row inside cross-validation. The other kinds learn nothing (each subject's connectome
    depends only on its own run).

    Parameters
    ----------
    masker : LabelsMasker or nilearn masker
        Unfitted masker with a ``transform_imgs(imgs_list, confounds=None, n_jobs=1,
        sample_mask=None)`` method (:class:`~kwneuro_sk.LabelsMasker` or nilearn's
        ``MultiNiftiLabelsMasker``). It is cloned and fitted in :meth:`fit`; its parameters
        are this estimator's (``masker__low_pass``, ``masker__t_r``), so a grid search can
        tune the cleaning.
    kind : {"correlation", "partial correlation", "tangent", "covariance", "precision"}, \
            default="correlation"
        Connectivity kind, with nilearn's meaning.
    discard_diagonal : bool, default=True
        Leave the diagonal (a region with itself) out of the vectorized connectomes.
    cov_estimator : estimator, default=None
        Covariance estimator of :class:`~nilearn.connectome.ConnectivityMeasure` (cloned);
        ``None`` is nilearn's default (Ledoit-Wolf shrinkage).
    image_col : str, default="image"
        Column of ``X`` holding each row's 4D run, when ``X`` is a DataFrame.
    confounds_col : str, default=None
        Column holding each row's confounds: an array or DataFrame of shape
        (n_volumes, n_confounds), the path of a TSV table with a header row (an fMRIPrep
        ``*_desc-confounds_timeseries.tsv`` is read whole: choose columns with
        ``confounds_strategy`` instead), or None / NaN for no confounds.
    sample_mask_col : str, default=None
        Column holding each row's sample mask: the volumes to keep, as integer indices or a
        boolean mask of the run's length (scrubbing), or None / NaN to keep every volume.
    confounds_strategy : dict, default=None
        Keyword arguments of :func:`nilearn.interfaces.fmriprep.load_confounds` (e.g.
        ``{"strategy": ["motion", "wm_csf", "scrub"], "motion": "basic"}``). Each run must then
        be an fMRIPrep file path: its confounds file is found beside it, and the chosen
        columns and sample mask are used for that run. As a parameter it can be grid-searched.
        Not combined with ``confounds_col`` or ``sample_mask_col``.
    remainder : {"drop", "passthrough"}, default="drop"
        What becomes of the other columns of a DataFrame ``X`` (site, age, ...), as in
        :class:`~sklearn.compose.ColumnTransformer`: dropped, or kept after the connectome
        columns. With ``"passthrough"``, :meth:`transform` returns a DataFrame (the columns keep
        their types, so a site column can reach ``CombatHarmonizer(batch_col="site")``).
    memory : str, os.PathLike or joblib.Memory, default=None
        Cache of each run's cleaned time series, keyed on the run file's content (its bytes
        are read and hashed, not decompressed), the masker's parameters and atlas content, and
        that run's confounds and sample mask. Cross-validation folds and grid-search candidates
        that share them then extract each run once: a grid over three
        ``confounds_strategy`` values reads each run three times in all, not once per fold.
        The fitted connectivity measure (e.g. the tangent reference) is cached too, keyed on
        its parameters and the training runs' keys, so a refit on the same runs computes
        nothing. ``None`` disables caching.
    n_jobs : int, default=None
        Number of runs extracted at the same time (passed to ``transform_imgs``; threads
        through joblib for cached runs).

    Attributes
    ----------
    masker_ : masker
        The fitted clone of ``masker``.
    connectivity_measure_ : nilearn.connectome.ConnectivityMeasure
        Fitted on the rows given to :meth:`fit`; for ``kind="tangent"`` its ``mean_`` is the
        reference.
    region_names_ : ndarray of str
        Region names of the masker's output, in column order.
    n_features_in_ : int
        Number of columns of the ``X`` seen in :meth:`fit` (1 for a list of runs).
    feature_names_in_ : ndarray of str
        Column names of ``X`` in :meth:`fit`, when it was a DataFrame.

    See Also
    --------
    nilearn.connectome.ConnectivityMeasure : The connectivity measure used.
    kwneuro_sk.fmriprep_cohort : A table of runs, confounds and participants from fMRIPrep.

    Examples
    --------
    >>> import numpy as np, nibabel as nib, pandas as pd
    >>> from kwneuro_sk import ConnectomeExtractor, LabelsMasker
    >>> atlas = np.zeros((3, 2, 2), dtype=np.int16)
    >>> atlas[0], atlas[1], atlas[2] = 1, 2, 3
    >>> atlas_img = nib.Nifti1Image(atlas, np.eye(4))
    >>> rng = np.random.default_rng(0)
    >>> runs = [nib.Nifti1Image(rng.normal(size=(3, 2, 2, 30)), np.eye(4)) for _ in range(4)]
    >>> X = pd.DataFrame({"image": runs, "site": ["a", "a", "b", "b"]})
    >>> extractor = ConnectomeExtractor(
    ...     LabelsMasker(atlas_img, labels=["V1", "M1", "PFC"]), remainder="passthrough")
    >>> out = extractor.fit_transform(X)
    >>> list(out.columns)
    ['V1--M1', 'V1--PFC', 'M1--PFC', 'site']
    >>> out.shape
    (4, 4)
    """

    _parameter_constraints: dict = {
        "masker": [HasMethods(["fit", "transform_imgs"])],
        "kind": [StrOptions(set(KINDS))],
        "discard_diagonal": ["boolean"],
        "cov_estimator": [HasMethods(["fit"]), None],
        "image_col": [str],
        "confounds_col": [str, None],
        "sample_mask_col": [str, None],
        "confounds_strategy": [dict, None],
        "remainder": [StrOptions({"drop", "passthrough"})],
        "memory": MEMORY,
        "n_jobs": N_JOBS,
    }

    def __init__(
        self,
        masker,
        kind="correlation",
        discard_diagonal=True,
        *,
        cov_estimator=None,
        image_col="image",
        confounds_col=None,
        sample_mask_col=None,
        confounds_strategy=None,
        remainder="drop",
        memory=None,
        n_jobs=None,
    ):
        self.masker = masker
        self.kind = kind
        self.discard_diagonal = discard_diagonal
        self.cov_estimator = cov_estimator
        self.image_col = image_col
        self.confounds_col = confounds_col
        self.sample_mask_col = sample_mask_col
        self.confounds_strategy = confounds_strategy
        self.remainder = remainder
        self.memory = memory
        self.n_jobs = n_jobs

    # ------------------------------------------------------------------ fit
    @_fit_context(prefer_skip_nested_validation=False)
    def fit(self, X, y=None):
        """Fit the masker (atlas only) and the connectivity measure on the rows of ``X``.

        Parameters
        ----------
        X : pandas.DataFrame or list of images
            One row (run) per subject; see the class description.
        y : None
            Ignored.

        Returns
        -------
        self : ConnectomeExtractor
            The fitted extractor.
        """
        _, series = self._fit(X)
        self._fit_measure(series)
        return self

    @_fit_context(prefer_skip_nested_validation=False)
    def fit_transform(self, X, y=None):
        """Fit on ``X`` and return its connectomes, extracting each run once.

        Parameters
        ----------
        X : pandas.DataFrame or list of images
            One row (run) per subject.
        y : None
            Ignored.

        Returns
        -------
        connectomes : ndarray of shape (n_subjects, n_connections) or pandas.DataFrame
            As :meth:`transform`.
        """
        runs, series = self._fit(X)
        return self._output(runs, self._fit_measure(series))

    def _fit_measure(self, series):
        """Fit the connectivity measure on the training series and return their connectomes;
        with ``memory``, the fitted measure is cached on the runs' keys and its parameters, so
        refitting on the same runs (a later fit, a repeated grid candidate) computes nothing."""
        memory = self._memory()
        if memory is None:
            return self.connectivity_measure_.fit_transform(series)
        key = (joblib.hash(self.connectivity_measure_.get_params()), tuple(self._run_keys))
        fitted = memory.cache(_fitted_measure, ignore=["measure", "series"])
        self.connectivity_measure_, connectomes = fitted(key, self.connectivity_measure_, series)
        return connectomes

    def _fit(self, X):
        self._check_options()
        runs = self._runs(X, fitting=True)
        if self.kind == "tangent" and len(runs.images) < 2:
            raise ValueError(
                "kind='tangent' learns the group mean of the training connectomes: fit needs "
                f"at least 2 runs, got {len(runs.images)}."
            )
        self.masker_ = clone(self.masker).fit()
        self._masker_token = _masker_token(self.masker_) if self._memory() is not None else None
        series, self._run_keys = self._series_and_keys(runs)
        n_regions = series[0].shape[1]
        names = _region_names(self.masker_, n_regions)
        self.region_names_ = names
        rows, cols = _vector_pairs(n_regions, self.discard_diagonal)
        self._connection_names = np.array(
            [f"{names[j]}--{names[i]}" for i, j in zip(rows, cols)], dtype=object
        )
        clash = sorted(set(self._connection_names) & set(runs.remainder_columns))
        if clash:
            raise ValueError(
                f"remainder column(s) {clash} have the name of a connection; rename them."
            )
        self.connectivity_measure_ = ConnectivityMeasure(
            cov_estimator=None if self.cov_estimator is None else clone(self.cov_estimator),
            kind=self.kind,
            vectorize=True,
            discard_diagonal=self.discard_diagonal,
        )
        return runs, series

    def _check_options(self):
        strategy = self.confounds_strategy
        if strategy is None:
            return
        given = [c for c in ("confounds_col", "sample_mask_col") if getattr(self, c) is not None]
        if given:
            raise ValueError(
                f"confounds_strategy and {given[0]}={getattr(self, given[0])!r} both give the "
                "runs' confounds; use one of them."
            )
        accepted = _load_confounds_parameters()
        unknown = sorted(set(strategy) - set(accepted))
        if unknown:
            raise ValueError(
                f"confounds_strategy has key(s) {unknown} that "
                f"nilearn.interfaces.fmriprep.load_confounds does not take; it takes {accepted}."
            )

    # ------------------------------------------------------------ transform
    def transform(self, X):
        """Connectomes of the rows of ``X``, with the masker and measure fitted in :meth:`fit`.

        Parameters
        ----------
        X : pandas.DataFrame or list of images
            One row (run) per subject, with the columns of the ``X`` given to :meth:`fit`.

        Returns
        -------
        connectomes : ndarray of shape (n_subjects, n_connections) or pandas.DataFrame
            float64 vectorized connectomes; with ``remainder="passthrough"`` a DataFrame with
            the other columns of ``X`` after them (same index as ``X``).
        """
        check_is_fitted(self)
        runs = self._runs(X, fitting=False)
        return self._output(runs, self.connectivity_measure_.transform(self._series(runs)))

    def get_feature_names_out(self, input_features=None):
        """Names of the output columns: ``"<region a>--<region b>"`` per connection, then the
        passed-through columns.

        Parameters
        ----------
        input_features : None
            Ignored.

        Returns
        -------
        feature_names_out : ndarray of str objects
        """
        check_is_fitted(self)
        return np.concatenate(
            [self._connection_names, np.asarray(self._remainder_columns, dtype=object)]
        )

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        tags.requires_fit = True
        return tags

    # ------------------------------------------------------------ internals
    def _output(self, runs, connectomes):
        if self.remainder == "drop":
            return connectomes
        frame = pd.DataFrame(connectomes, columns=self._connection_names, index=runs.index)
        if runs.remainder is None:
            return frame
        return pd.concat([frame, runs.remainder], axis=1)

    def _runs(self, X, *, fitting):
        """The runs of ``X`` with their names, confounds, sample masks and other columns."""
        used = [self.image_col, self.confounds_col, self.sample_mask_col]
        if isinstance(X, pd.DataFrame):
            missing = [c for c in used if c is not None and c not in X.columns]
            if missing:
                raise ValueError(
                    f"X has no column {missing[0]!r} (columns: {list(X.columns)[:10]}); "
                    "set image_col / confounds_col / sample_mask_col to the columns that hold "
                    "the runs, their confounds and sample masks."
                )
            images = X[self.image_col].tolist()
            index = X.index
            confounds = _cells(X, self.confounds_col)
            masks = _cells(X, self.sample_mask_col)
            others = [c for c in X.columns if c not in used]
            remainder = X[others] if self.remainder == "passthrough" and others else None
            columns = list(X.columns)
        else:
            given = [c for c in ("confounds_col", "sample_mask_col") if getattr(self, c)]
            if given:
                raise ValueError(
                    f"{given[0]}={getattr(self, given[0])!r} names a column, but X is a "
                    f"{type(X).__name__}, not a DataFrame; pass a DataFrame with the runs in "
                    f"column {self.image_col!r}."
                )
            images = _images.as_image_list(X)
            index = pd.RangeIndex(len(images))
            confounds = masks = [None] * len(images)
            remainder, others, columns = None, [], None
        if not images:
            raise ValueError("X has no row: the extractor needs at least one run.")
        names = [
            f"row {label!r} ({_images.describe(img, i)})"
            for i, (label, img) in enumerate(zip(index, images))
        ]
        if fitting:
            if columns is not None:
                self.feature_names_in_ = np.asarray(columns, dtype=object)
                self.n_features_in_ = len(columns)
            else:
                self.n_features_in_ = 1
                if hasattr(self, "feature_names_in_"):
                    del self.feature_names_in_
            self._remainder_columns = others if self.remainder == "passthrough" else []
        elif self.remainder == "passthrough" and others != self._remainder_columns:
            raise ValueError(
                f"X has the other columns {others} but the extractor was fitted with "
                f"{self._remainder_columns}; with remainder='passthrough' they must match."
            )
        if self.confounds_strategy is not None:
            for img, name in zip(images, names):
                _fmriprep_run_path(img, name)  # a path, the file exists
        confounds = [read_confounds(c, run=name) for c, name in zip(confounds, names)]
        masks = [None if m is None else np.asarray(m) for m in masks]
        return _Runs(images, confounds, masks, names, index, remainder, others)

    def _memory(self):
        memory = check_memory(self.memory)
        return None if memory.location is None else memory

    def _series(self, runs):
        """Cleaned (n_kept_volumes, n_regions) time series of every run."""
        return self._series_and_keys(runs)[0]

    def _series_and_keys(self, runs):
        """The series of :meth:`_series` and each run's cache key (None without memory)."""
        strategy = self.confounds_strategy
        memory = self._memory()
        if memory is None:
            confounds, masks = runs.confounds, runs.masks
            if strategy is not None:
                confounds, masks = zip(
                    *(
                        _fmriprep_confounds(img, name, strategy)
                        for img, name in zip(runs.images, runs.names)
                    )
                )
            series = _extract(
                self.masker_, runs.images, list(confounds), list(masks), runs.names, self.n_jobs
            )
            return _check_volumes(series, runs.names), None
        cached = memory.cache(
            _cached_series, ignore=["masker", "image", "confounds", "mask", "name", "strategy"]
        )

        def key(img, conf, mask, name):
            if strategy is None:
                options = (_array_token(conf), _array_token(mask))
            else:  # the strategy and the content of the run's confounds files
                options = ("fmriprep", joblib.hash(strategy), _confounds_files_token(img, name))
            return self._masker_token, _image_token(img, name), options

        keys = [
            key(img, conf, mask, name)
            for img, conf, mask, name in zip(runs.images, runs.confounds, runs.masks, runs.names)
        ]
        tasks = (
            joblib.delayed(cached)(k, self.masker_, img, conf, mask, name, strategy)
            for k, img, conf, mask, name in zip(
                keys, runs.images, runs.confounds, runs.masks, runs.names
            )
        )
        series = list(joblib.Parallel(n_jobs=self.n_jobs, prefer="threads")(tasks))
        return _check_volumes(series, runs.names), keys


class _Runs:
    """The parsed rows of X."""

    def __init__(self, images, confounds, masks, names, index, remainder, remainder_columns):
        self.images, self.confounds, self.masks, self.names = images, confounds, masks, names
        self.index, self.remainder, self.remainder_columns = index, remainder, remainder_columns


def _cells(frame, column):
    """A column's cells as a list, missing values (None/NaN) as None."""
    if column is None:
        return [None] * len(frame)
    return [None if _is_missing(v) else v for v in frame[column].tolist()]


def _is_missing(value):
    """None, NaN, pd.NA or NaT: a cell left empty (arrays, tables and paths are not)."""
    return value is None or (pd.api.types.is_scalar(value) and bool(pd.isna(value)))


def _fmriprep_run_path(img, name):
    """The path of a run whose confounds ``confounds_strategy`` finds beside it."""
    if not isinstance(img, (str, os.PathLike)):
        raise ValueError(
            f"confounds_strategy finds each run's fMRIPrep confounds file beside the run, "
            f"but {name} is not a file path."
        )
    path = os.fspath(img)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"run file of {name} not found: {path!r}")
    return path


def _fmriprep_confounds(img, name, strategy):
    """Confounds table and sample mask of one run from its fMRIPrep confounds file."""
    from nilearn.interfaces.fmriprep import load_confounds

    path = _fmriprep_run_path(img, name)
    try:
        return load_confounds(path, **strategy)
    except ValueError as error:
        if "Could not find associated confound file" in str(error):
            raise FileNotFoundError(
                f"no fMRIPrep confounds file (*_desc-confounds_timeseries.tsv) beside "
                f"{name}: nilearn.interfaces.fmriprep.load_confounds found none."
            ) from None
        raise ValueError(f"confounds_strategy on {name}: {error}") from None
    except Exception as error:
        # nilearn's MissingConfoundError: a column the strategy needs is not in the table
        raise ValueError(f"confounds_strategy on {name}: {error}") from None


def _confounds_files_token(img, name):
    """A key of the fMRIPrep confounds files beside a run (names and content): every
    ``*_desc-confounds_*`` file of the run's folder, so a rewritten table is a cache miss."""
    path = _fmriprep_run_path(img, name)
    folder = os.path.dirname(os.path.abspath(path))
    files = sorted(f for f in os.listdir(folder) if "_desc-confounds_" in f)
    if not any(f.endswith(".tsv") for f in files):
        raise FileNotFoundError(
            f"no fMRIPrep confounds file (*_desc-confounds_timeseries.tsv) beside {name} in "
            f"{folder!r}."
        )
    return [(f, _file_token(os.path.join(folder, f), f"confounds of {name}")) for f in files]


def _extract(masker, images, confounds, masks, names, n_jobs):
    n_jobs = 1 if n_jobs is None else n_jobs  # transform_imgs' own default when unset
    try:
        return masker.transform_imgs(images, confounds=confounds, sample_mask=masks, n_jobs=n_jobs)
    except (ValueError, FileNotFoundError) as error:
        if len(images) == 1:
            raise type(error)(f"{names[0]}: {error}") from None
        raise


def _check_volumes(series, names):
    """Refuse a run left with fewer than two volumes: the correlation (or covariance) of one
    time point is undefined, and the measure would give its connections as NaN."""
    for values, name in zip(series, names):
        check_volumes_left(
            values.shape[0],
            2,
            run=name,
            needs="a connectome",
            why="a 3D image or a 4D run of one volume, or a scrubbing that kept one",
        )
    return series


def _cached_series(key, masker, image, confounds, mask, name, strategy):
    """One run's cleaned time series; only ``key`` is hashed by the cache."""
    if strategy is not None:
        confounds, mask = _fmriprep_confounds(image, name, strategy)
    return _extract(masker, [image], [confounds], [mask], [name], 1)[0]


def _fitted_measure(key, measure, series):
    """A connectivity measure fitted on ``series`` and their connectomes; only ``key`` (the
    measure's parameters and the runs' keys) is hashed by the cache."""
    connectomes = measure.fit_transform(series)
    return measure, connectomes


def _region_names(masker, n_regions):
    try:
        names = np.asarray(masker.get_feature_names_out(), dtype=object)
    except (AttributeError, ValueError, TypeError):
        names = None
    if names is None or names.shape != (n_regions,):
        names = np.array([f"region{i}" for i in range(n_regions)], dtype=object)
    return np.array([str(n) for n in names], dtype=object)


def _vector_pairs(n_regions, discard_diagonal):
    """(row, column) of each entry of nilearn's vectorized connectome, in its order."""
    # nilearn's sym_matrix_to_vec keeps the lower triangle with a boolean mask: row-major,
    # the order np.tril_indices gives.
    return np.tril_indices(n_regions, k=-1 if discard_diagonal else 0)


def _file_token(path, name):
    """SHA-256 of a file's bytes (read, not decompressed), once per process per file version
    (:func:`kwneuro_sk.images.file_digest`)."""
    return _images.file_digest(path, name=name, keep_bytes=False)[0]


def _image_token(img, name):
    """A key of a run's content: its file's bytes (not decoded), or an image's voxels."""
    if isinstance(img, (str, os.PathLike)):
        path = os.fspath(img)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"run file of {name} not found: {path!r}")
        return "file", _file_token(path, f"run of {name}")
    return _voxels_token(_images.load_image(img, name=name))


def _voxels_token(img):
    """A key of an in-memory image's content: its voxels and affine."""
    return "image", joblib.hash((np.asarray(img.dataobj), np.asarray(img.affine)))


def _array_token(values):
    return None if values is None else joblib.hash(np.asarray(values))


def _masker_token(masker):
    """A key of the masker's parameters, with atlas and mask files keyed on their content."""
    params = {}
    for name, value in masker.get_params(deep=False).items():
        if name in _NOT_IN_KEY:
            continue
        if isinstance(value, (str, os.PathLike)) and os.path.isfile(os.fspath(value)):
            value = ("file", _file_token(os.fspath(value), f"masker {name}"))
        elif isinstance(value, SpatialImage):
            value = _voxels_token(value)
        params[name] = value
    return type(masker).__module__, type(masker).__qualname__, joblib.hash(params)
