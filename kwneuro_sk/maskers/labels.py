"""LabelsMasker: one row of region values per subject image, as a scikit-learn transformer."""

from __future__ import annotations

import inspect
import os
import sys
import threading
import warnings
from numbers import Integral, Real

import joblib
import nibabel as nib
import nilearn
import numpy as np
import pandas as pd
from nibabel.spatialimages import SpatialImage
from nilearn.image import high_variance_confounds as _nilearn_hv_confounds
from nilearn.image import mean_img
from nilearn.signal import butterworth as _butterworth
from nilearn.signal import clean
from nilearn.signal import high_variance_confounds as _hv_confounds_of_series
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.utils._param_validation import (
    Interval,
    StrOptions,
    validate_parameter_constraints,
)
from sklearn.utils.fixes import parse_version
from sklearn.utils.validation import check_is_fitted

from kwneuro_sk import images as _images
from kwneuro_sk._params import MEMORY, N_JOBS, check_memory
from kwneuro_sk.maskers._lut import format_label, region_names, unique_names
from kwneuro_sk.maskers._reduce import STRATEGIES, build_plan, gather, reduce_regions
from kwneuro_sk.maskers.runs import (
    check_confounds_length,
    check_volumes_left,
    per_run,
    read_confounds,
    read_sample_mask,
)

# "Do not standardize" in nilearn.signal.clean: None since nilearn 0.13 (False deprecated there),
# only False before.
_NO_STANDARDIZE = None if parse_version(nilearn.__version__) >= parse_version("0.13") else False

# What clean_args may set: nilearn.signal.clean's own options, and butterworth's as
# butterworth__<option> (clean passes those on; any other key it ignores without a word).
_CLEAN_OPTIONS = [name for name in inspect.signature(clean).parameters if name != "kwargs"]
_CLEAN_OPTIONS += [
    f"butterworth__{name}"
    for name in inspect.signature(_butterworth).parameters
    if name not in ("signals", "sampling_rate", "low_pass", "high_pass")
]

# Options of nilearn.image.high_variance_confounds a dict high_variance_confounds may set,
# with nilearn's defaults.
_HV_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(_nilearn_hv_confounds).parameters.items()
    if name not in ("imgs", "mask_img")
}


