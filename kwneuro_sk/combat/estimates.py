"""CombatEstimates: the fitted ComBat model as plain data, saved to and loaded from one file."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

_FORMAT = "kwneuro_sk.CombatEstimates"
_VERSION = 1


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
        Everything else: ``batches``, ``n_samples_per_batch``, ``ref_batch``, ``feature_names``,
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
            return cls(estimates=_decode(manifest["estimates"], npz),
                       info=_decode(manifest["info"], npz))

    def apply_volumes(self, volumes, covars, *, unseen_batch="error",
                      preserve_out_of_mask=False):
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

        Returns
        -------
        list of nibabel images
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
        from kwneuro_sk.volumes import _apply_volumes

        return _apply_volumes(self, volumes, covars, unseen_batch=unseen_batch,
                             preserve_out_of_mask=preserve_out_of_mask)


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
