"""Reading images: the one place that opens files, names them in errors and checks spaces.

Every image that reaches kwneuro_sk (a path, an ``os.PathLike``, a nibabel image or a kwneuro
volume resource) goes through :func:`load_image`, and its voxels through :func:`read_data`, so
that one set of rules holds for the maskers and for voxel-wise harmonization alike:

- a missing file raises ``FileNotFoundError`` naming the path; a directory, a file that is not a
  neuroimaging image, or a truncated file raises ``ValueError`` naming the file;
- ``.nii.gz`` files are read in one go and parsed with ``Nifti*Image.from_bytes`` (one read, one
  C-speed decompression, with ISA-L's ``isal.igzip`` when installed), other files with
  ``nibabel.load`` (header only until the data are asked for);
- kwneuro volume resources are recognised by their public methods (``get_array``,
  ``get_affine``), so kwneuro is never imported here;
- two images are in the same space when their shapes and affines agree (the semantics of
  nilearn's ``check_same_fov``, affines compared with a tolerance), see :func:`check_same_space`.

Resampling and smoothing go through nilearn.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import threading
import zlib

import nibabel as nib
import numpy as np
import pandas as pd
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError, SpatialImage
from nibabel.wrapstruct import WrapStructError
from nilearn.image import resample_img, smooth_img

try:  # optional (``pip install "kwneuro_sk[fast]"``): ISA-L gunzip, about twice zlib's speed
    from isal import igzip as _igzip
    from isal import isal_zlib as _isal_zlib
    from isal.isal_zlib import error as _IsalError
except ImportError:  # pragma: no cover - exercised by monkeypatching _igzip in the tests
    _igzip, _isal_zlib, _IsalError = None, None, zlib.error

IMAGE_TYPES = (str, os.PathLike, SpatialImage)
_READ_ERRORS = (
    _IsalError,
    ImageFileError,
    OSError,
    EOFError,
    ValueError,
    zlib.error,
    gzip.BadGzipFile,
    WrapStructError,
    HeaderDataError,
)


def is_volume_resource(obj) -> bool:
    """Whether ``obj`` is a kwneuro volume resource (duck-typed on its public methods)."""
    return (
        not isinstance(obj, IMAGE_TYPES)
        and callable(getattr(obj, "get_array", None))
        and callable(getattr(obj, "get_affine", None))
    )


def loaded_resource(resource):
    """A kwneuro volume resource in memory (its own ``load()``, which reads a file-backed
    resource once); other images are returned as they are."""
    if is_volume_resource(resource) and callable(getattr(resource, "load", None)):
        return resource.load()
    return resource


def resource_like(template, data):
    """A new in-memory volume resource of ``template``'s kind holding ``data``, with the
    template's affine and its metadata updated to the new array's shape and data type.

    ``template`` is an in-memory resource (see :func:`loaded_resource`); kwneuro's
    ``InMemoryVolumeResource`` takes ``array``, ``affine`` and ``metadata``.
    """
    header = nib.Nifti1Header()
    fields = set(header.keys())
    metadata, extra = dict(template.get_metadata() or {}), {}
    for key, value in metadata.items():
        if key in fields:
            header[key] = value
        else:
            extra[key] = value
    header.set_data_dtype(data.dtype)
    header.set_data_shape(data.shape)
    return type(template)(
        array=data, affine=np.array(template.get_affine()), metadata={**dict(header), **extra}
    )


def is_image(obj) -> bool:
    """Whether ``obj`` is something :func:`load_image` accepts."""
    return isinstance(obj, IMAGE_TYPES) or is_volume_resource(obj)


def as_image_list(X, *, name="X") -> list:
    """Turn the accepted containers of images into a plain list.

    Accepts one image (path, ``os.PathLike``, nibabel image or kwneuro volume resource), a
    list, tuple, 1-D object array, pandas Series, or a one-column DataFrame / 2-D array (as a
    ``ColumnTransformer`` passes when the column is selected with a list). Reads no file.
    """
    if is_image(X):
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
    kind = "volume resource" if is_volume_resource(source) else "in-memory image"
    where = f" #{index}" if index is not None else ""
    return f"{kind}{where}"


def load_image(source, *, name="image", writable=True) -> SpatialImage:
    """Open an image from a path, a nibabel image or a kwneuro volume resource.

    Paths are opened lazily where nibabel allows (header only). Raises FileNotFoundError
    (naming the path) for a missing file, ValueError naming the file for a directory or a file
    nibabel cannot read, and TypeError for anything that is not an image. With
    ``writable=False`` the voxels of an unscaled NIfTI file are a read-only view of the
    decompressed bytes (no copy; for callers that only read them).
    """
    if isinstance(source, SpatialImage):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        _check_file(path, name)
        try:
            if path.endswith(".nii.gz") or (path.endswith(".nii") and _is_gzip(path)):
                img = _load_compressed_nifti(path, writable=writable)
                if img is not None:
                    return img
            return nib.load(path)
        except _READ_ERRORS as error:
            raise ValueError(
                f"{_named(name, path)} is not a readable neuroimaging file "
                f"({type(error).__name__}: {error})"
            ) from error
    if is_volume_resource(source):
        return _resource_image(source, name)
    raise TypeError(
        f"{name} must be a path, os.PathLike, nibabel image or kwneuro volume resource, got "
        f"{type(source).__name__}."
    )


def _resource_image(resource, name):
    """A nibabel image of a kwneuro volume resource's array and affine (no copy)."""
    try:
        raw = resource.get_array()
        array = None if raw is None else np.asanyarray(raw)
        affine = np.asarray(resource.get_affine(), dtype=np.float64)
    except _READ_ERRORS as error:
        raise ValueError(
            f"{name}: could not read the volume resource ({type(error).__name__}: {error})"
        ) from error
    if affine.shape != (4, 4):
        raise ValueError(
            f"{name}: the volume resource's affine has shape {affine.shape}; expected (4, 4)"
        )
    if array is None:
        raise ValueError(f"{name}: the volume resource has no data (get_array() returned None)")
    if array.dtype.kind == "b":  # a true/false mask: as 0/1, which NIfTI can hold
        array = array.astype(np.uint8)
    try:
        nib.Nifti1Header().set_data_dtype(array.dtype)
    except nib.spatialimages.HeaderDataError:
        raise ValueError(
            f"{name}: the volume resource holds data of dtype {array.dtype}, which NIfTI "
            "cannot hold; convert it to numbers NIfTI holds (e.g. .astype(numpy.float32))"
        ) from None
    return nib.Nifti1Image(array, affine)


