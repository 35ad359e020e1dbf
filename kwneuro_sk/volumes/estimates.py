"""Fitted voxel-wise models and their use on images: :class:`VolumeEstimates` and
:func:`apply_volumes`.

A model file (:class:`~kwneuro_sk.CombatEstimates`) holds data only; what a voxel-wise model
does with images lives here, in the image layer, so that the model layer never imports it.
"""

from __future__ import annotations

import numpy as np
from sklearn.utils._param_validation import StrOptions, validate_params

from kwneuro_sk._params import N_JOBS
from kwneuro_sk.combat.estimates import CombatEstimates
from kwneuro_sk.combat.harmonizer import CombatHarmonizer
from kwneuro_sk.volumes import inputs
from kwneuro_sk.volumes import streaming as _streaming
from kwneuro_sk.volumes.maps import site_effect_maps

__all__ = ["VolumeEstimates", "apply_volumes"]


class VolumeEstimates(CombatEstimates, info_key="volumes"):
    """ComBat estimates of a voxel-wise fit, with what they can do on images.

    Returned by :func:`~kwneuro_sk.harmonize_volumes`; any estimates whose ``info`` holds
    ``volumes`` (the site column, the mask, its affine and shape) are of this class, whether
    read by :meth:`CombatEstimates.load` or made as ``CombatEstimates(estimates, info)``. A
    :class:`~kwneuro_sk.CombatEstimates` in every other respect (same fields, same file).

    Parameters
    ----------
    estimates, info : dict
        As in :class:`~kwneuro_sk.CombatEstimates`; ``info`` holds ``volumes``.

    Examples
    --------
    >>> import numpy as np, pandas as pd, nibabel as nib
    >>> from kwneuro_sk import VolumeEstimates, harmonize_volumes
    >>> rng = np.random.default_rng(0)
    >>> covars = pd.DataFrame({"site": np.repeat(["a", "b"], 5)})
    >>> imgs = [nib.Nifti1Image(rng.normal(size=(4, 4, 4)), np.eye(4)) for _ in range(10)]
    >>> mask = nib.Nifti1Image(np.ones((4, 4, 4), dtype=np.uint8), np.eye(4))
    >>> out, est = harmonize_volumes(imgs, covars, "site", mask)
    >>> isinstance(est, VolumeEstimates), est.info["volumes"]["shape"]
    (True, [4, 4, 4])
    """

    def apply_volumes(
        self,
        volumes,
        covars,
        *,
        unseen_batch="error",
        preserve_out_of_mask=False,
        dtype=np.float32,
        output_dir=None,
        chunk_size=None,
        n_jobs=None,
        verbose=0,
    ):
        """Harmonize new subjects' volumes with these estimates.

        Each volume is harmonized with its own covariates, exactly as it would have been in the
        fitted cohort; nothing is re-estimated for sites seen in the fit. The same as
        :func:`kwneuro_sk.volumes.apply_volumes` with these estimates first.

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
        dtype : {numpy.float32, numpy.float64}, default=numpy.float32
            Data type of the output images (as in :func:`~kwneuro_sk.harmonize_volumes`).
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
            Of ``dtype``, with each input's affine and header.

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
        >>> est.apply_volumes(imgs[:1], covars.iloc[:1], dtype=np.float64)[0].get_data_dtype()
        dtype('<f8')
        """
        return apply_volumes(
            self,
            volumes,
            covars,
            unseen_batch=unseen_batch,
            preserve_out_of_mask=preserve_out_of_mask,
            dtype=dtype,
            output_dir=output_dir,
            chunk_size=chunk_size,
            n_jobs=n_jobs,
            verbose=verbose,
        )

    def site_effect_maps(self, output_dir=None):
        """gamma*, delta* of each site and the pooled standard deviation as NIfTI images in
        the input space: :func:`kwneuro_sk.volumes.site_effect_maps` of these estimates.

        Parameters
        ----------
        output_dir : str or path-like, default=None
            Write ``<name>.nii.gz`` files there (all or nothing) and return their paths.

        Returns
        -------
        dict
            Map name (``gamma_star_<site>``, ``delta_star_<site>``, ``sigma``) -> image, or
            path with ``output_dir``.
        """
        return site_effect_maps(self, output_dir=output_dir)


