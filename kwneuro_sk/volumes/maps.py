"""Site-effect maps of a voxel-wise ComBat model: where each site differs, as NIfTI images.

For each site, ``gamma_star_<site>`` is its EB-adjusted location (in units of the pooled
standard deviation: 0 is no shift) and ``delta_star_<site>`` its EB-adjusted scale (a variance
ratio: 1 is no change) at every voxel of the fitted mask; ``sigma`` is the pooled residual
standard deviation (in the units of the input images). Voxels outside the mask are 0 in every
map (so are constant voxels in ``sigma``: the model passes them through).
"""

from __future__ import annotations

import os
import re

import nibabel as nib
import numpy as np

from kwneuro_sk._files import StagedFiles
from kwneuro_sk.volumes import inputs

__all__ = ["site_effect_maps"]


def site_effect_maps(estimates, output_dir=None):
    """gamma*, delta* of each site and the pooled standard deviation as images in the input
    space of :func:`~kwneuro_sk.harmonize_volumes`.

    Parameters
    ----------
    estimates : CombatEstimates
        Made by :func:`~kwneuro_sk.harmonize_volumes` (``info['volumes']`` holds the mask
        and its affine), e.g. a :class:`~kwneuro_sk.VolumeEstimates` or a loaded model file.
    output_dir : str or path-like, default=None
        Write the maps into this folder as ``<name>.nii.gz`` (all or nothing: when one
        cannot be written, none is left) and return their paths.

    Returns
    -------
    dict
        Map name -> float32 nibabel image (or path written, with ``output_dir``): for each
        site ``gamma_star_<site>`` and ``delta_star_<site>`` (the site label with characters
        other than letters, digits, ``.``, ``_`` and ``-`` replaced by ``_``), then
        ``sigma``.

    Raises
    ------
    ValueError
        Estimates not made by ``harmonize_volumes``; two site labels that give the same file
        name; an ``output_dir`` that cannot be written.

    Examples
    --------
    >>> import numpy as np, pandas as pd, nibabel as nib
    >>> from kwneuro_sk import harmonize_volumes
    >>> from kwneuro_sk.volumes import site_effect_maps
    >>> rng = np.random.default_rng(0)
    >>> covars = pd.DataFrame({"site": np.repeat(["a", "b"], 5)})
    >>> imgs = [nib.Nifti1Image(rng.normal(size=(4, 4, 4)), np.eye(4)) for _ in range(10)]
    >>> mask = nib.Nifti1Image(np.ones((4, 4, 4), dtype=np.uint8), np.eye(4))
    >>> _, est = harmonize_volumes(imgs, covars, "site", mask)
    >>> maps = site_effect_maps(est)
    >>> sorted(maps)
    ['delta_star_a', 'delta_star_b', 'gamma_star_a', 'gamma_star_b', 'sigma']
    >>> bool(np.allclose(maps["gamma_star_b"].get_fdata()[mask.get_fdata() > 0],
    ...                  est.estimates["gamma_star"][1], atol=1e-6))
    True
    """
    grid = inputs.model_grid(estimates)
    values = estimates.estimates
    names, per_site = {}, []
    for k, site in enumerate(np.asarray(estimates.info["batches"]).tolist()):
        label = re.sub(r"[^A-Za-z0-9._-]+", "_", str(site))
        if label in names:
            raise ValueError(
                f"sites {names[label]!r} and {site!r} would both be written as maps named "
                f"{label!r}; rename one of them before fitting"
            )
        names[label] = site
        per_site.append((label, k))
    maps = {}
    for kind in ("gamma_star", "delta_star"):
        array = np.asarray(values[kind], dtype=np.float64)
        for label, k in per_site:
            maps[f"{kind}_{label}"] = array[k]
    sigma = values.get("sigma")  # absent from model files of earlier releases
    if sigma is None:
        sigma = np.sqrt(np.asarray(values["var_pooled"], dtype=np.float64))
    maps["sigma"] = np.asarray(sigma, dtype=np.float64)
    images = {name: _image(voxels, grid) for name, voxels in maps.items()}
    if output_dir is None:
        return images
    written = {}
    with StagedFiles("site_effect_maps") as staged:
        staged.make_folder(output_dir, "output_dir")
        for name, img in images.items():
            target = os.path.join(os.fspath(output_dir), f"{name}.nii.gz")
            staged.check(target, f"map {name!r}")
            nib.save(img, staged.path_for(target))
            written[name] = target
        staged.commit()
    return written


def _image(voxels, grid):
    data = np.zeros(grid["shape"], dtype=np.float32)
    data[grid["mask"]] = voxels
    img = nib.Nifti1Image(data, grid["affine"])
    img.set_data_dtype(np.float32)
    return img