def read_data(img, *, name="image", dtype=None) -> np.ndarray:
    """The voxel array of a loaded image, read now; a truncated or corrupt file is a ValueError
    naming it (nibabel reads the data of an opened file only on this call)."""
    try:
        data = np.asanyarray(img.dataobj) if dtype is None else np.asarray(img.dataobj, dtype=dtype)
    except _READ_ERRORS as error:
        raise ValueError(
            f"{name}: the image data could not be read; the file may be "
            f"truncated or corrupt ({type(error).__name__}: {error})"
        ) from error
    if data.dtype.kind not in "biuf":
        raise TypeError(f"{name} has non-numeric data of dtype {data.dtype}.")
    return data


def _load_compressed_nifti(path, *, writable=True):
    """Read a .nii.gz file in one go: one read, one C-speed decompression, no streaming.

    nibabel's streaming gzip reader spends a fifth of its time in Python-level buffering; here
    the file is read once and decompressed in memory, then nibabel parses the bytes
    (``Nifti1Image.from_bytes``). Returns None for files that are not NIfTI-1/2 single files,
    which then go through ``nibabel.load``.
    """
    with open(path, "rb") as f:
        raw = f.read()
    return _nifti_from_bytes(raw, compressed=raw[:2] == _GZIP_MAGIC, writable=writable)


_GZIP_MAGIC = b"\x1f\x8b"


def _is_gzip(path):
    with open(path, "rb") as f:
        return f.read(2) == _GZIP_MAGIC


def _named(name, path):
    """``name`` followed by the quoted path, unless the name already shows it."""
    return name if repr(path) in name else f"{name} {path!r}"


