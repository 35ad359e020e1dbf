"""Voxel-wise ComBat on NIfTI images: ``harmonize_volumes`` and the estimates it returns.

The in-mask voxels of every volume are read once into one float32 matrix (subjects x voxels,
the orientation of :class:`~kwneuro_sk.CombatHarmonizer`), harmonized, and written back into
float32 images that keep each input's affine and header.
"""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pandas as pd

from kwneuro_sk.combat.estimates import CombatEstimates
from kwneuro_sk.combat.harmonizer import CombatHarmonizer, _column_list

__all__ = ["CombatEstimates", "harmonize_volumes"]


def harmonize_volumes(volumes, covars, batch_col, mask, *, categorical_cols=None,
                      continuous_cols=None, eb=True, parametric=True, mean_only=False,
                      ref_batch=None, preserve_out_of_mask=False):
    """Remove site effects voxel by voxel from 3-D images with ComBat.

    Every voxel where ``mask > 0`` is a feature; each volume is a subject. The site and
    covariate effects are estimated by :class:`~kwneuro_sk.CombatHarmonizer` with the given
    options, and the returned :class:`CombatEstimates` can harmonize new subjects later
    (:meth:`CombatEstimates.apply_volumes`), also after :meth:`CombatEstimates.save`.

    Parameters
    ----------
    volumes : sequence of str, path-like or nibabel images
        At least 2 three-dimensional images on one voxel grid (same shape).
    covars : pandas.DataFrame
        One row per volume, in the order of ``volumes``, holding ``batch_col`` and the
        covariate columns.
    batch_col : hashable
        Column of ``covars`` with the site (scanner) of each volume; at least 2 sites.
    mask : str, path-like or nibabel image
        3-D image of the volumes' shape; voxels > 0 are harmonized.
    categorical_cols, continuous_cols : str or list of str, default=None
        Covariates of ``covars`` whose effects are preserved.
    eb, parametric, mean_only, ref_batch
        ComBat options, as in :class:`~kwneuro_sk.CombatHarmonizer`.
    preserve_out_of_mask : bool, default=False
        Keep the input values outside the mask (as float32) instead of setting them to 0.

    Returns
    -------
    harmonized : list of nibabel images
        One per input volume, float32 data (never rounded to the input's integer type), with
        the input's affine and header.
    estimates : CombatEstimates
        The fitted model; ``info["volumes"]`` holds the site column, mask and affine.

    Notes
    -----
    Numbers equal neuroCombat's on the matrix of in-mask voxels (to float32 rounding of the
    output). Memory: one float32 matrix of in-mask voxels x subjects for the input and one for
    the result, plus the output images; the files are read once.

    Examples
    --------
    >>> import numpy as np, pandas as pd, nibabel as nib
    >>> from kwneuro_sk import harmonize_volumes
    >>> rng = np.random.default_rng(0)
    >>> site = np.repeat(["a", "b"], 5)
    >>> offset = np.where(site == "a", 0.0, 3.0)
    >>> imgs = [nib.Nifti1Image(rng.normal(size=(4, 4, 4)) + o, np.eye(4)) for o in offset]
    >>> mask = nib.Nifti1Image(np.ones((4, 4, 4), dtype=np.uint8), np.eye(4))
    >>> out, est = harmonize_volumes(imgs, pd.DataFrame({"site": site}), "site", mask)
    >>> out[0].shape, out[0].get_data_dtype()
    ((4, 4, 4), dtype('<f4'))
    >>> means = [img.get_fdata().mean() for img in out]
    >>> bool(abs(np.mean(means[:5]) - np.mean(means[5:])) < 0.5)
    True
    """
    images = _load_volumes(volumes)
    mask_array, mask_img = _load_mask(mask, images[0].shape)
    covars = _check_covars(covars, len(images), batch_col,
                           _column_list(categorical_cols, "categorical_cols")
                           + _column_list(continuous_cols, "continuous_cols"))
    sites = pd.unique(covars[batch_col])
    if len(sites) < 2:
        raise ValueError(f"harmonize_volumes needs volumes from at least 2 sites in column "
                         f"{batch_col!r}; all {len(images)} are from site {sites[0]!r}")
    X, outputs = _read_in_mask(images, mask_array, preserve_out_of_mask)
    combat = CombatHarmonizer(categorical_cols=categorical_cols, continuous_cols=continuous_cols,
                              eb=eb, parametric=parametric, mean_only=mean_only,
                              ref_batch=ref_batch)
    harmonized = combat.fit_transform(X, batch=covars[batch_col], covariates=covars)
    del X
    estimates = combat.estimates_
    estimates.info["volumes"] = {"batch_col": batch_col, "mask": mask_array,
                                 "affine": np.asarray(mask_img.affine, dtype=np.float64),
                                 "shape": list(mask_array.shape)}
    return _images(images, outputs, harmonized, mask_array), estimates


