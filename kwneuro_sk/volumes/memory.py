"""Voxel-wise ComBat on 3-D images: :func:`harmonize_volumes`.

The in-mask voxels of every volume are read once into one matrix (subjects x voxels, the
orientation of :class:`~kwneuro_sk.CombatHarmonizer`), harmonized, and written back into images
of the input's kind (nibabel images keep each input's header; kwneuro volume resources come
back as in-memory resources with the input's metadata). Reading, space checks and their errors
are those of :mod:`kwneuro_sk.images`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.utils._param_validation import validate_params

from kwneuro_sk import images
from kwneuro_sk._params import N_JOBS
from kwneuro_sk.combat.harmonizer import CombatHarmonizer
from kwneuro_sk.volumes import inputs
from kwneuro_sk.volumes import streaming as _streaming
from kwneuro_sk.volumes.estimates import VolumeEstimates

__all__ = ["harmonize_volumes"]


@validate_params({"n_jobs": N_JOBS, "verbose": ["verbose"]}, prefer_skip_nested_validation=True)
def harmonize_volumes(
    volumes,
    covars,
    batch_col,
    mask,
    *,
    categorical_cols=None,
    continuous_cols=None,
    eb=True,
    parametric=True,
    mean_only=False,
    ref_batch=None,
    preserve_out_of_mask=False,
    dtype=np.float32,
    smooth_cols=None,
    smooth_knots=5,
    smooth_degree=3,
    smooth_extrapolation="linear",
    subject_col=None,
    random_slope=None,
    sigma_method="reml",
    output_dir=None,
    chunk_size=None,
    n_jobs=None,
    verbose=0,
):
    """Remove site effects voxel by voxel from 3-D images with ComBat.

    Every voxel where ``mask > 0`` is a feature; each volume is a subject. The site and
    covariate effects are estimated by :class:`~kwneuro_sk.CombatHarmonizer` with the given
    options, and the returned :class:`~kwneuro_sk.VolumeEstimates` can harmonize new subjects
    later (:meth:`VolumeEstimates.apply_volumes`), also after :meth:`CombatEstimates.save` and
    :meth:`CombatEstimates.load`.

    The signature is that of ``kwneuro.harmonize.harmonize_volumes`` (kwneuro 1.0.0): code
    written for it runs with only the import changed.

    Parameters
    ----------
    volumes : sequence of str, path-like, nibabel images or kwneuro volume resources
        At least 2 three-dimensional images in one space (same shape and affine).
    covars : pandas.DataFrame
        One row per volume, in the order of ``volumes``, holding ``batch_col`` and the
        covariate columns.
    batch_col : hashable
        Column of ``covars`` with the site (scanner) of each volume; at least 2 sites.
    mask : str, path-like, nibabel image or kwneuro volume resource
        3-D image in the volumes' space; voxels > 0 are harmonized.
    categorical_cols, continuous_cols : str or list of str, default=None
        Covariates of ``covars`` whose effects are preserved.
    eb, parametric, mean_only, ref_batch
        ComBat options, as in :class:`~kwneuro_sk.CombatHarmonizer`.
    preserve_out_of_mask : bool, default=False
        Keep the input values outside the mask instead of setting them to 0.
    dtype : {numpy.float32, numpy.float64}, default=numpy.float32
        Data type of the computation's input matrix and of the output images. float32 halves
        the memory; float64 gives kwneuro's (neuroCombat's) numbers to double precision.
    smooth_cols : str or list of str, default=None
        Covariates of ``covars`` modelled as smooth curves (ComBat-GAM, B-splines), as in
        :class:`~kwneuro_sk.CombatHarmonizer`; the knots are stored in the estimates.
    smooth_knots : int, default=5
        Knots of each smooth covariate, as in :class:`~kwneuro_sk.CombatHarmonizer`.
    smooth_degree : int, default=3
        Degree of the B-splines, as in :class:`~kwneuro_sk.CombatHarmonizer`.
    subject_col : hashable, default=None
        Column of ``covars`` with the subject of each volume, for repeated scans of the same
        subjects: longitudinal ComBat with a random intercept per subject (see
        :class:`~kwneuro_sk.CombatHarmonizer` and the user guide, Longitudinal data). In
        memory only: with ``output_dir`` it raises a ValueError (each subject's random
        effect needs all of its volumes at once, which one pass of per-site statistics does
        not hold).
    random_slope, sigma_method
        With ``subject_col``, as in :class:`~kwneuro_sk.CombatHarmonizer`.
    smooth_extrapolation : {"linear", "constant", "error"}, default="linear"
        Smooth covariate values beyond the training range (new subjects of
        :meth:`VolumeEstimates.apply_volumes`), as in :class:`~kwneuro_sk.CombatHarmonizer`.
    output_dir : str or path-like, default=None
        Stream: write every harmonized volume to this directory as a NIfTI file and return the
        paths, in memory that does not grow with the number of subjects (see Notes). ``None``
        keeps everything in memory and returns images. All or nothing: the folder and the
        output names are checked before any volume is read, the files are written under
        temporary names and renamed when all are written; a failure removes what the call
        wrote (see :ref:`guarantees`).
    chunk_size : int, default=None
        Streaming only: subjects read and harmonized together. The default holds about
        256 MiB of in-mask float64 values (``2**25 // n_voxels`` subjects, at least 1).
    n_jobs : int, default=None
        Streaming only: chunks processed in parallel through joblib (threads by default;
        ``joblib.parallel_config(backend="dask")`` runs them on a dask cluster).
    verbose : int, default=0
        Streaming only: progress on stderr (each pass, every tenth of the volumes; more with
        ``verbose > 1``).

    Returns
    -------
    harmonized : list of images, or list of str with ``output_dir``
        One per input volume, of ``dtype`` (never rounded to the input's integer type): nibabel
        images with the input's affine and header for paths and nibabel images;
        in-memory kwneuro volume resources (with the input's metadata) for resources. With
        ``output_dir``, the paths of the written NIfTI files, in the order of ``volumes``.
    estimates : VolumeEstimates
        The fitted model (a :class:`~kwneuro_sk.CombatEstimates`); ``info["volumes"]``
        holds the site column, mask, affine and shape.

    Notes
    -----
    Numbers equal neuroCombat's on the matrix of in-mask voxels (to float32 rounding of the
    output with the default ``dtype``). Memory: one matrix of in-mask voxels x subjects for the
    input and one for the result, plus the output images; each file is read once.

    **Streaming** (``output_dir`` given) reads every file twice. The first pass accumulates,
    per site, the count, means and centred cross products of the in-mask values and the
    covariates, merged chunk by chunk with Chan's pairwise update
    (``kwneuro_sk.combat.statistics``); the ComBat fit from them is the in-memory fit
    (estimates equal to ~1e-12 relative). The second pass reads, harmonizes and writes one
    chunk of subjects at a time. Memory budget: about
    ``n_workers x (3 x chunk_size + 2) x n_voxels x 8`` bytes for the chunks in flight, plus
    ``3 x n_sites x (n_covariates + 2) x n_voxels x 8`` bytes for the statistics and the
    fitted model, independent of the number of subjects. Non-parametric EB works from the
    same statistics (its cost, O(n_voxels**2) per site, is that of the in-memory path).

    File names: a volume given as a path ``<dir>/<name>.nii[.gz]`` (or any other image
    format) is written as ``<output_dir>/<name>_harmonized.nii.gz`` (``.nii`` for ``.nii``
    inputs); an in-memory image or kwneuro resource as ``sub-<index>_harmonized.nii.gz``,
    ``<index>`` being its position in ``volumes`` (zero-padded). Two volumes that would get the
    same name, or an output that would replace an input file, raise a ValueError before
    anything is read; other existing files of those names are replaced. Each file is written
    to a temporary name in ``output_dir`` and renamed when complete, so an interrupted run
    never leaves a truncated output under its final name.

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
    dtype = inputs.output_dtype(dtype)
    options = dict(
        categorical_cols=categorical_cols,
        continuous_cols=continuous_cols,
        eb=eb,
        parametric=parametric,
        mean_only=mean_only,
        ref_batch=ref_batch,
        smooth_cols=smooth_cols,
        smooth_knots=smooth_knots,
        smooth_degree=smooth_degree,
        smooth_extrapolation=smooth_extrapolation,
    )
    if subject_col is not None:
        options.update(
            subject_col=subject_col, random_slope=random_slope, sigma_method=sigma_method
        )
        if output_dir is not None:
            raise ValueError(
                "harmonize_volumes(output_dir=...) streams the volumes through per-site "
                "statistics, which do not support subject_col (longitudinal ComBat fits each "
                "subject's random effect from all of its volumes at once); leave output_dir "
                "unset to harmonize in memory and save the images yourself"
            )
    elif random_slope is not None:
        raise ValueError(f"random_slope={random_slope!r} needs subject_col")
    if output_dir is not None:
        written, fitted = _streaming.harmonize(
            volumes,
            covars,
            batch_col,
            mask,
            dtype=dtype,
            output_dir=output_dir,
            chunk_size=chunk_size,
            n_jobs=n_jobs,
            verbose=verbose,
            preserve_out_of_mask=preserve_out_of_mask,
            options=options,
        )
        return written, VolumeEstimates(estimates=fitted.estimates, info=fitted.info)
    sources = inputs.open_volumes(volumes, minimum=2)
    mask_array, mask_img = inputs.load_mask(mask, sources[0])
    covars = inputs.check_covars(covars, len(sources), batch_col)
    sites = pd.unique(covars[batch_col])
    if len(sites) < 2:
        raise ValueError(
            f"harmonize_volumes needs volumes from at least 2 sites in column "
            f"{batch_col!r}; all {len(sources)} are from site {sites[0]!r}"
        )
    X, kept = inputs.read_in_mask(sources, mask_array, preserve_out_of_mask, dtype)
    combat = CombatHarmonizer(**options)
    subjects = None if subject_col is None else _subject_column(covars, subject_col)
    harmonized = combat.fit_transform(
        X, batch=covars[batch_col], covariates=covars, subjects=subjects
    )
    del X
    info = dict(combat.estimates_.info)
    info["volumes"] = {
        "batch_col": batch_col,
        "mask": mask_array,
        "affine": images.grid_of(mask_img)[1],
        "shape": list(mask_array.shape),
    }
    estimates = VolumeEstimates(estimates=combat.estimates_.estimates, info=info)
    return inputs.outputs(sources, kept, harmonized, mask_array), estimates


def _subject_column(covars, subject_col):
    """The subject of each volume (longitudinal ComBat), from ``covars``."""
    if subject_col not in covars.columns:
        raise ValueError(
            f"subject_col {subject_col!r} is not a column of covars "
            f"(columns: {list(covars.columns)})"
        )
    return covars[subject_col]
