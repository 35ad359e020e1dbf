"""CombatEstimates: the fitted ComBat model as plain data, saved to and loaded from one file."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

_FORMAT = "kwneuro_sk.CombatEstimates"
_VERSION = 1

# The fitted arrays of a ComBat model, named as the harmonizer's attributes without the
# trailing underscore, with their shapes in terms of the model's sizes.
FITTED_ARRAYS = {
    "grand_mean": ("features",),
    "var_pooled": ("features",),
    "beta": ("covariates", "features"),
    "gamma_hat": ("batches", "features"),
    "delta_hat": ("batches", "features"),
    "gamma_star": ("batches", "features"),
    "delta_star": ("batches", "features"),
    "gamma_bar": ("batches",),
    "t2": ("batches",),
    "a_prior": ("batches",),
    "b_prior": ("batches",),
    "zero_variance_features": ("features",),
}
# Keys of ``info`` every model has.
INFO_KEYS = (
    "batches",
    "n_samples_per_batch",
    "ref_batch",
    "feature_names",
    "covariate_names",
    "batch_col",
    "categorical_cols",
    "continuous_cols",
    "categories",
    "eb",
    "parametric",
    "mean_only",
    "unseen_batch",
    "n_features_in",
    "feature_names_in",
)


@dataclass
class CombatEstimates:
    """Fitted ComBat estimates and the information needed to use them.

    Parameters
    ----------
    estimates : dict
        Arrays of the fitted model, keyed as the fitted attributes of
        :class:`~kwneuro_sk.CombatHarmonizer` without the trailing underscore:
        ``grand_mean``, ``var_pooled``, ``beta``, ``gamma_hat``, ``delta_hat``,
        ``gamma_star``, ``delta_star``, ``gamma_bar``, ``t2``, ``a_prior``, ``b_prior``,
        ``zero_variance_features``; and ``sigma``, the pooled standard deviation, kept as
        such because ``var_pooled`` (its square) is not representable for features beyond
        ~1e154 (it is then ``inf`` there, and ``sigma`` is what the model uses).
    info : dict
        Everything else: ``batches``, ``n_samples_per_batch``, ``ref_batch``, ``feature_names``
        (``None`` when the features had no column names: ``x0, x1, ...``),
        ``covariate_names``, the covariate columns and categories, the options ``eb``,
        ``parametric``, ``mean_only``, ``unseen_batch``, and ``n_features_in`` /
        ``feature_names_in``. Estimates made by :func:`~kwneuro_sk.harmonize_volumes` also hold
        ``volumes``: the site column name ``batch_col``, the boolean ``mask`` (voxels in
        feature order are ``mask.nonzero()``), its ``affine`` and ``shape``.

    Notes
    -----
    This class holds data only. Applying a model to images belongs to the image layer:
    estimates whose ``info`` holds ``volumes`` (from :func:`~kwneuro_sk.harmonize_volumes`,
    :meth:`load` or made by hand) are a :class:`~kwneuro_sk.VolumeEstimates`, the subclass
    with ``apply_volumes`` and ``site_effect_maps``.

    See Also
    --------
    kwneuro_sk.CombatHarmonizer.from_estimates : a fitted harmonizer from estimates.
    kwneuro_sk.harmonize_volumes : voxel-wise ComBat, returns estimates.

    Examples
    --------
    >>> import numpy as np
    >>> from kwneuro_sk import CombatHarmonizer
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(20, 4)) + np.repeat([0.0, 2.0], 10)[:, None]
    >>> est = CombatHarmonizer().fit(X, batch=np.repeat(["a", "b"], 10)).estimates_
    >>> est.estimates["gamma_star"].shape
    (2, 4)
    >>> est.info["batches"].tolist()
    ['a', 'b']
    """

    estimates: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    # Subclasses that add methods for one kind of model, by the ``info`` key that marks it
    # (``"volumes"``: kwneuro_sk.volumes.VolumeEstimates). :meth:`load` returns the subclass
    # a file's info calls for, so this data layer imports none of the layers that use it.
    _kinds = {}

    def __init_subclass__(cls, info_key=None, **kwargs):
        super().__init_subclass__(**kwargs)
        if info_key is not None:
            CombatEstimates._kinds[info_key] = cls

    def __new__(cls, *args, **kwargs):
        # Estimates whose info marks a kind are of that kind however they are made (by
        # hand, load, a copy): CombatEstimates(info={"volumes": ...}) is a VolumeEstimates.
        info = kwargs.get("info", args[1] if len(args) > 1 else None)
        kind = cls
        if isinstance(info, dict):
            for key, sub in CombatEstimates._kinds.items():
                if key in info and issubclass(sub, cls):
                    kind = sub
        return super().__new__(kind)

    def save(self, path):
        """Write the estimates to one ``.npz`` file (no pickle; read back with :meth:`load`).

        Arrays are stored as arrays; the rest of ``info`` (strings, numbers, lists, dicts,
        ``None``) as JSON inside the same file.

        Parameters
        ----------
        path : str or path-like
            File to write, used as given (no suffix is added).

        Examples
        --------
        >>> import os, tempfile
        >>> import numpy as np
        >>> from kwneuro_sk import CombatEstimates, CombatHarmonizer
        >>> rng = np.random.default_rng(0)
        >>> est = CombatHarmonizer().fit(rng.normal(size=(20, 4)),
        ...                              batch=np.repeat(["a", "b"], 10)).estimates_
        >>> path = os.path.join(tempfile.mkdtemp(), "combat.npz")
        >>> est.save(path)
        >>> loaded = CombatEstimates.load(path)
        >>> bool(np.array_equal(loaded.estimates["gamma_star"], est.estimates["gamma_star"]))
        True
        """
        arrays = {}
        manifest = {
            "format": _FORMAT,
            "version": _VERSION,
            "estimates": _encode(dict(self.estimates), arrays, "estimates"),
            "info": _encode(dict(self.info), arrays, "info"),
        }
        arrays["__manifest__"] = np.array(json.dumps(manifest))
        path = os.fspath(path)
        if os.path.isdir(path):
            raise ValueError(f"cannot save the model to {path!r}: it is a directory")
        # Written to a temporary file next to the target, then renamed over it: an existing
        # model is never left half-written.
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
        try:
            with os.fdopen(fd, "wb") as file:
                np.savez(file, **arrays)
            os.chmod(tmp, _default_file_mode())  # mkstemp makes it private (0600)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path):
        """Read estimates written by :meth:`save`, trusting nothing in the file.

        Nothing is unpickled (``allow_pickle=False``; object arrays are refused). A file that
        is not a model written by :meth:`save` (a pickle, a CSV, a truncated archive, an
        edited manifest, another format version) and a model that fails :meth:`check` raise
        a ValueError naming the file and the field.

        Parameters
        ----------
        path : str or path-like

        Returns
        -------
        CombatEstimates
            A :class:`~kwneuro_sk.VolumeEstimates` for a model made by
            :func:`~kwneuro_sk.harmonize_volumes`.

        Raises
        ------
        FileNotFoundError
            The file does not exist.
        ValueError
            Anything else wrong with the file, naming it and the bad field.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            raise ValueError(
                f"model {path!r} is a directory, not a file written by CombatEstimates.save"
            )
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model file not found: {path!r}")
        with _open_npz(path) as npz:
            manifest = _read_manifest(npz, path)
            try:
                estimates = _decode(manifest["estimates"], npz, "estimates")
                info = _decode(manifest["info"], npz, "info")
                loaded = cls(estimates=estimates, info=info)  # of the kind info calls for
            except _BadField as error:
                raise ValueError(f"invalid ComBat model in {path!r}: {error}") from None
            except RecursionError:
                raise ValueError(
                    f"invalid ComBat model in {path!r}: the manifest is nested too deeply"
                ) from None
        return loaded.check(source=path)

    def check(self, source=None):
        """Check that the estimates form a usable model; raise ValueError naming the field.

        Called by :meth:`load` and :meth:`CombatHarmonizer.from_estimates`, so a damaged or
        edited model file fails there, not as a numpy error or NaN output later.

        Parameters
        ----------
        source : str, default=None
            Where the estimates came from (a file name), for the messages.
        """
        where = f" in {source!r}" if source else ""

        def fail(field, problem):
            raise ValueError(f"invalid ComBat model{where}: {field} {problem}")

        if not isinstance(self.estimates, dict) or not isinstance(self.info, dict):
            fail("estimates/info", "must be dicts")
        for key in INFO_KEYS:
            if key not in self.info:
                fail(f"info[{key!r}]", "is missing")
        for key in FITTED_ARRAYS:
            if key not in self.estimates:
                fail(f"estimates[{key!r}]", "is missing")
        info = self.info

        # ---- sites
        batches = _array_field(info["batches"], "info['batches']", fail)
        if batches.ndim != 1 or batches.size < 2:
            fail("info['batches']", f"must list at least 2 sites; got shape {batches.shape}")
        if batches.dtype.kind not in "biufUSO":
            fail("info['batches']", f"has dtype {batches.dtype}")
        try:
            unique = pd.unique(pd.Series(batches, dtype=object))
        except TypeError:
            fail("info['batches']", "holds unhashable site labels")
        if len(unique) != batches.size:
            fail("info['batches']", "has repeated site labels")
        counts = _array_field(info["n_samples_per_batch"], "info['n_samples_per_batch']", fail)
        if (
            counts.shape != batches.shape
            or counts.dtype.kind not in "iuf"
            or not (
                np.isfinite(counts).all()
                and (counts >= 1).all()
                and (counts == np.round(counts)).all()
            )
        ):
            fail(
                "info['n_samples_per_batch']",
                f"must hold one count >= 1 per site; got {_preview(counts)}",
            )
        if info["ref_batch"] is not None:
            try:
                known = info["ref_batch"] in set(unique.tolist())
            except TypeError:
                known = False
            if not known:
                fail("info['ref_batch']", f"{info['ref_batch']!r} is not among the sites")

        # ---- options
        for key in ("eb", "parametric", "mean_only"):
            if not isinstance(info[key], (bool, np.bool_)):
                fail(f"info[{key!r}]", f"must be true or false; got {info[key]!r}")
        if info["unseen_batch"] not in ("error", "adapt"):
            fail(
                "info['unseen_batch']", f"must be 'error' or 'adapt'; got {info['unseen_batch']!r}"
            )
        try:
            hash(info["batch_col"])
        except TypeError:
            fail("info['batch_col']", f"must be a column name; got {info['batch_col']!r}")

        # ---- covariates
        for key in ("categorical_cols", "continuous_cols", "categories"):
            if not isinstance(info[key], (list, tuple)):
                fail(f"info[{key!r}]", f"must be a list; got {type(info[key]).__name__}")
        for key in ("categorical_cols", "continuous_cols"):
            for col in info[key]:
                try:
                    hash(col)
                except TypeError:
                    fail(f"info[{key!r}]", f"holds {col!r}, which is not a column name")
        if len(info["categories"]) != len(info["categorical_cols"]):
            fail("info['categories']", "has not one list of levels per categorical column")
        for col, levels in zip(info["categorical_cols"], info["categories"]):
            if not isinstance(levels, (list, tuple, np.ndarray)) or len(levels) < 1:
                fail("info['categories']", f"has no list of levels for {col!r}")
            if not all(isinstance(v, (str, int, float, bool, np.generic)) for v in levels):
                fail(
                    "info['categories']",
                    f"has levels of {col!r} that are not labels (text or numbers)",
                )
            if any(isinstance(v, (float, np.floating)) and np.isnan(v) for v in levels):
                fail("info['categories']", f"has a NaN level for {col!r}")
            if len(set(levels)) != len(levels):
                fail("info['categories']", f"has repeated levels for {col!r}")
        covariate_names = _array_field(info["covariate_names"], "info['covariate_names']", fail)
        if covariate_names.ndim != 1:
            fail("info['covariate_names']", "must be a list of names")
        n_encoded = sum(len(c) - 1 for c in info["categories"]) + len(info["continuous_cols"])
        if info.get("smooth_cols"):  # ComBat-GAM: B-spline knots of each smooth covariate
            knots = info.get("smooth_knots")
            degree = info.get("smooth_degree")
            if not isinstance(knots, list) or len(knots) != len(info["smooth_cols"]):
                fail(
                    "info['smooth_knots']",
                    "must hold one increasing array of at least 2 knots per smooth column",
                )
            knots = [_check_knots(k, col, fail) for col, k in zip(info["smooth_cols"], knots)]
            if isinstance(degree, bool) or not isinstance(degree, (int, np.integer)) or degree < 1:
                fail("info['smooth_degree']", f"must be a positive integer; got {degree!r}")
            if info.get("smooth_extrapolation") not in ("linear", "constant", "error"):
                fail("info['smooth_extrapolation']", "must be 'linear', 'constant' or 'error'")
            n_encoded += sum(len(k) + int(degree) - 2 for k in knots)
        if n_encoded != covariate_names.size:
            fail(
                "info['covariate_names']",
                f"has {covariate_names.size} names for {n_encoded} encoded covariate columns",
            )

        # ---- fitted arrays: shapes, dtypes, ranges
        grand_mean = _array_field(self.estimates["grand_mean"], "estimates['grand_mean']", fail)
        if grand_mean.ndim != 1 or grand_mean.size < 1:
            fail(
                "estimates['grand_mean']",
                f"must be 1-D and non-empty; got shape {grand_mean.shape}",
            )
        sizes = {
            "batches": batches.size,
            "features": grand_mean.size,
            "covariates": covariate_names.size,
        }
        arrays = {}
        for key, dims in FITTED_ARRAYS.items():
            value = _array_field(self.estimates[key], f"estimates[{key!r}]", fail)
            expected = tuple(sizes[d] for d in dims)
            if value.shape != expected:
                fail(
                    f"estimates[{key!r}]",
                    f"has shape {value.shape}; expected {expected} ({' x '.join(dims)})",
                )
            kind = "b" if key == "zero_variance_features" else "f"
            if value.dtype.kind != kind and not (kind == "f" and value.dtype.kind in "iu"):
                fail(f"estimates[{key!r}]", f"has dtype {value.dtype}")
            arrays[key] = value
        sigma = self.estimates.get("sigma")
        if sigma is not None:
            sigma = _array_field(sigma, "estimates['sigma']", fail)
            if sigma.shape != (sizes["features"],) or sigma.dtype.kind != "f":
                fail(
                    "estimates['sigma']",
                    f"must be {sizes['features']} floats; got {sigma.dtype} of shape {sigma.shape}",
                )
            if not np.isfinite(sigma).all() or (sigma < 0).any():
                fail("estimates['sigma']", "must be finite and >= 0")
        for key in ("grand_mean", "var_pooled", "beta", "gamma_star", "delta_star"):
            values = arrays[key]
            if key == "var_pooled" and sigma is not None:
                values = np.where(np.isposinf(values), 0.0, values)  # sigma**2 overflowed
            if not np.isfinite(values).all():
                fail(f"estimates[{key!r}]", "has NaN or infinite values")
        if (arrays["delta_star"] <= 0).any():
            fail("estimates['delta_star']", "has values <= 0 (site variances must be > 0)")
        for key in ("var_pooled", "delta_hat", "t2"):
            if (arrays[key] < 0).any():  # NaN (not estimated) compares False
                fail(f"estimates[{key!r}]", "has negative values (variances must be >= 0)")
        for key in ("a_prior", "b_prior"):
            if (arrays[key] <= 0).any():
                fail(f"estimates[{key!r}]", "has values <= 0")
        for key in ("gamma_hat", "delta_hat", "gamma_bar", "t2", "a_prior", "b_prior"):
            if np.isinf(arrays[key]).any():
                fail(f"estimates[{key!r}]", "has infinite values")

        # ---- feature and column names
        names = info["feature_names"]
        if names is not None:
            names = _array_field(names, "info['feature_names']", fail)
            if names.shape != (sizes["features"],):
                fail(
                    "info['feature_names']",
                    f"has {names.size} names for {sizes['features']} features",
                )
            if not all(isinstance(v, str) for v in names.tolist()):
                fail("info['feature_names']", "must hold the feature names as text")
        n_in = info["n_features_in"]
        if (
            not isinstance(n_in, (int, np.integer))
            or isinstance(n_in, (bool, np.bool_))
            or (n_in < sizes["features"])
        ):
            fail(
                "info['n_features_in']",
                f"must be an integer >= the {sizes['features']} features; got {n_in!r}",
            )
        for key in ("feature_names_in", "columns_in"):
            value = info.get(key)
            if value is None:
                continue
            if not isinstance(value, (list, tuple, np.ndarray)) or len(value) != n_in:
                fail(f"info[{key!r}]", f"must list the {n_in} columns seen in fit")
            if key == "feature_names_in" and not all(isinstance(v, str) for v in value):
                fail(f"info[{key!r}]", "must hold column names as text")

        if "volumes" in info:
            _check_volumes(info["volumes"], sizes["features"], fail)
        if info.get("subject_col") is not None:
            _check_longitudinal(self.estimates, info, sizes, fail)
        return self

    def to_neurocombat(self):
        """The estimates under neuroCombat's keys and shapes, for code that reads them.

        neuroCombat 0.2.12 (and so kwneuro 1.0.0's ``harmonize_volumes``) returns its
        estimates as a dict; this gives the same keys for the same quantities:

        ====================================================  ==================================
        neuroCombat key (shape)                               kwneuro_sk
        ====================================================  ==================================
        ``batches`` (n_batches,)                              ``info["batches"]``
        ``var.pooled`` (n_features, 1)                        ``var_pooled``
        ``stand.mean`` (n_features, 1)                        ``grand_mean``
        ``gamma.star``, ``delta.star`` (n_batches, n_feat.)   ``gamma_star``, ``delta_star``
        ``gamma_hat``, ``delta_hat`` (n_batches, n_feat.)     ``gamma_hat``, ``delta_hat``
        ``gamma_bar``, ``t2``, ``a_prior``, ``b_prior``       the priors, one per site
        ====================================================  ==================================

        neuroCombat's ``stand.mean`` holds the grand mean once per training subject and its
        ``mod.mean`` the covariate term of each training subject; here ``stand.mean`` has one
        column and ``mod.mean`` is replaced by the covariate coefficients ``beta``
        (n_covariates, n_features), from which any subject's covariate term is
        ``z @ beta``. Zero-variance features have ``var.pooled`` 0 here (neuroCombat puts a
        placeholder there). Arrays are copies.

        Returns
        -------
        dict

        Examples
        --------
        >>> import numpy as np
        >>> from kwneuro_sk import CombatHarmonizer
        >>> rng = np.random.default_rng(0)
        >>> est = CombatHarmonizer().fit(rng.normal(size=(20, 4)),
        ...                              batch=np.repeat(["a", "b"], 10)).estimates_
        >>> nc = est.to_neurocombat()
        >>> nc["gamma.star"].shape, nc["var.pooled"].shape, nc["stand.mean"].shape
        ((2, 4), (4, 1), (4, 1))
        """
        e = self.estimates
        out = {
            "batches": np.array(self.info["batches"], copy=True),
            "var.pooled": np.array(e["var_pooled"], dtype=np.float64)[:, None],
            "stand.mean": np.array(e["grand_mean"], dtype=np.float64)[:, None],
            "gamma.star": np.array(e["gamma_star"], copy=True),
            "delta.star": np.array(e["delta_star"], copy=True),
            "beta": np.array(e["beta"], copy=True),
        }
        for key in ("gamma_hat", "delta_hat", "gamma_bar", "t2", "a_prior", "b_prior"):
            out[key] = np.array(e[key], copy=True)
        return out