def _apply_volumes(estimates, volumes, covars, *, unseen_batch, preserve_out_of_mask):
    """:meth:`CombatEstimates.apply_volumes` (documented there)."""
    grid = estimates.info.get("volumes")
    if grid is None:
        raise ValueError("these estimates were not made by harmonize_volumes (no mask in "
                         "info['volumes']); use CombatHarmonizer.from_estimates(estimates)"
                         ".transform(...) for feature matrices")
    combat = CombatHarmonizer.from_estimates(estimates).set_params(unseen_batch=unseen_batch)
    mask_array = np.asarray(grid["mask"], dtype=bool)
    batch_col = grid["batch_col"]
    images = _load_volumes(volumes, minimum=1)
    if images[0].shape != mask_array.shape:
        raise ValueError(f"volume 0 has shape {images[0].shape} but the fitted mask has shape "
                         f"{mask_array.shape}")
    categorical, continuous = combat._covariate_columns()
    covars = _check_covars(covars, len(images), batch_col, categorical + continuous)
    X, outputs = _read_in_mask(images, mask_array, preserve_out_of_mask)
    harmonized = combat.transform(X, batch=covars[batch_col], covariates=covars)
    return _images(images, outputs, harmonized, mask_array)


# ------------------------------------------------------------------------------------------
# input checks and I/O
# ------------------------------------------------------------------------------------------


def _load_image(img, what):
    if isinstance(img, (str, os.PathLike)):
        try:
            return nib.load(img)
        except FileNotFoundError as exc:
            raise ValueError(f"{what}: file {os.fspath(img)!r} not found") from exc
    if isinstance(img, nib.spatialimages.SpatialImage):
        return img
    raise TypeError(f"{what} must be a file path or a nibabel image; got {type(img).__name__}")


def _load_volumes(volumes, minimum=2):
    """Image objects (headers only for paths) for every volume, all 3-D of one shape."""
    if isinstance(volumes, (str, os.PathLike, nib.spatialimages.SpatialImage)):
        raise TypeError("volumes must be a sequence of images or paths (one per subject); got "
                        "a single image")
    images = [_load_image(v, f"volume {i}") for i, v in enumerate(volumes)]
    if len(images) < minimum:
        raise ValueError(f"need at least {minimum} volume(s); got {len(images)}")
    for i, img in enumerate(images):
        if len(img.shape) != 3:
            raise ValueError(f"volume {i} has shape {img.shape}; volumes must be 3-D")
        if img.shape != images[0].shape:
            raise ValueError(f"volume {i} has shape {img.shape} but volume 0 has shape "
                             f"{images[0].shape}; all volumes must be on one grid")
    return images


def _load_mask(mask, shape):
    mask_img = _load_image(mask, "mask")
    if mask_img.shape != shape:
        raise ValueError(f"mask has shape {mask_img.shape} but the volumes have shape {shape}")
    mask_array = np.asarray(mask_img.dataobj) > 0
    if not mask_array.any():
        raise ValueError("mask has no voxels > 0; nothing to harmonize")
    return mask_array, mask_img


def _check_covars(covars, n_volumes, batch_col, covariate_cols):
    if not isinstance(covars, pd.DataFrame):
        raise TypeError(f"covars must be a pandas DataFrame; got {type(covars).__name__}")
    if len(covars) != n_volumes:
        raise ValueError(f"covars has {len(covars)} rows for {n_volumes} volumes; give one row "
                         "per volume, in the same order")
    if batch_col in covariate_cols:
        raise ValueError(f"batch_col {batch_col!r} is also named as a covariate")
    missing = [c for c in [batch_col, *covariate_cols] if c not in covars.columns]
    if missing:
        raise ValueError(f"column(s) {missing} not found in covars (columns: "
                         f"{list(covars.columns)})")
    return covars.reset_index(drop=True)


def _read_in_mask(images, mask, preserve_out_of_mask):
    """Read each image once: in-mask voxels into a float32 (subjects x voxels) matrix, and the
    float32 output volume (zeros, or the input values to keep outside the mask)."""
    X = np.empty((len(images), int(mask.sum())), dtype=np.float32)
    outputs = []
    for i, img in enumerate(images):
        # a copy when it becomes an output, so that in-memory inputs are never changed
        data = (np.array if preserve_out_of_mask else np.asarray)(img.dataobj, dtype=np.float32)
        X[i] = data[mask]
        if not np.isfinite(X[i]).all():
            raise ValueError(f"volume {i} has {int((~np.isfinite(X[i])).sum())} NaN or "
                             "infinite voxel(s) inside the mask; ComBat needs finite values "
                             "(fix the volume or exclude those voxels from the mask)")
        outputs.append(data if preserve_out_of_mask else None)
    return X, outputs


def _images(images, outputs, harmonized, mask):
    """One float32 image per input, with its affine and header, harmonized inside the mask."""
    result = []
    for img, data, values in zip(images, outputs, harmonized):
        if data is None:
            data = np.zeros(mask.shape, dtype=harmonized.dtype)
        data[mask] = values
        out = type(img)(data, img.affine, img.header)
        out.set_data_dtype(data.dtype)
        result.append(out)
    return result
