"""CombatEstimates: the fitted ComBat model as plain data, saved to and loaded from one file."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

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
INFO_KEYS = ("batches", "n_samples_per_batch", "ref_batch", "feature_names", "covariate_names",
             "batch_col", "categorical_cols", "continuous_cols", "categories", "eb",
             "parametric", "mean_only", "unseen_batch", "n_features_in", "feature_names_in")


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
        ``zero_variance_features``.
    info : dict
        Everything else: ``batches``, ``n_samples_per_batch``, ``ref_batch``, ``feature_names``
        (``None`` when the features had no column names: ``x0, x1, ...``),
        ``covariate_names``, the covariate columns and categories, the options ``eb``,
        ``parametric``, ``mean_only``, ``unseen_batch``, and ``n_features_in`` /
        ``feature_names_in``. Estimates made by :func:`~kwneuro_sk.harmonize_volumes` also hold
        ``volumes``: the site column name ``batch_col``, the boolean ``mask`` (voxels in
        feature order are ``mask.nonzero()``), its ``affine`` and ``shape``.

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
        with open(os.fspath(path), "wb") as file:
            np.savez(file, **arrays)

    @classmethod
    def load(cls, path):
        """Read estimates written by :meth:`save`.

        Parameters
        ----------
        path : str or path-like

        Returns
        -------
        CombatEstimates
        """
        with np.load(os.fspath(path), allow_pickle=False) as npz:
            if "__manifest__" not in npz.files:
                raise ValueError(f"{os.fspath(path)!r} is not a file written by "
                                 "CombatEstimates.save (no manifest)")
            manifest = json.loads(str(npz["__manifest__"]))
            if manifest.get("format") != _FORMAT or manifest.get("version") != _VERSION:
                raise ValueError(f"{os.fspath(path)!r} holds format "
                                 f"{manifest.get('format')!r} version {manifest.get('version')}"
                                 f"; this kwneuro_sk reads {_FORMAT!r} version {_VERSION}")
            loaded = cls(estimates=_decode(manifest["estimates"], npz),
                         info=_decode(manifest["info"], npz))
        return loaded.check(source=os.fspath(path))

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
        sizes = {"batches": len(info["batches"]), "features": None,
                 "covariates": len(info["covariate_names"])}
        sizes["features"] = np.shape(self.estimates["grand_mean"])[0] if np.ndim(
            self.estimates["grand_mean"]) == 1 else fail("estimates['grand_mean']",
                                                         "must be 1-D")
        for key, dims in FITTED_ARRAYS.items():
            value = np.asarray(self.estimates[key])
            expected = tuple(sizes[d] for d in dims)
            if value.shape != expected:
                fail(f"estimates[{key!r}]", f"has shape {value.shape}; expected {expected} "
                     f"({' x '.join(dims)})")
            kind = "b" if key == "zero_variance_features" else "f"
            if value.dtype.kind != kind and not (kind == "f" and value.dtype.kind in "iu"):
                fail(f"estimates[{key!r}]", f"has dtype {value.dtype}")
        for key in ("grand_mean", "var_pooled", "beta", "gamma_star", "delta_star"):
            if not np.isfinite(self.estimates[key]).all():
                fail(f"estimates[{key!r}]", "has NaN or infinite values")
        if (np.asarray(self.estimates["delta_star"]) <= 0).any():
            fail("estimates['delta_star']", "has values <= 0 (site variances must be > 0)")
        if (np.asarray(self.estimates["var_pooled"]) < 0).any():
            fail("estimates['var_pooled']", "has negative values")
        if len(info["n_samples_per_batch"]) != sizes["batches"]:
            fail("info['n_samples_per_batch']", "has not one count per site")
        names = info["feature_names"]
        if names is not None and len(names) != sizes["features"]:
            fail("info['feature_names']", f"has {len(names)} names for {sizes['features']} "
                 "features")
        if len(info["categories"]) != len(info["categorical_cols"]):
            fail("info['categories']", "has not one list of levels per categorical column")
        n_encoded = sum(len(c) - 1 for c in info["categories"]) + len(info["continuous_cols"])
        if n_encoded != sizes["covariates"]:
            fail("info['covariate_names']", f"has {sizes['covariates']} names for "
                 f"{n_encoded} encoded covariate columns")
        for key in ("eb", "parametric", "mean_only"):
            if not isinstance(info[key], (bool, np.bool_)):
                fail(f"info[{key!r}]", f"must be true or false; got {info[key]!r}")
        if info["unseen_batch"] not in ("error", "adapt"):
            fail("info['unseen_batch']", f"must be 'error' or 'adapt'; got "
                 f"{info['unseen_batch']!r}")
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
        out = {"batches": np.array(self.info["batches"], copy=True),
               "var.pooled": np.array(e["var_pooled"], dtype=np.float64)[:, None],
               "stand.mean": np.array(e["grand_mean"], dtype=np.float64)[:, None],
               "gamma.star": np.array(e["gamma_star"], copy=True),
               "delta.star": np.array(e["delta_star"], copy=True),
               "beta": np.array(e["beta"], copy=True)}
        for key in ("gamma_hat", "delta_hat", "gamma_bar", "t2", "a_prior", "b_prior"):
            out[key] = np.array(e[key], copy=True)
        return out

    def apply_volumes(self, volumes, covars, *, unseen_batch="error",
                      preserve_out_of_mask=False, output_dir=None, chunk_size=None, n_jobs=None,
                      verbose=0):
        """Harmonize new subjects' volumes with these estimates (from ``harmonize_volumes``).

        Each volume is harmonized with its own covariates, exactly as it would have been in the
        fitted cohort; nothing is re-estimated for sites seen in the fit.

        Parameters
        ----------
        volumes : sequence of str, path-like or nibabel images
            3-D images on the grid of the fitted mask.
        covars : pandas.DataFrame
            One row per volume, with the site column and the covariate columns of the fit.
        unseen_batch : {"error", "adapt"}, default="error"
            Sites not seen in the fit: raise a ValueError naming them, or estimate their
            location and scale from their volumes in this call (see
            :class:`~kwneuro_sk.CombatHarmonizer`).
        preserve_out_of_mask : bool, default=False
            Keep the input values outside the mask instead of 0.
        output_dir : str or path-like, default=None
            Stream: read, harmonize and write one chunk of volumes at a time into this
            directory and return the written paths (naming rule and memory budget in
            :func:`~kwneuro_sk.harmonize_volumes`). Sites unseen in the fit cannot be adapted
            this way.
        chunk_size, n_jobs, verbose
            Streaming options, as in :func:`~kwneuro_sk.harmonize_volumes`.

        Returns
        -------
        list of nibabel images, or list of str with ``output_dir``
            float32, with each input's affine and header.

        Examples
        --------
        >>> import numpy as np, pandas as pd, nibabel as nib
        >>> from kwneuro_sk import harmonize_volumes
        >>> rng = np.random.default_rng(0)
        >>> covars = pd.DataFrame({"site": np.repeat(["a", "b"], 5)})
        >>> imgs = [nib.Nifti1Image(rng.normal(size=(4, 4, 4)), np.eye(4)) for _ in range(10)]
        >>> mask = nib.Nifti1Image(np.ones((4, 4, 4), dtype=np.uint8), np.eye(4))
        >>> out, est = harmonize_volumes(imgs, covars, "site", mask)
        >>> (again,) = est.apply_volumes(imgs[:1], covars.iloc[:1])  # one new subject alone
        >>> bool(np.allclose(again.get_fdata(), out[0].get_fdata()))
        True
        """
        # The one reference from the model to the image layer: the public function does the
        # work, this method is its spelling on the estimates.
        from kwneuro_sk.volumes import apply_volumes

        return apply_volumes(self, volumes, covars, unseen_batch=unseen_batch,
                             preserve_out_of_mask=preserve_out_of_mask, output_dir=output_dir,
                             chunk_size=chunk_size, n_jobs=n_jobs, verbose=verbose)


# ------------------------------------------------------------------------------------------
# file format: arrays as npz members, everything else as JSON with placeholders for arrays
# ------------------------------------------------------------------------------------------


def _encode(value, arrays, where):
    """JSON-able form of ``value``; arrays go to ``arrays`` and leave a placeholder."""
    if isinstance(value, dict):
        return {"__dict__": [[_encode(k, arrays, where), _encode(v, arrays, f"{where}.{k}")]
                             for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.ndarray):
        as_objects = value.dtype == object
        stored = np.array(value.tolist()) if as_objects and value.size else value
        if as_objects and not value.size:
            stored = np.empty(value.shape, dtype=np.str_)
        if stored.dtype.kind not in "biufcUS":
            raise TypeError(f"cannot save {where}: array of {value.dtype} with elements of "
                            "mixed or unsupported types")
        key = f"a{len(arrays)}"
        arrays[key] = stored
        return {"__array__": key, "object": bool(as_objects)}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot save {where}: values of type {type(value).__name__} are not "
                    "supported (arrays, numbers, strings, lists, dicts and None are)")


def _decode(value, npz):
    if isinstance(value, list):
        return [_decode(v, npz) for v in value]
    if isinstance(value, dict):
        if "__array__" in value:
            array = npz[value["__array__"]]
            return array.astype(object) if value["object"] else array
        return {_decode(k, npz): _decode(v, npz) for k, v in value["__dict__"]}
    return value