class LabelsMasker(TransformerMixin, BaseEstimator):
    """Extract one value per atlas region from each subject image.

    Modelled on nilearn's :class:`~nilearn.maskers.NiftiLabelsMasker`, but built for
    scikit-learn: ``X`` is a collection of 3D images, one per subject, and :meth:`transform`
    returns an ``(n_images, n_regions)`` array whose columns are fixed at :meth:`fit`.

    - :meth:`fit` reads only ``labels_img`` and ``mask_img``, never the subject images.
    - :meth:`transform` streams the images one at a time (memory does not grow with the number
      of subjects) and reads each file exactly once. The reduction is vectorized over the
      labelled voxels, using a voxel order precomputed once per grid.
    - A region with no voxel in an image (removed by resampling, or all NaN) gives NaN in that
      row. NaN voxels are ignored by every strategy (nilearn replaces them with 0).
    - With ``smoothing_fwhm``, nilearn smooths with NaN voxels set to 0; the voxels that were NaN
      stay NaN (ignored) after smoothing.

    Parameters
    ----------
    labels_img : str, os.PathLike or nibabel image
        3D atlas: each voxel holds the integer label of its region.
    labels : list of str, pandas.DataFrame, str or os.PathLike, default=None
        Region names. A list gives one name per region in increasing label order, optionally
        preceded by the background's name (as nilearn atlases do). A DataFrame or the path of a
        TSV file is a look-up table with columns ``index`` (label value) and ``name``.
        ``None`` names the regions by their label values.
    background_label : float, default=0
        Label value that is not a region.
    mask_img : str, os.PathLike or nibabel image, default=None
        Only voxels inside this mask are used; regions entirely outside it are dropped at fit
        (with a warning).
    smoothing_fwhm : float, default=None
        Full width at half maximum (mm) of a Gaussian smoothing applied to each image before
        extraction, with :func:`nilearn.image.smooth_img`.
    resampling_target : {"data", "labels"} or None, default="data"
        - ``"data"``: the atlas (and mask) are resampled to each image's grid with nearest
          neighbour interpolation; the result is cached per grid.
        - ``"labels"``: images are resampled to the atlas grid (continuous interpolation).
        - ``None``: an image on another grid than the atlas raises a ValueError.
    strategy : {"mean", "median", "sum", "minimum", "maximum", "variance", \
            "standard_deviation"}, default="mean"
        How the voxels of a region are summarized. Variance is the population variance, as in
        nilearn (``scipy.ndimage.variance``).
    memory : str, os.PathLike or joblib.Memory, default=None
        Cache of per-image results (3D images and 4D runs), for images given as paths. The key
        holds a SHA-256 of the file's content (the compressed bytes: no decompression is
        needed to find a cached result, and on a miss the bytes hashed are the bytes decoded),
        the spatial parameters and the fitted atlas. The digest is remembered in the cache
        folder under the file's inode, size and modification and change times, so a later
        call does not even read an unchanged file; any write to a file moves its change time
        (which cannot be set back), so a file rewritten in place (even with the same size and
        a restored modification time) or a re-pointed symlink is recomputed, and a renamed or
        copied file is hashed again and found. For 4D runs the cache holds the region time
        series before cleaning (and the high-variance confounds when asked for); cleaning,
        confounds, sample masks and ``dtype`` are applied after it on every call, so changing
        them never reads a run again. ``None`` disables caching.
    n_jobs : int, default=None
        Number of images processed at the same time. Every image goes through
        :class:`joblib.Parallel` (threads by default: reading and reducing release the GIL), so
        a ``with joblib.parallel_config(backend=..., n_jobs=...)`` block chooses the backend
        (threads, processes, a dask cluster). ``None`` means 1 unless a
        :func:`joblib.parallel_config` context sets ``n_jobs``; ``-1`` uses all cores. With one
        job the images are processed one after the other in this thread, with no pool.
    verbose : int, default=0
        Print progress to stderr when positive.
    standardize : {"zscore_sample", "psc"}, bool or None, default=None
        Standardization of each region's time series, as in :func:`nilearn.signal.clean`.
        ``None`` (or False) does not standardize.
    standardize_confounds : bool, default=True
        Z-score the confounds before regressing them out, as in :func:`nilearn.signal.clean`.
    detrend : bool, default=False
        Remove the linear trend of each region's time series.
    low_pass : float, default=None
        Low-pass cutoff frequency in Hz (needs ``t_r``).
    high_pass : float, default=None
        High-pass cutoff frequency in Hz (needs ``t_r``).
    t_r : float, default=None
        Repetition time in seconds (sampling period of the volumes).
    clean_args : dict, default=None
        Further keyword arguments of :func:`nilearn.signal.clean` (e.g. ``{"filter":
        "cosine"}``, ``butterworth__`` options). ``sample_mask`` and ``confounds`` belong to
        one run each and are refused here (give them to :meth:`transform_imgs`), and so is a
        key ``clean`` does not take (nilearn ignores it without a word). The older
        nilearn spelling ``LabelsMasker(..., clean__filter="cosine")`` is accepted too and
        means ``clean_args={"filter": "cosine"}`` (with a FutureWarning).
    high_variance_confounds : bool or dict, default=False
        nilearn's meaning: with True, the confounds of
        :func:`nilearn.image.high_variance_confounds` with its defaults (5 components from
        the 2% of voxels of highest variance of the whole image, after detrending) are
        computed from each run and regressed out with its other confounds. A dict sets that
        function's options by their nilearn names, ``n_confounds``, ``percentile`` and
        ``detrend`` (e.g. ``{"n_confounds": 10, "percentile": 5.0}``). They are computed from
        the voxels already read for extraction (each run is still read once).
    dtype : dtype-like, "auto" or None, default=None
        nilearn's meaning: data type of the returned signals. ``None`` keeps float64;
        ``"auto"`` gives int32 for images of an integer type and float32 otherwise (an image
        whose header scales its values counts as float); a type casts to it. ``bool`` is
        refused, and so is an integer type that cannot hold a signal (NaN, or beyond its
        range: nilearn's cast wraps it round).
    memory_level : int, default=1
        nilearn's meaning: 0 disables the ``memory`` cache, 1 or more caches each image's
        region signals (the one level of caching this masker has).
    reports : bool, default=True
        Keep what :meth:`generate_report` needs: with True, :meth:`fit` remembers the first
        image it was given (its mean over time is the background of the report's figure;
        it is read only when the report is made, never in :meth:`fit`).
    cmap : str or matplotlib colormap, default="CMRmap_r"
        Colormap of the report's background image.
    lut : pandas.DataFrame, str or os.PathLike, default=None
        nilearn's look-up table: a table (or TSV file) with columns ``index`` (label value)
        and ``name``. The same as passing it as ``labels``; give one of ``labels`` and
        ``lut``, not both.

        The signal-cleaning parameters (``standardize`` to ``clean_args``) have nilearn's
        meaning and defaults. They apply along the time axis of 4D images, in
        :meth:`transform_imgs`. :meth:`transform` gives one row per subject from 3D images,
        which have no time axis; it raises a ValueError when cleaning is asked for rather than
        cleaning across subjects.

    Attributes
    ----------
    n_elements_ : int
        Number of output columns (regions).
    region_ids_ : dict
        nilearn's meaning: ``{"background": background_label, 0: id_0, 1: id_1, ...}``, the
        label value of each output column by position. (Before 0.2 this was an array of the
        label values; ``list(region_ids_.values())[1:]`` gives it.)
    region_names_ : dict
        nilearn's meaning: ``{0: name_0, 1: name_1, ...}``, the unique name of each output
        column by position (see ``labels``); ``get_feature_names_out()`` gives them as an
        array. (Before 0.2 this was an array.)
    labels_ : list
        The background label followed by the label value of every output column.
    labels_img_ : nibabel.Nifti1Image
        In-memory copy of the atlas, on its own grid (nilearn resamples it to the images given
        to ``fit``; here it is resampled per image grid when images are read).
    mask_img_ : nibabel.Nifti1Image or None
        In-memory copy of the mask, on its own grid.
    clean_args_ : dict
        The checked ``clean_args`` (``clean__`` keywords included) passed to
        :func:`nilearn.signal.clean`.
    lut_ : pandas.DataFrame
        nilearn's look-up table of the output: columns ``index`` (label value) and ``name``,
        the background first, then one row per output column.
    memory_ : joblib.Memory
        The cache (``Memory(location=None)`` when ``memory`` is None).

    See Also
    --------
    nilearn.maskers.NiftiLabelsMasker : The nilearn masker this one is modelled on.

    Examples
    --------
    >>> import numpy as np
    >>> import nibabel as nib
    >>> from kwneuro_sk import LabelsMasker
    >>> atlas = np.zeros((4, 4, 4), dtype=np.int16)
    >>> atlas[:2], atlas[2:] = 1, 2
    >>> atlas_img = nib.Nifti1Image(atlas, np.eye(4))
    >>> imgs = [nib.Nifti1Image(np.full((4, 4, 4), v, dtype=np.float32), np.eye(4))
    ...         for v in (1.0, 2.0, 3.0)]
    >>> masker = LabelsMasker(atlas_img, labels=["left", "right"])
    >>> masker.fit_transform(imgs)
    array([[1., 1.],
           [2., 2.],
           [3., 3.]])
    >>> masker.get_feature_names_out()
    array(['left', 'right'], dtype=object)
    """

    _parameter_constraints: dict = {
        "labels_img": [str, os.PathLike, SpatialImage],
        "labels": ["array-like", str, os.PathLike, None],
        "background_label": [Real],
        "mask_img": [str, os.PathLike, SpatialImage, None],
        "smoothing_fwhm": [Interval(Real, 0, None, closed="left"), None],
        "resampling_target": [StrOptions({"data", "labels"}), None],
        "strategy": [StrOptions(set(STRATEGIES))],
        "memory": MEMORY,
        "n_jobs": N_JOBS,
        "verbose": ["verbose"],
        "standardize": [StrOptions({"zscore_sample", "psc"}), "boolean", None],
        "standardize_confounds": ["boolean"],
        "detrend": ["boolean"],
        "low_pass": [Interval(Real, 0, None, closed="neither"), None],
        "high_pass": [Interval(Real, 0, None, closed="neither"), None],
        "t_r": [Interval(Real, 0, None, closed="neither"), None],
        "clean_args": [dict, None],
        "high_variance_confounds": ["boolean", dict],
        "dtype": "no_validation",  # checked in fit: a NumPy dtype, "auto" or None
        "memory_level": [Interval(Integral, 0, None, closed="left")],
        "reports": ["boolean"],
        "cmap": "no_validation",  # any matplotlib colormap or its name
        "lut": [pd.DataFrame, str, os.PathLike, None],
    }

    def __init__(
        self,
        labels_img,
        labels=None,
        background_label=0,
        mask_img=None,
        smoothing_fwhm=None,
        resampling_target="data",
        strategy="mean",
        memory=None,
        n_jobs=None,
        verbose=0,
        *,
        standardize=None,
        standardize_confounds=True,
        detrend=False,
        low_pass=None,
        high_pass=None,
        t_r=None,
        clean_args=None,
        high_variance_confounds=False,
        dtype=None,
        memory_level=1,
        reports=True,
        cmap="CMRmap_r",
        lut=None,
        **kwargs,
    ):
        clean_args = _merge_clean_keywords(clean_args, kwargs)
        self.labels_img = labels_img
        self.labels = labels
        self.background_label = background_label
        self.mask_img = mask_img
        self.smoothing_fwhm = smoothing_fwhm
        self.resampling_target = resampling_target
        self.strategy = strategy
        self.memory = memory
        self.n_jobs = n_jobs
        self.verbose = verbose
        self.standardize = standardize
        self.standardize_confounds = standardize_confounds
        self.detrend = detrend
        self.low_pass = low_pass
        self.high_pass = high_pass
        self.t_r = t_r
        self.clean_args = clean_args
        self.high_variance_confounds = high_variance_confounds
        self.dtype = dtype
        self.memory_level = memory_level
        self.reports = reports
        self.cmap = cmap
        self.lut = lut

    def set_params(self, **params):
        """Set parameters; nilearn's older ``clean__<option>`` keywords go into ``clean_args``.

        Parameters
        ----------
        **params : dict
            Estimator parameters.

        Returns
        -------
        self : LabelsMasker
        """
        keywords = {key: params.pop(key) for key in list(params) if key.startswith("clean__")}
        if keywords:
            if "clean_args" in params:  # both spellings in one call: they must not overlap
                base = params["clean_args"]
            else:  # the new values replace the current ones, as set_params does
                base = {
                    key: value
                    for key, value in (self.clean_args or {}).items()
                    if f"clean__{key}" not in keywords
                }
            params["clean_args"] = _merge_clean_keywords(base, keywords)
        return super().set_params(**params)

    # ------------------------------------------------------------------ fit
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X=None, y=None, *, imgs=None):
        """Read the atlas (and mask) and fix the output regions.

        The subject images are not read; ``X`` is only checked to be a collection of images
        (with ``reports=True`` its first image is remembered for :meth:`generate_report`).

        Parameters
        ----------
        X : image or list of images, optional
            3D images or 4D runs; not read.
        y : None
            Ignored.
        imgs : image or list of images, optional
            nilearn's name of ``X`` (``masker.fit(imgs=runs)``); give one of them.

        Returns
        -------
        self : LabelsMasker
            The fitted masker.
        """
        if imgs is not None:
            if X is not None:
                raise ValueError("fit got both X and imgs; they are the same argument.")
            X = imgs
        sources = [] if X is None else _images.as_image_list(X)
        self._check_dtype()
        self._check_hv_options()
        if self.labels is not None and self.lut is not None:
            raise ValueError(
                "Give either labels or lut (a look-up table), not both: they both name the regions."
            )
        self.clean_args_ = self._checked_clean_args()
        atlas_img = _images.load_image(self.labels_img, name="labels_img")
        atlas = np.array(_images.atlas_data(atlas_img, name="labels_img"))
        atlas_grid = _images.grid_of(atlas_img)
        self.labels_img_ = _images.as_nifti(atlas, atlas_grid[1])

        all_ids = _region_values(atlas, self.background_label)
        if all_ids.size == 0:
            raise ValueError(
                "labels_img has no region: every voxel equals background_label="
                f"{format_label(self.background_label)}."
            )
        names = region_names(
            self.labels if self.lut is None else self.lut,
            all_ids,
            has_background=bool(np.any(atlas == self.background_label)),
        )

        self.mask_img_, mask_on_atlas = self._load_mask(atlas_grid)
        region_ids = all_ids
        self._names_by_id = names
        self._dropped_by_mask = np.empty(0, dtype=all_ids.dtype)
        if mask_on_atlas is not None:
            kept = np.where(mask_on_atlas, atlas, self.background_label)
            region_ids = _region_values(kept, self.background_label)
            if region_ids.size == 0:
                raise ValueError("No region of labels_img is left inside mask_img.")
            dropped = np.setdiff1d(all_ids, region_ids)
            self._dropped_by_mask = dropped
            if dropped.size:
                warnings.warn(
                    f"mask_img removes {dropped.size} regions of labels_img entirely "
                    f"(label values {[format_label(v) for v in dropped[:10]]}); "
                    "they are not output columns.",
                    UserWarning,
                    stacklevel=2,
                )

        self._region_ids = region_ids
        self._region_names = unique_names([names[v] for v in region_ids.tolist()], region_ids)
        self.n_elements_ = int(region_ids.size)
        self.region_ids_ = {"background": _python_value(self.background_label)}
        self.region_ids_.update(enumerate(region_ids.tolist()))
        self.region_names_ = dict(enumerate(self._region_names.tolist()))
        self.labels_ = [_python_value(self.background_label), *region_ids.tolist()]
        self.lut_ = pd.DataFrame(
            {
                "index": self.labels_,
                "name": ["Background", *self._region_names.tolist()],
            }
        )
        self.memory_ = check_memory(self.memory)
        self._atlas_grid = atlas_grid
        self._plan_lock = threading.Lock()
        self._plans = {
            _images.grid_key(atlas_grid): build_plan(
                atlas.ravel(order="F"),
                region_ids,
                self.background_label,
                None if mask_on_atlas is None else mask_on_atlas.ravel(order="F"),
            )
        }
        mask_data = None if self.mask_img_ is None else self.mask_img_.dataobj
        self._atlas_token = joblib.hash(
            (atlas, atlas_grid[1], mask_data, self.background_label, region_ids)
        )
        self._report_source = sources[0] if self.reports and sources else None
        return self

    def _check_dtype(self):
        """``dtype``: None, "auto" or something ``numpy.dtype`` reads as a number type."""
        if self.dtype is None or (isinstance(self.dtype, str) and self.dtype == "auto"):
            return
        try:
            dtype = np.dtype(self.dtype)
        except TypeError:
            raise TypeError(
                f"dtype must be None, 'auto' or a NumPy number type, got {self.dtype!r}."
            ) from None
        if dtype.kind == "b":
            raise TypeError("dtype cannot be bool: region signals are numbers.")
        if dtype.kind not in "iuf":
            raise TypeError(f"dtype must be an integer or float type, got {dtype}.")

    def _cast(self, signals, target, names):
        """``signals`` (rows x regions) as ``target``; ``names`` names all the rows (a run) or
        each row (an image). An integer type that cannot hold a signal is refused: NumPy's
        cast (and nilearn's) would wrap it round, or make NaN an arbitrary integer."""
        if target.kind in "iu":
            info = np.iinfo(target)
            with np.errstate(invalid="ignore"):
                whole = np.trunc(signals)
                bad = ~np.isfinite(signals) | (whole < info.min) | (whole > info.max)
            if bad.any():
                row, column = np.argwhere(bad)[0]
                where = names if isinstance(names, str) else names[row]
                raise ValueError(
                    f"{where}: region {self.region_names_[column]!r} has signal "
                    f"{signals[row, column]:g}, which dtype={target} cannot hold (it holds "
                    f"whole numbers from {info.min} to {info.max}); use a float dtype or None."
                )
        return signals.astype(target)

    def _target_dtype(self, source_dtype):
        """nilearn's rule for the output type (None: keep float64)."""
        if self.dtype is None:
            return None
        if isinstance(self.dtype, str) and self.dtype == "auto":
            return np.dtype(np.int32 if np.dtype(source_dtype).kind == "i" else np.float32)
        return np.dtype(self.dtype)

    def _check_hv_options(self):
        """The options of nilearn.image.high_variance_confounds to use, or None when off."""
        option = self.high_variance_confounds
        if not isinstance(option, dict):
            return dict(_HV_DEFAULTS) if option else None
        unknown = sorted(set(option) - set(_HV_DEFAULTS))
        if unknown:
            raise ValueError(
                f"high_variance_confounds has unknown option(s) {unknown}; the options of "
                f"nilearn.image.high_variance_confounds are {list(_HV_DEFAULTS)}."
            )
        options = {**_HV_DEFAULTS, **option}
        n_confounds, percentile = options["n_confounds"], options["percentile"]
        if not _is_count(n_confounds):
            raise ValueError(
                f"high_variance_confounds['n_confounds'] must be a positive integer, got "
                f"{n_confounds!r}."
            )
        if not isinstance(percentile, Real) or not 0 < percentile <= 100:
            raise ValueError(
                f"high_variance_confounds['percentile'] must be in (0, 100], got {percentile!r}."
            )
        if not isinstance(options["detrend"], bool):  # nilearn takes a bool only
            raise TypeError(
                "high_variance_confounds['detrend'] must be True or False, got "
                f"{options['detrend']!r}."
            )
        return options

    def _load_mask(self, atlas_grid):
        """In-memory mask on its own grid, and the mask as booleans on the atlas grid."""
        if self.mask_img is None:
            return None, None
        mask_img = _images.load_image(self.mask_img, name="mask_img")
        mask = np.array(_images.atlas_data(mask_img, name="mask_img"))
        mask_img = _images.as_nifti(mask, mask_img.affine)
        mask_grid = _images.grid_of(mask_img)
        if _images.same_grid(mask_grid, atlas_grid):
            return mask_img, mask.astype(bool)
        if self.resampling_target is None:
            raise ValueError(
                f"mask_img has shape {mask_grid[0]} and affine\n{mask_grid[1]}\nbut labels_img "
                f"has shape {atlas_grid[0]} and affine\n{atlas_grid[1]}; with "
                "resampling_target=None they must be on the same grid."
            )
        resampled = _images.resample_to_grid(mask_img, atlas_grid, interpolation="nearest")
        return mask_img, np.asanyarray(resampled.dataobj).astype(bool)

    # ------------------------------------------------------------ transform
    def transform(self, X):
        """Extract the region values of each image.

        Parameters
        ----------
        X : image or list, tuple, 1-D array or pandas Series of images
            3D images (paths, ``os.PathLike`` or nibabel images), one per subject. 4D images
            with a single volume are treated as 3D.

        Returns
        -------
        signals : ndarray of shape (n_images, n_regions)
            float64 (or ``dtype``); NaN where a region has no (finite) voxel in an image.
        """
        check_is_fitted(self)
        cleaning = [name for name, value in self._cleaning_requested().items() if value]
        if cleaning:
            raise ValueError(
                f"{cleaning[0]}={getattr(self, cleaning[0])!r} cleans the time series of 4D "
                "images, with LabelsMasker.transform_imgs. transform gives one row per subject "
                "from 3D images, which have no time axis: it does not clean across subjects. "
                f"Leave {', '.join(cleaning)} at the default to use transform."
            )
        self._check_dtype()  # read now, as set_params may have changed it since fit
        sources = _images.as_image_list(X)
        if not sources:
            raise ValueError("X contains no images.")
        signals = np.empty((len(sources), self.n_elements_))
        targets = set()
        results = self._map(sources, allow_4d=False)
        for row, (image_signals, _, source_dtype) in enumerate(results):
            signals[row] = image_signals[0]
            targets.add(self._target_dtype(source_dtype))
        if targets == {None}:
            return signals
        names = [f"image {i} ({_images.describe(src, i)})" for i, src in enumerate(sources)]
        return self._cast(signals, np.result_type(*targets), names)

    def transform_imgs(
        self,
        imgs_list,
        confounds=None,
        n_jobs=1,
        sample_mask=None,
        *,
        detrend="deprecated",
        standardize="deprecated",
        standardize_confounds="deprecated",
        low_pass="deprecated",
        high_pass="deprecated",
        t_r="deprecated",
    ):
        """Extract region time series from 4D images (runs), with nilearn's signal cleaning.

        The counterpart of nilearn's ``MultiNiftiLabelsMasker.transform_imgs``, with its
        meaning: each run gives an ``(n_kept_volumes, n_regions)`` array, cleaned by
        :func:`nilearn.signal.clean` with the masker's ``standardize``,
        ``standardize_confounds``, ``detrend``, ``low_pass``, ``high_pass``, ``t_r`` and
        ``clean_args``, and with **that run's own** confounds and sample mask.

        Parameters
        ----------
        imgs_list : image or list of images
            4D (or 3D) images, paths or nibabel images; one per run.
        confounds : list or None, default=None
            One entry per run (``None`` for a run without confounds): an array or DataFrame of
            shape (n_volumes, n_confounds), the path of a TSV (or .csv) table with a header
            row (an fMRIPrep ``*_desc-confounds_timeseries.tsv``), or a list of those (joined
            column-wise). For a single run the entry may be given alone. Every table must have
            one row per volume of its run and no NaN (a ValueError names the run).
        n_jobs : int, default=1
            Number of runs read and reduced at the same time (nilearn's meaning: this call's
            value, not the masker's).
        sample_mask : list or None, default=None
            One entry per run (``None`` keeps every volume): the volumes to keep, as integer
            indices or a boolean mask of the run's length, passed to
            :func:`nilearn.signal.clean` (scrubbing). For a single run the entry may be given
            alone. With Butterworth filtering (``low_pass`` or ``high_pass``) a mask must keep
            at least two volumes (the removed ones are filled with a spline through the kept
            ones); otherwise one is enough.
        detrend, standardize, standardize_confounds, low_pass, high_pass, t_r
            Deprecated since 0.2, removed in 0.3: set them on the masker
            (``LabelsMasker(..., detrend=True)`` or ``masker.set_params(detrend=True)``),
            where they can be cloned and tuned. Given here, they override the masker's value
            for this call, with a FutureWarning.

        Returns
        -------
        signals : list of ndarray of shape (n_kept_volumes, n_regions)
            One array per run, float64 (or ``dtype``).
        """
        check_is_fitted(self)
        overrides = {
            name: value
            for name, value in dict(
                detrend=detrend,
                standardize=standardize,
                standardize_confounds=standardize_confounds,
                low_pass=low_pass,
                high_pass=high_pass,
                t_r=t_r,
            ).items()
            if not (isinstance(value, str) and value == "deprecated")
        }
        if overrides:
            warnings.warn(
                f"Passing {', '.join(overrides)} to transform_imgs is deprecated since "
                "kwneuro_sk 0.2 and will be removed in 0.3. Set them on the masker instead: "
                f"LabelsMasker(..., {next(iter(overrides))}=...) or masker.set_params(...).",
                FutureWarning,
                stacklevel=2,
            )
            validate_parameter_constraints(
                {name: self._parameter_constraints[name] for name in overrides},
                overrides,
                caller_name="LabelsMasker.transform_imgs",
            )
        validate_parameter_constraints(
            {"n_jobs": N_JOBS}, {"n_jobs": n_jobs}, caller_name="LabelsMasker.transform_imgs"
        )
        cleaning = {**self._clean_params(), **overrides}
        if cleaning["standardize"] is None:
            cleaning["standardize"] = _NO_STANDARDIZE
        clean_args = self._checked_clean_args()
        hv_options = self._check_hv_options()
        self._check_dtype()

        sources = _images.as_image_list(imgs_list, name="imgs_list")
        if not sources:
            raise ValueError(
                "imgs_list contains no images; transform_imgs needs at least one 4D run."
            )
        run_confounds = per_run(confounds, len(sources), name="confounds")
        run_masks = per_run(sample_mask, len(sources), name="sample_mask")
        kept_needed, needs, why = _volumes_to_keep(cleaning, clean_args)
        names = [f"run {i} ({_images.describe(src, i)})" for i, src in enumerate(sources)]
        # Tables are read (and a missing file reported) before any image is opened.
        run_confounds = [read_confounds(conf, run=name) for conf, name in zip(run_confounds, names)]
        outputs = []
        results = self._map(sources, allow_4d=True, n_jobs=n_jobs, hv_options=hv_options)
        for (signals, hv, source_dtype), conf, mask, name in zip(
            results, run_confounds, run_masks, names
        ):
            n_scans = signals.shape[0]
            check_confounds_length(conf, n_scans, run=name)
            mask = read_sample_mask(mask, n_scans, run=name)
            if mask is not None:
                check_volumes_left(mask.size, kept_needed, run=name, needs=needs, why=why)
            if hv is not None:
                conf = hv if conf is None else np.hstack([conf, hv])
            cleaned = clean(signals, confounds=conf, sample_mask=mask, **cleaning, **clean_args)
            target = self._target_dtype(source_dtype)
            outputs.append(cleaned if target is None else self._cast(cleaned, target, name))
        return outputs

    def transform_single_imgs(self, imgs, confounds=None, sample_mask=None):
        """Region time series of one 4D run (nilearn's method of the same name).

        Parameters
        ----------
        imgs : image
            One 4D run (path or nibabel image).
        confounds : array, DataFrame, path or list of those, default=None
            The run's confounds (see :meth:`transform_imgs`).
        sample_mask : array, default=None
            The run's volumes to keep, as indices or a boolean mask.

        Returns
        -------
        signals : ndarray of shape (n_kept_volumes, n_regions)
        """
        return self.transform_imgs(
            [imgs], confounds=[confounds], n_jobs=1, sample_mask=[sample_mask]
        )[0]

    def _checked_clean_args(self):
        """``clean_args`` as a dict; per-run inputs and the masker's own options refused."""
        clean_args = {} if self.clean_args is None else dict(self.clean_args)
        for key in ("sample_mask", "confounds"):
            if key in clean_args:
                raise ValueError(
                    f"clean_args[{key!r}] would apply one {key} to every run. Pass "
                    f"{key}=[run_0, run_1, ...] to transform_imgs instead (one entry per run), "
                    f"or set {key}_col on ConnectomeExtractor."
                )
        own = {*self._clean_params(), "signals", "runs"}
        if set(clean_args) & own:
            clash = sorted(set(clean_args) & own)
            raise ValueError(
                f"clean_args sets {clash}, which are LabelsMasker parameters (or set per call); "
                f"set them on the masker instead (LabelsMasker(..., {clash[0]}=...))."
            )
        unknown = sorted(str(key) for key in clean_args if key not in _CLEAN_OPTIONS)
        if unknown:
            accepted = [
                key for key in _CLEAN_OPTIONS if key not in own | {"sample_mask", "confounds"}
            ]
            raise ValueError(
                f"clean_args has key(s) {unknown} that nilearn.signal.clean does not take "
                f"(it would ignore them); it takes {accepted}."
            )
        return clean_args

    def _clean_params(self):
        """The masker's arguments of :func:`nilearn.signal.clean` (``clean_args`` aside)."""
        return {
            "detrend": self.detrend,
            "standardize": self.standardize,
            "standardize_confounds": self.standardize_confounds,
            "low_pass": self.low_pass,
            "high_pass": self.high_pass,
            "t_r": self.t_r,
        }

    def _cleaning_requested(self):
        """Which cleaning steps are on (``t_r`` and ``standardize_confounds`` alone do nothing)."""
        return {
            "detrend": bool(self.detrend),
            "standardize": self.standardize not in (None, False),
            "low_pass": self.low_pass is not None,
            "high_pass": self.high_pass is not None,
            "clean_args": bool(self.clean_args),
            "high_variance_confounds": bool(self.high_variance_confounds),
        }

    def generate_report(self, engine="matplotlib", title=None):
        """An HTML report of the fitted masker, for a person to read.

        It shows the atlas contours over the mean of the first image given to :meth:`fit`
        (``reports=True``; the image is read now, not at fit), the mask's contours, and a
        table of every region: output column, label value, name, size (voxels, mm^3, share
        of the labelled voxels) and whether it is lost: removed by ``mask_img`` (not an
        output column) or absent once the atlas is resampled to an image grid met in
        ``transform`` (a NaN column for those images).

        Parameters
        ----------
        engine : {"matplotlib"}, default="matplotlib"
            Plotting engine (nilearn's parameter; only matplotlib is supported here).
        title : str, optional
            Title of the page.

        Returns
        -------
        report : kwneuro_sk.maskers.report.MaskerReport
            A :class:`nilearn.reporting.HTMLReport`: ``report.save_as_html(path)`` writes a
            self-contained page;
            ``report.open_in_browser()`` shows it; a notebook displays it inline.
        """
        check_is_fitted(self)
        # imported here: nilearn.reporting (and matplotlib) only load when a report is made
        from kwneuro_sk.maskers.report import masker_report

        if engine != "matplotlib":
            raise ValueError(
                f"engine={engine!r} is not supported by LabelsMasker.generate_report; use "
                "'matplotlib'."
            )
        notes = []
        if not self.reports:
            notes.append(
                "reports=False at fit: no image was kept, so the atlas is drawn without the "
                "mean image behind it."
            )
        elif self._report_source is None:
            notes.append(
                "No image was given to fit: the atlas is drawn alone. Fit with the images "
                "(masker.fit(imgs)) to see it over their mean."
            )
        params = self.get_params(deep=False)
        summary = {
            "output columns (regions)": self.n_elements_,
            "atlas shape": " x ".join(str(n) for n in self.labels_img_.shape),
            "atlas voxel size (mm)": " x ".join(
                f"{v:g}" for v in np.sqrt((self.labels_img_.affine[:3, :3] ** 2).sum(axis=0))
            ),
            "mask_img": "none" if self.mask_img_ is None else "yes (contours in green)",
            "image grids met so far": len(self._plans),
        }
        return masker_report(
            title=title or "LabelsMasker report",
            regions=self._region_table(),
            labels_img=self.labels_img_,
            mask_img=self.mask_img_,
            background=self._report_background(),
            cmap=self.cmap,
            summary=summary,
            params={key: _short_repr(value) for key, value in params.items()},
            notes=notes,
        )

    def _report_background(self):
        """The image kept at fit for the report (None if none), opened now: a nibabel image
        also for a path or a kwneuro volume resource, which nilearn's plotting does not read
        (a missing file is a FileNotFoundError naming it)."""
        if self._report_source is None:
            return None
        return _images.load_image(
            self._report_source, name="report background (the first image given to fit)"
        )

    def _region_table(self):
        """One row per atlas region: output column, label value, name, size, status."""
        atlas_key = _images.grid_key(self._atlas_grid)
        plan = self._plans[atlas_key]
        voxel_mm3 = float(abs(np.linalg.det(self._atlas_grid[1][:3, :3])))
        counts = np.zeros(self.n_elements_, dtype=np.int64)
        counts[plan.columns] = plan.lengths
        total = max(int(counts.sum()), 1)
        other_grids = {
            key: set(grid_plan.columns.tolist())
            for key, grid_plan in self._plans.items()
            if key != atlas_key
        }
        rows = []
        for column, label in enumerate(self._region_ids.tolist()):
            lost_on = [
                " x ".join(str(n) for n in key[0])
                for key, present in other_grids.items()
                if column not in present
            ]
            status = "kept"
            if lost_on:
                status = f"lost by resampling to the {', '.join(lost_on)} grid"
            rows.append((column, label, self._region_names[column], int(counts[column]), status))
        for label in self._dropped_by_mask.tolist():
            name = str(self._names_by_id.get(label, format_label(label)))
            rows.append((None, label, name, 0, "removed by mask_img (not an output column)"))
        table = pd.DataFrame(
            rows, columns=["column", "label value", "region name", "voxels", "status"]
        )
        table["column"] = table["column"].astype("Int64")  # a removed region has none
        table["label value"] = [format_label(v) for v in table["label value"]]
        table.insert(4, "size (mm^3)", (table["voxels"] * voxel_mm3).round(1))
        table.insert(5, "relative size (%)", (100 * table["voxels"] / total).round(2))
        return table

    def inverse_transform(self, signals):
        """Paint region values back into the atlas.

        Parameters
        ----------
        signals : array-like of shape (n_regions,) or (n_images, n_regions)

        Returns
        -------
        img : nibabel.Nifti1Image
            On the atlas grid: 3D for one row, 4D (one volume per row) for several. Voxels
            outside the regions are 0.
        """
        check_is_fitted(self)
        signals = np.asarray(signals, dtype=np.float64)
        if signals.ndim == 1:
            signals = signals[np.newaxis]
        n_regions = self.n_elements_
        if signals.ndim != 2 or signals.shape[1] != n_regions:
            raise ValueError(
                f"signals must have shape (n_images, {n_regions}), got {signals.shape}."
            )
        shape, affine = self._atlas_grid
        plan = self._plans[_images.grid_key(self._atlas_grid)]
        flat = np.zeros((int(np.prod(shape)), signals.shape[0]))
        flat[plan.voxels] = signals[:, plan.voxel_columns()].T
        data = flat.reshape(shape + (signals.shape[0],), order="F")
        if data.shape[3] == 1:
            data = data[..., 0]
        return _images.as_nifti(data, affine)

    def get_feature_names_out(self, input_features=None):
        """Names of the output columns (the region names).

        Parameters
        ----------
        input_features : None
            Ignored.

        Returns
        -------
        feature_names_out : ndarray of str objects
        """
        check_is_fitted(self)
        return self._region_names.copy()

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        return tags

    # ------------------------------------------------------------ internals
    def _map(self, sources, *, allow_4d, n_jobs="masker", hv_options=None):
        """Yield ``(signals, hv_confounds, source_dtype)`` of each source, in order: the
        (n_vols, n_regions) signals, the high-variance confounds (None unless ``hv_options``)
        and the data type nilearn's ``dtype="auto"`` reads from the image.

        Every source goes through :class:`joblib.Parallel`, so that ``n_jobs=None`` follows a
        :func:`joblib.parallel_config` context and its backend. With one job, joblib runs the
        tasks one by one in this thread (one task per image, no pool). With more, the sources
        are split into a few contiguous chunks per worker; each worker holds one image at a
        time. Threads are preferred: reading (zlib) and the NumPy reductions release the GIL,
        and threads share the fitted masker instead of pickling it.
        """
        memory = check_memory(self.memory)  # read now, as memory_level and the cleaning
        if memory.location is None or self.memory_level == 0:
            memory = None
        if isinstance(n_jobs, str):
            n_jobs = self.n_jobs
        requested = n_jobs
        n_jobs = joblib.effective_n_jobs(requested)
        n_tasks = len(sources) if n_jobs == 1 else min(len(sources), 4 * n_jobs)
        chunks = np.array_split(np.arange(len(sources)), n_tasks)
        tasks = (
            joblib.delayed(_signals_of_chunk)(
                self, [sources[i] for i in chunk], int(chunk[0]), allow_4d, memory, hv_options
            )
            for chunk in chunks
        )
        parallel = joblib.Parallel(n_jobs=requested, return_as="generator", prefer="threads")
        done = 0
        for chunk_signals in parallel(tasks):
            yield from chunk_signals
            done += len(chunk_signals)
            self._report(done, len(sources))

    def _signals(self, source, index, allow_4d, memory, hv_options=None):
        """Signals of one image, through the ``memory`` cache for paths when there is one.

        The cache is keyed on the file's content, never on its name or time stamps: a
        .nii/.nii.gz file's bytes are hashed (SHA-256) and decoded only on a cache miss (no
        second read). The digest is remembered in the cache folder under the file's identity
        and state (inode, size, modification and change times), so an unchanged file is not
        even read on a later call, and any write to it (which moves its change time) makes it
        read and hashed again. Other formats are keyed on their decoded voxels and affine.
        """
        if memory is None or not isinstance(source, (str, os.PathLike)):
            return self._image_signals(source, index, allow_4d, hv_options=hv_options)
        name = f"image {_images.describe(source, index)}"
        if _images.is_nifti_path(source):
            store = None
            if isinstance(memory.location, (str, os.PathLike)):
                store = os.path.join(memory.location, "kwneuro_sk_file_digests")
            content, raw = _images.file_digest(source, name=name, store=store)
            held = [raw]  # handed over once, so the compressed bytes go as soon as decoded
            del raw

            def decode():
                raw = held.pop()
                if raw is None:  # digest known, result not cached (other parameters)
                    return _images.load_image(source, name=name, writable=False)
                return _images.image_from_bytes(raw, source, name=name, writable=False)
        else:
            img = _images.load_image(source, name=name)
            data = _images.read_data(img, name=name)
            content = joblib.hash((data, np.asarray(img.affine), img.shape))
            img = _images.as_nifti(data, img.affine)

            def decode():
                return img

        cached = memory.cache(
            _cached_signals, ignore=["masker", "source", "index", "decode", "allow_4d"]
        )
        key = (*self._cache_key(content), allow_4d, hv_options)
        return cached(key, self, source, index, decode, allow_4d)

    def _report(self, done, total):
        if self.verbose and (self.verbose > 1 or done == total or done % max(1, total // 10) == 0):
            print(f"[LabelsMasker] {done}/{total} images", file=sys.stderr)

    def _cache_key(self, content):
        return (
            content,
            self.strategy,
            self.smoothing_fwhm,
            self.resampling_target,
            self._atlas_token,
        )

    def _plan_for(self, grid):
        """Region plan on an image grid: atlas and mask resampled by nearest neighbour.

        Built once per grid. Threads of one ``transform`` share the masker, so the build is
        done under a lock: the first thread builds, the others wait for its plan.
        """
        key = _images.grid_key(grid)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        with self._plan_lock:
            plan = self._plans.get(key)
            if plan is None:
                atlas = _images.resample_to_grid(self.labels_img_, grid, interpolation="nearest")
                mask_flat = None
                if self.mask_img_ is not None:
                    mask = _images.resample_to_grid(self.mask_img_, grid, interpolation="nearest")
                    mask_flat = np.asanyarray(mask.dataobj).astype(bool).ravel(order="F")
                plan = build_plan(
                    np.asanyarray(atlas.dataobj).ravel(order="F"),
                    self._region_ids,
                    self.background_label,
                    mask_flat,
                )
                self._plans[key] = plan
        return plan

    def __getstate__(self):
        state = dict(super().__getstate__())  # a copy: object.__getstate__ gives __dict__ itself
        state.pop("_plan_lock", None)  # a lock cannot be pickled; a new one is made on load
        source = state.get("_report_source")
        if source is not None and not isinstance(source, (str, os.PathLike)):
            # an in-memory run travels as its mean image (what the report draws), not whole
            state["_report_source"] = mean_img(self._report_background(), copy_header=True)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if hasattr(self, "_plans"):
            self._plan_lock = threading.Lock()

    def _image_signals(self, source, index, allow_4d, img=None, hv_options=None):
        """``(signals, hv_confounds, source_dtype)`` of one image: load once, align, smooth,
        reduce; the high-variance confounds come from the same voxels, before resampling and
        smoothing (as nilearn computes them from the image given)."""
        name = f"image {_images.describe(source, index)}"
        if img is None:
            img = _images.load_image(source, name=name, writable=False)
        source_dtype = _source_dtype(img)
        data = _images.volume_data(img, name=name, allow_4d=allow_4d)
        hv = None
        if hv_options is not None:
            hv = _hv_confounds_of_series(_images.flat_voxels(data).T, **hv_options)
        grid = _images.grid_of(img)
        if _images.same_grid(grid, self._atlas_grid):
            plan = self._plans[_images.grid_key(self._atlas_grid)]
        elif self.resampling_target == "data":
            plan = self._plan_for(grid)
        elif self.resampling_target == "labels":
            resampled = _images.resample_to_grid(
                _images.as_nifti(data, grid[1]), self._atlas_grid, interpolation="continuous"
            )
            data, grid = np.asanyarray(resampled.dataobj), self._atlas_grid
            plan = self._plans[_images.grid_key(grid)]
        else:
            raise ValueError(
                f"{name} has shape {grid[0]} and affine\n{grid[1]}\nbut labels_img has shape "
                f"{self._atlas_grid[0]} and affine\n{self._atlas_grid[1]}; with "
                "resampling_target=None they must be on the same grid. Set "
                "resampling_target='data' or 'labels' to resample."
            )
        if self.smoothing_fwhm is not None:
            data = _smooth_keeping_nan(data, grid[1], self.smoothing_fwhm)
        values = gather(_images.flat_voxels(data), plan)
        del img, data  # the run's decoded bytes are freed before the reduction's buffers
        return reduce_regions(values, plan, self.strategy), hv, source_dtype


def _signals_of_chunk(masker, sources, first_index, allow_4d, memory, hv_options):
    """Worker task: signals of consecutive images."""
    return [
        masker._signals(source, first_index + offset, allow_4d, memory, hv_options)
        for offset, source in enumerate(sources)
    ]


def _cached_signals(key, masker, source, index, decode, allow_4d):
    """Cached per-image results; only ``key`` (content hash, parameters, atlas, 4D or not,
    high-variance options) is hashed."""
    return masker._image_signals(source, index, allow_4d, img=decode(), hv_options=key[-1])


def _source_dtype(img):
    """The data type nilearn reads an image as: float64 when the header scales the values,
    else the stored type."""
    proxy = img.dataobj
    if nib.is_proxy(proxy) and (proxy.slope, proxy.inter) != (1.0, 0.0):
        return np.dtype(np.float64)
    return np.dtype(proxy.dtype) if hasattr(proxy, "dtype") else img.get_data_dtype()


def _volumes_to_keep(cleaning, clean_args):
    """The fewest volumes a sample mask may keep for :func:`nilearn.signal.clean`, what needs
    them and why. Butterworth filtering (``low_pass`` or ``high_pass`` with the default
    filter) first fills the removed volumes with a cubic spline through the kept ones, which
    needs two; nothing else needs more than one (nilearn leaves a single volume undetrended
    and unstandardized, with a warning)."""
    cutoffs = [
        f"{key}={cleaning[key]}" for key in ("low_pass", "high_pass") if cleaning[key] is not None
    ]
    if cutoffs and clean_args.get("filter", "butterworth") == "butterworth":
        return (
            2,
            f"Butterworth filtering ({', '.join(cutoffs)})",
            "it fills the removed volumes with a cubic spline through the kept ones; keep "
            "more volumes, or clean without low_pass/high_pass",
        )
    return 1, "cleaning", "a sample mask keeps at least one volume"


def _merge_clean_keywords(clean_args, keywords):
    """The older nilearn spelling ``clean__<option>=value`` folded into ``clean_args``."""
    if not keywords:
        return clean_args
    unknown = [key for key in keywords if not key.startswith("clean__")]
    if unknown:
        raise TypeError(
            f"LabelsMasker got an unexpected keyword argument {unknown[0]!r} (only the "
            "nilearn spelling clean__<option> of clean_args is accepted as a keyword)."
        )
    merged = {} if clean_args is None else dict(clean_args)
    for key, value in keywords.items():
        option = key[len("clean__") :]
        if option in merged:
            raise ValueError(
                f"{key} and clean_args[{option!r}] both set {option!r}; give it once, in "
                "clean_args."
            )
        merged[option] = value
    options = ", ".join(f"{key[len('clean__') :]!r}: ..." for key in keywords)
    warnings.warn(
        f"The keyword(s) {sorted(keywords)} are nilearn's older spelling of clean_args; they "
        f"are read as clean_args={{{options}}}. Pass clean_args instead.",
        FutureWarning,
        stacklevel=3,
    )
    return merged


def _is_count(value) -> bool:
    """A positive integer (not a bool)."""
    return isinstance(value, Integral) and not isinstance(value, bool) and value >= 1


def _short_repr(value) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _python_value(value):
    """A label value as a plain Python int (integral values) or float."""
    value = value.item() if isinstance(value, np.generic) else value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _region_values(atlas, background_label) -> np.ndarray:
    """Sorted label values of an atlas, background and non-finite voxels excluded."""
    values = np.unique(atlas)
    values = values[np.isfinite(values) & (values != background_label)]
    if values.dtype.kind == "f" and np.all(values == np.round(values)):
        values = values.astype(np.int64)
    return values


def _smooth_keeping_nan(data, affine, fwhm):
    """nilearn smoothing (NaN taken as 0); voxels that were NaN stay NaN."""
    smoothed = np.asanyarray(_images.smooth(_images.as_nifti(data, affine), fwhm).dataobj)
    smoothed = smoothed.reshape(data.shape, order="F")
    if data.dtype.kind == "f":
        nan = np.isnan(data)
        if nan.any():
            smoothed = np.where(nan, np.nan, smoothed)
    return smoothed