# ------------------------------------------------------------------------------------------
# file format: arrays as npz members, everything else as JSON with placeholders for arrays
# ------------------------------------------------------------------------------------------


def _encode(value, arrays, where):
    """JSON-able form of ``value``; arrays go to ``arrays`` and leave a placeholder."""
    if isinstance(value, dict):
        return {
            "__dict__": [
                [_encode(k, arrays, where), _encode(v, arrays, f"{where}.{k}")]
                for k, v in value.items()
            ]
        }
    if isinstance(value, tuple):  # kept apart from lists: a tuple column name stays a tuple
        return {"__tuple__": [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.ndarray):
        as_objects = value.dtype == object
        stored = np.array(value.tolist()) if as_objects and value.size else value
        if as_objects and not value.size:
            stored = np.empty(value.shape, dtype=np.str_)
        if stored.dtype.kind not in "biufcUS":
            raise TypeError(
                f"cannot save {where}: array of {value.dtype} with elements of "
                "mixed or unsupported types"
            )
        key = f"a{len(arrays)}"
        arrays[key] = stored
        return {"__array__": key, "object": bool(as_objects)}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"cannot save {where}: values of type {type(value).__name__} are not "
        "supported (arrays, numbers, strings, lists, dicts and None are)"
    )


def _default_file_mode():
    """The mode ``open(path, "w")`` would give a new file (0666 less the umask)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


class _BadField(Exception):
    """A field of a model file that cannot be decoded (reported as ValueError by load)."""


_LOAD_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error)


def _open_npz(path):
    """``numpy.load`` of a model file, never unpickling; anything but an .npz archive is a
    ValueError naming the file and what it looks like."""
    with open(path, "rb") as file:
        head = file.read(8)
    kind = (
        "empty"
        if not head
        else "a NumPy .npy array"
        if head.startswith(b"\x93NUMPY")
        else "a pickle"
        if head[:1] == b"\x80"
        else "a gzip file"
        if head.startswith(b"\x1f\x8b")
        else "a zip archive"
        if head.startswith(b"PK")
        else "not an .npz archive"
    )
    problem = (
        f"the file is {kind}"
        if kind != "a zip archive"
        else "the zip archive is truncated or corrupt"
    )
    if kind in ("empty", "a NumPy .npy array", "a pickle", "a gzip file", "not an .npz archive"):
        raise ValueError(f"{path!r} is not a file written by CombatEstimates.save: {problem}")
    try:
        npz = np.load(path, allow_pickle=False)
    except _LOAD_ERRORS:
        raise ValueError(
            f"{path!r} is not a file written by CombatEstimates.save: {problem}"
        ) from None
    if not isinstance(npz, np.lib.npyio.NpzFile):  # pragma: no cover - caught by the magic
        raise ValueError(
            f"{path!r} is not a file written by CombatEstimates.save: not an .npz archive"
        )  # noqa: TRY004 - a bad file, not a bad argument type
    return npz


def _read_manifest(npz, path):
    """The JSON manifest of a model file, checked for its format and version."""

    def bad(problem):
        raise ValueError(f"{path!r} is not a file written by CombatEstimates.save: {problem}")

    if "__manifest__" not in npz.files:
        bad("no manifest (the __manifest__ member is missing)")
    try:
        member = npz["__manifest__"]
    except _LOAD_ERRORS:
        bad(
            "the manifest cannot be read (truncated, corrupt, or an object array, which is "
            "never unpickled)"
        )
    if member.ndim != 0 or member.dtype.kind != "U":
        bad(f"the manifest is not one JSON text (dtype {member.dtype}, shape {member.shape})")
    try:
        manifest = json.loads(str(member))
    except ValueError as error:
        bad(f"the manifest is not valid JSON ({error})")
    except RecursionError:
        bad("the manifest is nested too deeply")
    if not isinstance(manifest, dict):
        bad(f"the manifest is a JSON {type(manifest).__name__}, not an object")
    version = manifest.get("version")
    if (
        manifest.get("format") != _FORMAT
        or isinstance(version, bool)  # JSON true equals 1 in Python
        or version != _VERSION
    ):
        summary = manifest.get("format") == "kwneuro_sk.SiteSummary"
        bad(
            f"manifest format {manifest.get('format')!r} version {manifest.get('version')!r}; "
            f"this kwneuro_sk reads {_FORMAT!r} version {_VERSION}"
            + (
                " (it is one site's summary, written by SiteSummary.save: fit a model from "
                "the sites' summaries with CombatHarmonizer.fit_from_summaries or "
                "`kwneuro-sk combine`)"
                if summary
                else ""
            )
        )
    for key in ("estimates", "info"):
        if key not in manifest:
            bad(f"the manifest has no {key!r} field")
    return manifest


def _decode(value, npz, where):
    """Inverse of :func:`_encode`; a malformed entry raises _BadField naming it."""
    if isinstance(value, list):
        return [_decode(v, npz, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if "__array__" in value:
            key = value["__array__"]
            if not isinstance(key, str) or key not in npz.files or key == "__manifest__":
                raise _BadField(f"{where} refers to array member {key!r}, which is not in the file")
            try:
                array = npz[key]
            except _LOAD_ERRORS:
                raise _BadField(
                    f"{where} (member {key!r}) cannot be read: truncated, corrupt, "
                    "or an object array (never unpickled)"
                ) from None
            if array.dtype.kind not in "biufcUS":
                raise _BadField(f"{where} has unsupported dtype {array.dtype}")
            return array.astype(object) if value.get("object") is True else array
        if "__tuple__" in value and isinstance(value["__tuple__"], list):
            return tuple(_decode(v, npz, f"{where}[{i}]") for i, v in enumerate(value["__tuple__"]))
        items = value.get("__dict__")
        if not isinstance(items, list) or not all(
            isinstance(kv, list) and len(kv) == 2 for kv in items
        ):
            raise _BadField(f"{where} is not an encoded dict")
        out = {}
        for k, v in items:
            key = _decode(k, npz, where)
            try:
                hash(key)
            except TypeError:
                raise _BadField(f"{where} has an unhashable key {key!r}") from None
            out[key] = _decode(v, npz, f"{where}[{key!r}]")
        return out
    return value


def _array_field(value, field, fail):
    """``value`` as a numpy array, or a failure naming the field (ragged, unhashable...)."""
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):
        fail(field, "is not an array")
    if array.dtype == object:
        array = np.asarray(value, dtype=object)
    return array


def _check_knots(values, column, fail):
    """One smooth column's B-spline knots: finite numbers, increasing, at least 2."""
    field = f"info['smooth_knots'] of {column!r}"
    knots = _array_field(values, field, fail)
    if knots.ndim != 1 or knots.size < 2:
        fail(field, f"must be a 1-D array of at least 2 knots; got shape {knots.shape}")
    if knots.dtype.kind not in "iuf":
        fail(field, f"must hold numbers; got {_preview(knots)} (dtype {knots.dtype})")
    if not np.isfinite(knots).all():
        fail(field, f"must hold finite numbers; got {_preview(knots)} (NaN or infinite)")
    if np.any(np.diff(knots) <= 0):
        fail(field, f"must be strictly increasing; got {_preview(knots)}")
    return knots