@validate_params(
    {
        "n_jobs": N_JOBS,
        "verbose": ["verbose"],
        "unseen_batch": [StrOptions({"error", "adapt"})],
    },
    prefer_skip_nested_validation=True,
)
def apply_volumes(
    estimates,
    volumes,
    covars,
    *,
    unseen_batch="error",
    preserve_out_of_mask=False,
    dtype=np.float32,
    output_dir=None,
    chunk_size=None,
    n_jobs=None,
    verbose=0,
):
    """Harmonize new subjects' volumes with estimates made by
    :func:`~kwneuro_sk.harmonize_volumes`.

    The same as :meth:`VolumeEstimates.apply_volumes` (documented there), for any
    :class:`~kwneuro_sk.CombatEstimates` that holds ``info['volumes']``.

    Parameters
    ----------
    estimates : CombatEstimates
    volumes, covars, unseen_batch, preserve_out_of_mask, dtype
        As in :meth:`VolumeEstimates.apply_volumes`.
    output_dir, chunk_size, n_jobs, verbose
        Streaming, as in :func:`~kwneuro_sk.harmonize_volumes` (one pass over the files; sites
        unseen in the fit with ``unseen_batch="adapt"`` need the in-memory path).

    Returns
    -------
    list of images, or list of str with ``output_dir``

    Examples
    --------
    >>> import numpy as np, pandas as pd, nibabel as nib
    >>> from kwneuro_sk import harmonize_volumes
    >>> from kwneuro_sk.volumes import apply_volumes
    >>> rng = np.random.default_rng(0)
    >>> covars = pd.DataFrame({"site": np.repeat(["a", "b"], 5)})
    >>> imgs = [nib.Nifti1Image(rng.normal(size=(4, 4, 4)), np.eye(4)) for _ in range(10)]
    >>> mask = nib.Nifti1Image(np.ones((4, 4, 4), dtype=np.uint8), np.eye(4))
    >>> out, est = harmonize_volumes(imgs, covars, "site", mask)
    >>> (again,) = apply_volumes(est, imgs[:1], covars.iloc[:1])
    >>> bool(np.array_equal(again.get_fdata(), out[0].get_fdata()))
    True
    """
    grid = inputs.model_grid(estimates)
    dtype = inputs.output_dtype(dtype)
    combat = CombatHarmonizer.from_estimates(estimates).set_params(unseen_batch=unseen_batch)
    mask_array = grid["mask"]
    fitted_grid = (grid["shape"], grid["affine"])
    longitudinal = combat.get_params()["subject_col"] is not None
    if output_dir is not None and longitudinal:
        raise ValueError(
            "apply_volumes(output_dir=...) streams the volumes, which longitudinal models "
            "(subject_col) do not support: a new subject's random effect is predicted from all "
            "of its volumes at once; leave output_dir unset"
        )
    if output_dir is not None:
        return _streaming.apply(
            combat,
            volumes,
            covars,
            grid["batch_col"],
            mask_array,
            fitted_grid,
            dtype=dtype,
            output_dir=output_dir,
            chunk_size=chunk_size,
            n_jobs=n_jobs,
            verbose=verbose,
            preserve_out_of_mask=preserve_out_of_mask,
        )
    sources = inputs.open_volumes(volumes, minimum=1, reference=(fitted_grid, "the fitted mask"))
    covars = inputs.check_covars(covars, len(sources), grid["batch_col"])
    X, kept = inputs.read_in_mask(sources, mask_array, preserve_out_of_mask, dtype)
    subjects = None
    if longitudinal:
        subject_col = combat.get_params()["subject_col"]
        if subject_col not in covars.columns:
            raise ValueError(
                f"the model is longitudinal: covars needs its subject column {subject_col!r} "
                f"(columns: {list(covars.columns)})"
            )
        subjects = covars[subject_col]
    harmonized = combat.transform(
        X, batch=covars[grid["batch_col"]], covariates=covars, subjects=subjects
    )
    return inputs.outputs(sources, kept, harmonized, mask_array)
