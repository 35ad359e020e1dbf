"""Image input handling for the maskers: collections of images, loading, grids, resampling.

Loading goes through nibabel: ``.nii.gz`` files are read in one go and parsed with
``Nifti*Image.from_bytes``, other files with ``nibabel.load``; ``np.asanyarray(dataobj)`` then
scales the data. Resampling and smoothing go through nilearn.
"""

from __future__ import annotations

import gzip
import os
import zlib

import nibabel as nib
import numpy as np
import pandas as pd
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import SpatialImage
from nilearn.image import resample_img, smooth_img

IMAGE_TYPES = (str, os.PathLike, SpatialImage)


def as_image_list(X, *, name="X") -> list:
    """Turn the accepted containers of images into a plain list.

    Accepts one image (path, ``os.PathLike`` or nibabel image), a list, tuple, 1-D object
    array, pandas Series, or a one-column DataFrame / 2-D array (as a ``ColumnTransformer``
    passes when the column is selected with a list). Does not read any file.
    """
    if isinstance(X, IMAGE_TYPES):
        return [X]
    if isinstance(X, pd.DataFrame):
        if X.shape[1] != 1:
            raise ValueError(
                f"{name} is a DataFrame with {X.shape[1]} columns; pass the single column "
                "that holds the images (e.g. df['img'])."
            )
        return list(X.iloc[:, 0])
    if isinstance(X, pd.Series):
        return list(X)
    if isinstance(X, np.ndarray):
        if X.dtype.kind not in "OUS":
            raise TypeError(
                f"{name} is a numeric array of shape {X.shape}; expected images (paths or "
                "nibabel images), not image data. Wrap arrays in nibabel.Nifti1Image."
            )
        if X.ndim == 2 and X.shape[1] == 1:
            X = X[:, 0]
        if X.ndim == 0:
            return [X.item()]
        if X.ndim != 1:
            raise ValueError(f"{name} must be a 1-D collection of images, got shape {X.shape}.")
        return list(X)
    if isinstance(X, (list, tuple)):
        return list(X)
    raise TypeError(
        f"{name} must be an image or a list, tuple, 1-D array or pandas Series of images "
        f"(paths or nibabel images), got {type(X).__name__}."
    )


def describe(source, index=None) -> str:
    """Short human-readable name of an image source for error messages."""
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fspath(source))
    where = f" #{index}" if index is not None else ""
    return f"in-memory image{where}"


def load_image(source, *, name="image") -> SpatialImage:
    """Open an image from a path or pass a nibabel image through; read the header only.

    Raises FileNotFoundError (naming the path) for a missing file, ValueError for a file
    nibabel cannot read and TypeError for anything that is not an image.
    """
    if isinstance(source, SpatialImage):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{name} file not found: {path!r}")
        try:
            if path.endswith(".nii.gz"):
                img = _load_compressed_nifti(path)
                if img is not None:
                    return img
            return nib.load(path)
        except (ImageFileError, OSError, EOFError, ValueError, zlib.error) as error:
            raise ValueError(
                f"{name} {path!r} is not a readable neuroimaging file: {error}"
            ) from error
    raise TypeError(
        f"{name} must be a path, os.PathLike or nibabel image, got {type(source).__name__}."
    )


def _load_compressed_nifti(path):
    """Read a .nii.gz file in one go: one read, one C-speed decompression, no streaming.

    nibabel's streaming gzip reader spends a fifth of its time in Python-level buffering; here
    the file is read once and decompressed in memory, then nibabel parses the bytes
    (``Nifti1Image.from_bytes``). Returns None for files that are not NIfTI-1/2 single files,
    which then go through ``nibabel.load``.
    """
    with open(path, "rb") as f:
        raw = gzip.decompress(f.read())
    sizeof_hdr = {int.from_bytes(raw[:4], order) for order in ("little", "big")}
    for size, image_class in ((348, nib.Nifti1Image), (540, nib.Nifti2Image)):
        if size in sizeof_hdr:
            return image_class.from_bytes(raw)
    return None


def volume_data(img, *, name="image", allow_4d=False) -> np.ndarray:
    """Read the data of a loaded image once, as an (x, y, z, n_vols) array.

    3D images and 4D images with one volume give ``n_vols == 1``; other 4D images are
    refused unless ``allow_4d``. The header shape is checked before any data is read.
    """
    shape = img.shape
    if len(shape) == 4 and (shape[3] == 1 or allow_4d):
        pass
    elif len(shape) == 4:
        raise ValueError(
            f"{name} is 4D with {shape[3]} volumes; transform expects one 3D image per "
            "subject. Use LabelsMasker.transform_imgs for 4D time series."
        )
    elif len(shape) != 3:
        raise ValueError(f"{name} must be a 3D image, got shape {shape}.")
    data = np.asanyarray(img.dataobj)
    if data.dtype.kind not in "biuf":
        raise TypeError(f"{name} has non-numeric data of dtype {data.dtype}.")
    return data.reshape(shape[:3] + (-1,), order="F")


def flat_voxels(data) -> np.ndarray:
    """(x, y, z, n_vols) -> (n_voxels, n_vols), voxels in Fortran order (a view for NIfTI)."""
    return data.reshape((-1, data.shape[3]), order="F")


def atlas_data(img, *, name="labels_img") -> np.ndarray:
    """3D data of an atlas or mask image (4D with a single volume accepted)."""
    shape = img.shape
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
        raise ValueError(f"{name} must be a 3D image, got shape {shape}.")
    data = np.asanyarray(img.dataobj).reshape(shape[:3], order="F")
    if data.dtype.kind not in "biuf":
        raise TypeError(f"{name} has non-numeric data of dtype {data.dtype}.")
    return data


def grid_of(img):
    """(shape, affine) of the spatial grid of an image."""
    return tuple(int(n) for n in img.shape[:3]), np.asarray(img.affine, dtype=np.float64)


def same_grid(grid_a, grid_b) -> bool:
    """Whether two (shape, affine) grids are the same (affines compared to 1e-6)."""
    return grid_a[0] == grid_b[0] and np.allclose(grid_a[1], grid_b[1], atol=1e-6)


def grid_key(grid) -> tuple:
    """Hashable key of a grid, for caches."""
    return grid[0], np.round(grid[1], 6).tobytes()


def resample_to_grid(img, grid, *, interpolation):
    """Resample an image onto a (shape, affine) grid with nilearn."""
    return resample_img(
        img,
        target_affine=grid[1],
        target_shape=grid[0],
        interpolation=interpolation,
        force_resample=True,
        copy_header=True,
    )


def smooth(img, fwhm):
    """Gaussian smoothing along the three spatial axes, with nilearn."""
    return smooth_img(img, fwhm)


def as_nifti(data, affine) -> nib.Nifti1Image:
    """Wrap an array into an in-memory NIfTI image (booleans as uint8; int64 kept)."""
    if data.dtype == bool:
        data = data.astype(np.uint8)
    return nib.Nifti1Image(data, affine, dtype=data.dtype)