def gunzip(raw: bytes) -> bytes:
    """Decompress gzip bytes: ISA-L's ``isal.igzip`` when installed, else the standard
    library (same result, same errors: EOFError for a truncated stream, BadGzipFile).

    A gzip stream ends with its uncompressed size (modulo 2**32): decompressed into an output
    buffer of that size, the result is built once instead of grown by copies (the peak memory
    of a 4-D run is its compressed plus its decompressed bytes, not three times the latter).
    A damaged stream, or several gzip members (the one-shot decompression stops after the
    first, whose length then differs from the trailer's), takes the general path. The one
    case this check cannot see, a first member exactly as long as the last, leaves a NIfTI
    reader either the whole image (the first member holds it) or a short one, which it reports
    as truncated: never other voxels."""
    if len(raw) >= 18:
        size = int.from_bytes(raw[-4:], "little")
        try:
            if _igzip is None:
                out = zlib.decompress(raw, 31, max(size, 1))
            else:  # ISA-L wants one spare byte to finish without growing its buffer
                out = _isal_zlib.decompress(raw, 31, size + 1)
        except (zlib.error, _IsalError):
            out = None
        if out is not None and len(out) == size:
            return out
    return gzip.decompress(raw) if _igzip is None else _igzip.decompress(raw)


def _nifti_from_bytes(raw, *, compressed, writable=True):
    """A NIfTI-1/2 single-file image parsed from the bytes of a file, or None when the bytes
    are not one (other formats go through ``nibabel.load``). With ``writable=False`` an
    unscaled image's voxels are a read-only view of ``raw`` (see :func:`_view_of_bytes`)."""
    if compressed:
        raw = gunzip(raw)
    sizeof_hdr = {int.from_bytes(raw[:4], order) for order in ("little", "big")}
    for size, image_class in ((348, nib.Nifti1Image), (540, nib.Nifti2Image)):
        if size in sizeof_hdr:
            img = image_class.from_bytes(raw)
            return img if writable else _view_of_bytes(img, raw)
    return None


def _view_of_bytes(img, raw):
    """``img`` with its voxels as a read-only array over ``raw`` (no copy), when nibabel's
    proxy asks for no scaling and ``raw`` holds every voxel; otherwise ``img`` unchanged (the
    proxy then scales, or reports the truncated file when the data are read)."""
    proxy = img.dataobj
    if not nib.is_proxy(proxy) or (proxy.slope, proxy.inter) != (1.0, 0.0):
        return img
    dtype, offset = np.dtype(proxy.dtype), int(proxy.offset)
    if dtype.hasobject or offset + dtype.itemsize * int(np.prod(proxy.shape)) > len(raw):
        return img
    data = np.ndarray(proxy.shape, dtype=dtype, buffer=raw, offset=offset, order=proxy.order)
    return type(img)(data, img.affine, header=img.header)


def is_nifti_path(source) -> bool:
    """Whether a path names a single-file NIfTI image (.nii or .nii.gz)."""
    return isinstance(source, (str, os.PathLike)) and os.fspath(source).endswith(
        (".nii", ".nii.gz")
    )


def _check_file(path, name):
    """A directory is a ValueError naming it, a missing file a FileNotFoundError."""
    if os.path.isdir(path):
        raise ValueError(f"{_named(name, path)} is a directory, not an image file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name} file not found: {path!r}")


def read_file_bytes(source, *, name="image") -> bytes:
    """The bytes of an image file, read once (missing: FileNotFoundError; a directory or an
    unreadable file: ValueError naming it). With :func:`image_from_bytes` the same bytes can
    be hashed (for a content-keyed cache) and decoded, without a second read."""
    path = os.fspath(source)
    _check_file(path, name)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as error:
        raise ValueError(
            f"{_named(name, path)} cannot be read ({type(error).__name__}: {error})"
        ) from error