def _preview(values, n=5):
    values = np.asarray(values).ravel().tolist()
    return str(values[:n])[:-1] + (", ...]" if len(values) > n else "]")


def _check_volumes(volumes, n_features, fail):
    """``info['volumes']`` of harmonize_volumes: mask, affine and shape agree with the model."""
    if not isinstance(volumes, dict):
        fail("info['volumes']", "must be a dict")
    for key in ("batch_col", "mask", "affine", "shape"):
        if key not in volumes:
            fail(f"info['volumes'][{key!r}]", "is missing")
    shape = volumes["shape"]
    if (
        not isinstance(shape, (list, tuple))
        or len(shape) != 3
        or not all(
            isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n > 0 for n in shape
        )
    ):
        fail("info['volumes']['shape']", f"must be 3 positive integers; got {shape!r}")
    mask = _array_field(volumes["mask"], "info['volumes']['mask']", fail)
    if mask.dtype.kind not in "biu" or mask.shape != tuple(int(n) for n in shape):
        fail(
            "info['volumes']['mask']",
            f"must be a boolean array of shape {tuple(shape)}; "
            f"got {mask.dtype} of shape {mask.shape}",
        )
    if int(np.count_nonzero(mask)) != n_features:
        fail(
            "info['volumes']['mask']",
            f"has {int(np.count_nonzero(mask))} voxels for a model of {n_features} features",
        )
    affine = _array_field(volumes["affine"], "info['volumes']['affine']", fail)
    if affine.shape != (4, 4) or affine.dtype.kind not in "iuf" or not np.isfinite(affine).all():
        fail("info['volumes']['affine']", f"must be a finite 4 x 4 array; got shape {affine.shape}")
    try:
        hash(volumes["batch_col"])
    except TypeError:
        fail("info['volumes']['batch_col']", "must be a column name")


