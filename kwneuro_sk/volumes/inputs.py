"""What the voxel-wise routes (in memory and streamed) share: opening the volumes, the mask and
the covariate table with their checks, and turning in-mask values back into images."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from kwneuro_sk import images


@dataclass
class Volume:
    """One input volume: its name in messages, the image (header read, data not yet) and, for
    kwneuro resources, the in-memory resource that is the template of the output."""

    name: str
    image: object
    resource: object = None


def output_dtype(dtype):
    try:
        resolved = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"dtype must be numpy.float32 or numpy.float64; got {dtype!r}") from exc
    if resolved not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be numpy.float32 or numpy.float64; got {resolved}")
    return resolved


def model_grid(estimates):
    """The voxel grid of estimates made by harmonize_volumes, checked: ``mask`` (bool),
    ``shape`` (tuple), ``affine`` (4 x 4 float) and ``batch_col``."""
    grid = estimates.info.get("volumes") if isinstance(estimates.info, dict) else None
    if grid is None:
        raise ValueError(
            "these estimates were not made by harmonize_volumes (no mask in "
            "info['volumes']); use CombatHarmonizer.from_estimates(estimates)"
            ".transform(...) for feature matrices"
        )
    mask = np.asarray(grid["mask"], dtype=bool)
    shape = tuple(int(n) for n in grid["shape"])
    n_features = int(estimates.info["n_features_in"])
    if mask.shape != shape or int(mask.sum()) != n_features:
        raise ValueError(
            "invalid ComBat model: info['volumes'] has a mask that does not match "
            f"its shape {shape} or the model's {n_features} voxels"
        )
    return {
        "mask": mask,
        "shape": shape,
        "affine": np.asarray(grid["affine"], float),
        "batch_col": grid["batch_col"],
    }


def open_volumes(volumes, *, minimum, reference=None):
    """Every volume opened (headers only for paths), 3-D, all in one space: that of volume 0,
    or ``reference`` ((shape, affine), name) when given."""
    if images.is_image(volumes):
        raise TypeError(
            "volumes must be a sequence of images or paths (one per subject); got a single image"
        )
    sources = []
    for i, source in enumerate(volumes):
        name = f"volume {i}" + (
            f" ({os.fspath(source)!r})" if isinstance(source, (str, os.PathLike)) else ""
        )
        resource = images.loaded_resource(source) if images.is_volume_resource(source) else None
        img = images.load_image(source if resource is None else resource, name=name)
        if len(img.shape) != 3:
            raise ValueError(f"{name} has shape {img.shape}; volumes must be 3-D")
        sources.append(Volume(name, img, resource))
    if len(sources) < minimum:
        raise ValueError(f"need at least {minimum} volume(s); got {len(sources)}")
    grid, grid_name = reference or (images.grid_of(sources[0].image), "volume 0")
    for volume in sources:
        if images.grid_of(volume.image)[0] != grid[0]:
            raise ValueError(
                f"{volume.name} has shape {volume.image.shape} but {grid_name} has "
                f"shape {grid[0]}; all volumes must be on one grid"
            )
        images.check_same_space(
            images.grid_of(volume.image), grid, name=volume.name, reference_name=grid_name
        )
    return sources


def load_mask(mask, first):
    source = images.loaded_resource(mask)
    mask_img = images.load_image(source, name="mask")
    grid = images.grid_of(first.image)
    if tuple(mask_img.shape) != grid[0]:
        raise ValueError(f"mask has shape {mask_img.shape} but the volumes have shape {grid[0]}")
    images.check_same_space(images.grid_of(mask_img), grid, name="mask", reference_name=first.name)
    mask_array = images.read_data(mask_img, name="mask") > 0
    if not mask_array.any():
        raise ValueError("mask has no voxels > 0; nothing to harmonize")
    return mask_array, mask_img


def check_covars(covars, n_volumes, batch_col):
    if not isinstance(covars, pd.DataFrame):
        raise TypeError(f"covars must be a pandas DataFrame; got {type(covars).__name__}")
    if len(covars) != n_volumes:
        raise ValueError(
            f"covars has {len(covars)} rows for {n_volumes} volumes; give one row "
            "per volume, in the same order"
        )
    if batch_col not in covars.columns:
        raise ValueError(
            f"column(s) {[batch_col]} not found in covars (columns: {list(covars.columns)})"
        )
    if int((covars.columns == batch_col).sum()) > 1:
        raise ValueError(
            f"covars has more than one column named {batch_col!r} (batch_col); give the "
            "sites one column"
        )
    return covars.reset_index(drop=True)


def read_in_mask(sources, mask, preserve_out_of_mask, dtype):
    """Read each volume once: its in-mask voxels into a (subjects x voxels) matrix, and, with
    ``preserve_out_of_mask``, the whole volume as the start of its output."""
    X = np.empty((len(sources), int(mask.sum())), dtype=dtype)
    kept = []
    for i, volume in enumerate(sources):
        data = images.read_data(volume.image, name=volume.name)
        X[i] = data[mask]
        if not np.isfinite(X[i]).all():
            raise ValueError(
                f"{volume.name} has {int((~np.isfinite(X[i])).sum())} NaN or "
                "infinite voxel(s) inside the mask; ComBat needs finite values "
                "(fix the volume or exclude those voxels from the mask)"
            )
        # a new array when kept, so that in-memory inputs are never changed
        kept.append(data.astype(dtype, copy=True) if preserve_out_of_mask else None)
    return X, kept


def outputs(sources, kept, harmonized, mask):
    """One image per input, of the input's kind, harmonized inside the mask."""
    result = []
    for volume, data, values in zip(sources, kept, harmonized):
        if data is None:
            data = np.zeros(mask.shape, dtype=harmonized.dtype)
        data[mask] = values
        if volume.resource is not None:
            result.append(images.resource_like(volume.resource, data))
            continue
        img = volume.image
        out = type(img)(data, img.affine, img.header)
        out.set_data_dtype(data.dtype)
        result.append(out)
    return result
