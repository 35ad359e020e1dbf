"""Site summaries for federated ComBat: what a site shares instead of its rows.

A :class:`SiteSummary` holds the per-site sufficient statistics of
:class:`~kwneuro_sk.combat.statistics.SiteStatistics` plus what is needed to check that
summaries fit together (the covariate options and the feature names). It is written to one
``.npz`` file (JSON manifest and float64 arrays, never pickled) and read back trusting nothing.

Fields (``S`` sites in the summary, ``Q`` covariate columns: one per level of a categorical
covariate present at the site, one per continuous covariate, one per B-spline basis column of
a smooth covariate; ``G`` features), and what each reveals about the site (the spline columns
reveal what the continuous ones do, at the resolution of the knots, which the manifest's
``smooth`` field holds with the degree and extrapolation):

========== ============ ===============================================================
field      shape        content; what it reveals
========== ============ ===============================================================
n          (S,)         rows per site; the site's sample size
zbar       (S, Q)       mean of each covariate column; the share of each categorical
                        level and the mean of each continuous covariate
xbar       (S, G)       mean of each feature; the site's average
cxx        (S, G)       sum of squared deviations of each feature from its site mean;
                        the site's variance of each feature
czz        (S, Q, Q)    centred cross products of the covariates; their variances and
                        covariances at the site (e.g. the age spread of each sex)
czx        (S, Q, G)    centred cross products of covariates and features; the
                        covariance of each covariate with each feature, and hence the mean
                        of the features of the rows holding each categorical level
magnitude  (G,)         largest absolute value of each feature rounded down to a power of
                        two; its order of magnitude only
========== ============ ===============================================================

No row and no single row's value is stored. :meth:`CombatHarmonizer.site_summary` refuses a
site with fewer than ``min_rows`` rows, and a categorical level held by exactly one row of a
site, or by all rows but one (its mean would be that row's values); a level held by few rows
reveals the mean of those rows: merge rare levels before summarizing.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np

from kwneuro_sk.combat.statistics import SiteMoments, SiteStatistics

FORMAT = "kwneuro_sk.SiteSummary"
VERSION = 1
ARRAYS = ("n", "zbar", "xbar", "cxx", "czz", "czx", "magnitude")
# Row counts above this are not exact in float64 (and not real sample sizes).
MAX_ROWS = 2**53
_LOAD_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error)


@dataclass
class SiteSummary:
    """Per-site sufficient statistics that one site shares for federated ComBat.

    Made by :meth:`CombatHarmonizer.site_summary` at each site, combined by
    :meth:`CombatHarmonizer.fit_from_summaries` at the coordinator. See the module docstring
    (and the user guide, Federated harmonization) for every field and what it reveals.

    Attributes
    ----------
    statistics : SiteStatistics
        The centred per-site statistics.
    covariates : dict
        ``categorical_cols`` and ``continuous_cols`` (lists) the summary was made with.
    features : dict
        ``n_features_in``, ``feature_names_in``, ``columns_in``, ``feature_names`` (the
        harmonized feature names) and ``batch_col``.
    min_rows : int
        The smallest site size the site accepted.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from kwneuro_sk import CombatHarmonizer, SiteSummary
    >>> rng = np.random.default_rng(0)
    >>> X, site = rng.normal(size=(40, 3)), np.repeat(["a", "b"], 20)
    >>> path_a = os.path.join(tempfile.mkdtemp(), "a.npz")
    >>> CombatHarmonizer().site_summary(X[:20], batch=site[:20]).save(path_a)
    >>> summary_b = CombatHarmonizer().site_summary(X[20:], batch=site[20:])
    >>> combat = CombatHarmonizer().fit_from_summaries([SiteSummary.load(path_a), summary_b])
    >>> pooled = CombatHarmonizer().fit(X, batch=site)
    >>> bool(np.allclose(combat.gamma_star_, pooled.gamma_star_, rtol=1e-10))
    True
    """

    statistics: SiteStatistics
    covariates: dict
    features: dict
    min_rows: int = 10

    @property
    def sites(self):
        """Site labels of the summary."""
        return list(self.statistics.sites)

    @property
    def n_values(self):
        """Number of numbers stored (``S (1 + Q + Q^2) + S G (2 + Q) + G``): independent of
        the number of rows."""
        return int(sum(getattr(self.statistics.moments, name).size for name in ARRAYS))

    def _manifest(self):
        for label in self.statistics.sites:
            _check_json_label(label, "site label")
        for key in self.statistics.columns:
            for part in key:
                _check_json_label(part, "covariate column or level")
        return {
            "format": FORMAT,
            "version": VERSION,
            "sites": [_plain(s) for s in self.statistics.sites],
            "smooth": self.statistics.smooth,
            "columns": [[_plain(p) for p in key] for key in self.statistics.columns],
            "covariates": self.covariates,
            "features": self.features,
            "min_rows": int(self.min_rows),
        }

    def save(self, path):
        """Write the summary to one ``.npz`` file (JSON manifest and float64 arrays, no
        pickle), through a temporary file renamed over ``path``.

        Parameters
        ----------
        path : str or path-like
        """
        arrays = {name: getattr(self.statistics.moments, name) for name in ARRAYS}
        arrays["__manifest__"] = np.array(json.dumps(self._manifest(), default=_plain))
        path = os.fspath(path)
        if os.path.isdir(path):
            raise ValueError(f"cannot save the site summary to {path!r}: it is a directory")
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
        try:
            with os.fdopen(fd, "wb") as file:
                np.savez(file, **arrays)
            umask = os.umask(0o022)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path):
        """Read a summary written by :meth:`save`, trusting nothing in the file.

        Nothing is unpickled. The manifest (format, version, sites, covariate columns,
        options, feature names) and every array (name, dtype float64, shape, finite values,
        ranges: whole row counts of at least ``min_rows`` and below 2**53, non-negative sums
        of squares, symmetric covariate products, means of level indicators in [0, 1], powers
        of two) are checked: site labels, levels and column names are text or numbers (not
        JSON lists or objects), feature names are lists of text of the right length, the
        version is an integer; anything else raises a ValueError naming the file and the
        field.

        Parameters
        ----------
        path : str or path-like

        Returns
        -------
        SiteSummary
        """
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"site summary file not found: {path!r}")

        def bad(problem):
            raise ValueError(f"{path!r} is not a valid site summary: {problem}")

        if os.path.isdir(path):
            bad("it is a directory")
        with open(path, "rb") as file:
            head = file.read(4)
        if not head.startswith(b"PK"):
            bad("the file is not an .npz archive (written by SiteSummary.save)")
        try:
            npz = np.load(path, allow_pickle=False)
        except _LOAD_ERRORS:
            bad("the archive is truncated or corrupt")
        with npz:
            if "__manifest__" not in npz.files:
                bad(f"no manifest (members {sorted(npz.files)[:10]})")
            try:
                manifest = npz["__manifest__"]
            except _LOAD_ERRORS:
                bad("the manifest cannot be read (truncated, corrupt, or an object array)")
            if manifest.ndim != 0 or manifest.dtype.kind != "U":
                bad("the manifest is not one JSON text")
            try:
                manifest = json.loads(str(manifest))
            except (ValueError, RecursionError):
                bad("the manifest is not valid JSON")
            if not isinstance(manifest, dict):
                bad("the manifest is not a JSON object")
            if manifest.get("format") != FORMAT:
                model = manifest.get("format") == "kwneuro_sk.CombatEstimates"
                bad(
                    f"format {manifest.get('format')!r}; expected {FORMAT!r}"
                    + (
                        " (it is a fitted model, written by CombatEstimates.save: read it with "
                        "CombatEstimates.load, or `kwneuro-sk apply`)"
                        if model
                        else ""
                    )
                )
            version = manifest.get("version")
            if not isinstance(version, int) or isinstance(version, bool) or version != VERSION:
                bad(f"format version {version!r}; this kwneuro_sk reads version {VERSION}")
            if set(npz.files) != {*ARRAYS, "__manifest__"}:
                bad(f"members {sorted(npz.files)}; expected {sorted({*ARRAYS, '__manifest__'})}")
            try:
                members = {name: npz[name] for name in ARRAYS}
            except _LOAD_ERRORS:
                bad("a member cannot be read (truncated, corrupt, or an object array)")
        for key in ("sites", "columns", "covariates", "features", "min_rows"):
            if key not in manifest:
                bad(f"the manifest has no {key!r} field")
        return _from_parts(manifest, members, bad)


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def _is_label(value):
    """A site label, categorical level or column name as JSON holds it: text or a number
    (JSON lists and objects are not labels)."""
    return isinstance(value, (str, int, float, bool))


def _check_json_label(value, what):
    value = _plain(value)
    if not _is_label(value):
        raise TypeError(
            f"a site summary stores {what}s as text or numbers; got {value!r} of type "
            f"{type(value).__name__}"
        )


def _check_smooth(smooth, smooth_cols, bad):
    """The B-spline settings of the smooth covariates: knots, degree, extrapolation."""
    if not isinstance(smooth, dict) or sorted(map(str, smooth)) != sorted(map(str, smooth_cols)):
        bad("'smooth' does not hold the spline settings of each smooth_cols column")
    for col, spec in smooth.items():
        ok = isinstance(spec, dict) and set(spec) == {"knots", "degree", "extrapolation"}
        knots = spec.get("knots") if ok else None
        ok = (
            ok
            and isinstance(knots, list)
            and len(knots) >= 2
            and all(isinstance(k, (int, float)) and not isinstance(k, bool) for k in knots)
            and np.isfinite(knots).all()
            and bool(np.all(np.diff(knots) > 0))
            and isinstance(spec["degree"], int)
            and not isinstance(spec["degree"], bool)
            and 1 <= spec["degree"] <= 10
            and spec["extrapolation"] in ("linear", "constant", "error")
        )
        if not ok:
            bad(
                f"'smooth' of {col!r} must hold increasing finite knots (at least 2), an "
                "integer degree and an extrapolation of linear/constant/error"
            )
    # JSON object keys are text: the columns are those of smooth_cols with that text
    column = {str(c): c for c in smooth_cols}
    return {
        column[str(name)]: dict(spec, knots=[float(k) for k in spec["knots"]])
        for name, spec in smooth.items()
    }


def _from_parts(manifest, arrays, bad):
    """A SiteSummary from a decoded manifest and arrays, every field checked."""
    sites, columns = manifest["sites"], manifest["columns"]
    covariates, features = manifest["covariates"], manifest["features"]
    min_rows = manifest["min_rows"]
    if not isinstance(sites, list) or not sites:
        bad("'sites' is not a non-empty list")
    if not all(map(_is_label, sites)) or len(set(sites)) != len(sites):
        bad("'sites' holds other than distinct text or numbers")
    if not isinstance(covariates, dict) or set(covariates) - {"smooth_cols"} != {
        "categorical_cols",
        "continuous_cols",
    }:
        bad("'covariates' must hold exactly categorical_cols and continuous_cols (and smooth_cols)")
    categorical, continuous = covariates["categorical_cols"], covariates["continuous_cols"]
    smooth_cols = covariates.get("smooth_cols", [])
    if not all(
        isinstance(v, list) and all(map(_is_label, v))
        for v in (categorical, continuous, smooth_cols)
    ):
        bad("categorical_cols/continuous_cols/smooth_cols are not lists of column names")
    smooth = _check_smooth(manifest.get("smooth", {}), smooth_cols, bad)
    if not isinstance(columns, list):
        bad("'columns' is not a list")
    keys = []
    for key in columns:
        ok = isinstance(key, list) and (
            (len(key) == 3 and key[0] == "level" and key[1] in categorical and _is_label(key[2]))
            or (len(key) == 2 and key[0] == "value" and key[1] in continuous)
            or (
                len(key) == 3
                and key[0] == "spline"
                and key[1] in smooth
                and isinstance(key[2], int)
                and not isinstance(key[2], bool)
            )
        )
        if not ok:
            bad(
                f"covariate column {key!r} is not a level of categorical_cols (a level is "
                "text or a number), a continuous_col or a spline column of smooth_cols"
            )
        keys.append(tuple(key))
    if len(set(keys)) != len(keys):
        bad("'columns' has repeated covariate columns")
    values = [k[1] for k in keys if k[0] == "value"]
    if sorted(map(str, values)) != sorted(map(str, continuous)):
        bad("'columns' does not hold each continuous covariate once")
    for col, spec in smooth.items():
        width = len(spec["knots"]) + spec["degree"] - 2
        if [k[2] for k in keys if k[:2] == ("spline", col)] != list(range(width)):
            bad(f"'columns' does not hold the {width} spline columns of {col!r} in order")
    if not isinstance(features, dict) or set(features) != {
        "n_features_in",
        "feature_names_in",
        "columns_in",
        "feature_names",
        "batch_col",
    }:
        bad(
            "'features' must hold n_features_in, feature_names_in, columns_in, "
            "feature_names and batch_col"
        )
    if not isinstance(min_rows, int) or isinstance(min_rows, bool) or min_rows < 1:
        bad(f"min_rows {min_rows!r} is not a positive integer")
    S, Q = len(sites), len(keys)
    G = arrays["xbar"].shape[-1] if arrays["xbar"].ndim == 2 else -1
    n_in = features["n_features_in"]
    if not isinstance(n_in, int) or isinstance(n_in, bool) or n_in < G or G < 1:
        bad(f"n_features_in {n_in!r} does not fit {G} features")
    for key, size, is_name in (
        ("feature_names_in", n_in, lambda v: isinstance(v, str)),
        ("columns_in", n_in, _is_label),
        ("feature_names", G, lambda v: isinstance(v, str)),
    ):
        names = features[key]
        if names is not None and (
            not isinstance(names, list) or len(names) != size or not all(map(is_name, names))
        ):
            kind = "column names (text or numbers)" if key == "columns_in" else "names as text"
            bad(f"{key} is not a list of {size} {kind}")
    if features["batch_col"] is not None and not _is_label(features["batch_col"]):
        bad(f"batch_col {features['batch_col']!r} is not a column name (text or a number)")
    shapes = {
        "n": (S,),
        "zbar": (S, Q),
        "xbar": (S, G),
        "cxx": (S, G),
        "czz": (S, Q, Q),
        "czx": (S, Q, G),
        "magnitude": (G,),
    }
    for name, shape in shapes.items():
        array = arrays[name]
        if array.dtype != np.float64:
            bad(f"{name} has dtype {array.dtype}; expected float64")
        if array.shape != shape:
            bad(f"{name} has shape {array.shape}; expected {shape}")
        if not np.isfinite(array).all():
            bad(f"{name} has NaN or infinite values")
    n = arrays["n"]
    if (n != np.round(n)).any() or (n < min_rows).any() or (n >= MAX_ROWS).any():
        bad(
            f"n holds row counts that are not whole numbers of at least min_rows={min_rows} "
            "and below 2**53"
        )
    if (arrays["cxx"] < 0).any():
        bad("cxx (sums of squares) has negative values")
    czz = arrays["czz"]
    if not np.allclose(czz, czz.transpose(0, 2, 1), rtol=1e-12, atol=0):
        bad("czz is not symmetric")
    if (np.diagonal(czz, axis1=1, axis2=2) < 0).any():
        bad("czz has negative variances")
    levels = [i for i, k in enumerate(keys) if k[0] == "level"]
    zbar = arrays["zbar"][:, levels]
    if ((zbar < 0) | (zbar > 1)).any():
        bad("zbar has level shares outside [0, 1]")
    magnitude = arrays["magnitude"]
    mantissa = np.frexp(magnitude)[0]
    if ((magnitude < 0) | ((magnitude > 0) & (mantissa != 0.5))).any():
        bad("magnitude holds values that are not powers of two")
    moments = SiteMoments(**{name: arrays[name] for name in ARRAYS})
    statistics = SiteStatistics(list(sites), keys, moments, smooth)
    return SiteSummary(statistics, dict(covariates), dict(features), min_rows)