def _check_longitudinal(estimates, info, sizes, fail):
    """The fitted state of longitudinal ComBat (subject_col set): subjects, random effects."""
    if info.get("sigma_method") not in ("reml", "msr"):
        fail("info['sigma_method']", f"must be 'reml' or 'msr'; got {info.get('sigma_method')!r}")
    if info.get("random_slope") is not None and info["random_slope"] not in info["continuous_cols"]:
        fail("info['random_slope']", "must be one of info['continuous_cols']")
    if info.get("ref_batch") is not None:
        fail("info['ref_batch']", "must be None with subject_col")
    subjects = _array_field(info.get("subjects"), "info['subjects']", fail)
    if subjects.ndim != 1 or subjects.size < 1 or subjects.dtype.kind not in "biufUSO":
        fail("info['subjects']", "must list the subjects seen in fit")
    if len(pd.unique(pd.Series(subjects, dtype=object))) != subjects.size:
        fail("info['subjects']", "has repeated subject labels")
    q = 1 if info.get("random_slope") is None else 2
    expected = {
        "random_effects": ((subjects.size, q, sizes["features"]), "f"),
        "random_effects_cov": ((q, q, sizes["features"]), "f"),
        "batch_effects": ((sizes["batches"], sizes["features"]), "f"),
        "singular_fit": ((sizes["features"],), "b"),
    }
    for key, (shape, kind) in expected.items():
        if key not in estimates:
            fail(f"estimates[{key!r}]", "is missing (subject_col is set)")
        value = _array_field(estimates[key], f"estimates[{key!r}]", fail)
        if value.shape != shape or value.dtype.kind != kind:
            fail(
                f"estimates[{key!r}]",
                f"must be {kind} of shape {shape}; got {value.dtype} {value.shape}",
            )
        if kind == "f" and not np.isfinite(value).all():
            fail(f"estimates[{key!r}]", "has NaN or infinite values")
    cov = np.asarray(estimates["random_effects_cov"], dtype=np.float64)
    diagonal = cov[np.arange(q), np.arange(q)]
    if (diagonal < 0).any():
        fail("estimates['random_effects_cov']", "has negative variances")