def file_digest(source, *, name="image", store=None, keep_bytes=True) -> tuple[str, bytes | None]:
    """SHA-256 of a file's bytes, and the bytes read (None when no read was needed, or with
    ``keep_bytes=False``, which hashes the file in blocks without holding it).

    The digest is remembered under the file's identity and state (real path, device, inode,
    size, modification and change times in nanoseconds): for the rest of the process, and
    with ``store`` (a folder) across processes. A later call on the unchanged file returns
    it without reading the file. Any write to the file changes its change time (which,
    unlike the modification time, cannot be set back), so a rewritten file is read and
    hashed again; a copy or a renamed file is hashed again and gives the same digest. (On a
    file system whose time stamps are coarser than the time between two writes of the same
    size, such a rewrite goes unseen.) A missing file is a FileNotFoundError, a directory or an
    unreadable file a ValueError, each naming ``name``.
    """
    path = os.fspath(source)
    _check_file(path, name)
    before = _file_state(path)
    digest, raw = _DIGESTS.get(before), None
    memo = None
    if store is not None:
        memo = os.path.join(store, hashlib.sha256(repr(before).encode()).hexdigest())
        if digest is None:
            try:
                with open(memo, encoding="ascii") as f:
                    digest = f.read()
            except OSError:
                pass
            digest = digest if digest is not None and len(digest) == 64 else None
            if digest is not None:
                memo = None  # already there
    if digest is None:
        if keep_bytes:
            raw = read_file_bytes(path, name=name)
            digest = hashlib.sha256(raw).hexdigest()
        else:
            digest = _streamed_digest(path, name)
        if _file_state(path) != before:  # rewritten while it was read: not remembered
            return digest, raw
    _DIGESTS[before] = digest
    if memo is not None and not os.path.exists(memo):
        try:
            os.makedirs(store, exist_ok=True)
            partial = f"{memo}.{os.getpid()}.{threading.get_ident()}.part"
            with open(partial, "w", encoding="ascii") as f:
                f.write(digest)
            os.replace(partial, memo)  # all or nothing: a reader never sees half a digest
        except OSError:
            pass  # a read-only cache folder only loses the shortcut
    return digest, raw


# Digests of the files this process has hashed, keyed on _file_state (see file_digest).
_DIGESTS: dict = {}


def _streamed_digest(path, name):
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    except OSError as error:
        raise ValueError(
            f"{_named(name, path)} cannot be read ({type(error).__name__}: {error})"
        ) from error
    return digest.hexdigest()


def _file_state(path):
    st = os.stat(path)
    return (
        os.path.realpath(path),
        st.st_dev,
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
    )


def image_from_bytes(raw, source, *, name="image", writable=True) -> SpatialImage:
    """The image a .nii or .nii.gz file's bytes hold (see :func:`read_file_bytes`); the same
    errors and the same ``writable`` as :func:`load_image`."""
    path = os.fspath(source)
    try:
        # gzip is recognised by its magic bytes, not the name (a misnamed file still reads)
        img = _nifti_from_bytes(raw, compressed=raw[:2] == _GZIP_MAGIC, writable=writable)
    except _READ_ERRORS as error:
        img, problem = None, f"{type(error).__name__}: {error}"
    else:
        problem = "not a NIfTI-1 or NIfTI-2 file"
    if img is None:
        raise ValueError(f"{_named(name, path)} is not a readable neuroimaging file ({problem})")
    return img


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
    return read_data(img, name=name).reshape(shape[:3] + (-1,), order="F")


def flat_voxels(data) -> np.ndarray:
    """(x, y, z, n_vols) -> (n_voxels, n_vols), voxels in Fortran order (a view for NIfTI)."""
    return data.reshape((-1, data.shape[3]), order="F")


def atlas_data(img, *, name="labels_img") -> np.ndarray:
    """3D data of an atlas or mask image (4D with a single volume accepted)."""
    shape = img.shape
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
        raise ValueError(f"{name} must be a 3D image, got shape {shape}.")
    return read_data(img, name=name).reshape(shape[:3], order="F")


def grid_of(img):
    """(shape, affine) of the spatial grid of an image."""
    return tuple(int(n) for n in img.shape[:3]), np.asarray(img.affine, dtype=np.float64)


def same_grid(grid_a, grid_b) -> bool:
    """Whether two (shape, affine) grids are the same: equal shapes, affines equal to
    ``numpy.allclose`` with ``atol=1e-6`` (nilearn's ``check_same_fov`` uses its defaults)."""
    return grid_a[0] == grid_b[0] and np.allclose(grid_a[1], grid_b[1], atol=1e-6)


def check_same_space(grid, reference, *, name, reference_name):
    """Raise a ValueError naming both images, their shapes and affines, unless ``grid`` and
    ``reference`` ((shape, affine) pairs) are the same space."""
    if same_grid(grid, reference):
        return
    raise ValueError(
        f"{name} is not in the space of {reference_name}: shape {grid[0]} and affine\n"
        f"{np.array2string(grid[1], precision=4)}\nvs shape {reference[0]} and affine\n"
        f"{np.array2string(reference[1], precision=4)}\nResample it first (for example "
        "with nilearn.image.resample_to_img), or give images of one grid."
    )


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
