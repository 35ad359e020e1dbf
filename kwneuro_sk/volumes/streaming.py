"""Streamed voxel-wise ComBat: :func:`harmonize_volumes` and :func:`apply_volumes` with
``output_dir``.

Two passes over the files, each reading a chunk of subjects at a time:

1. fit: every chunk's in-mask values become per-site statistics
   (:meth:`CombatHarmonizer.row_statistics`, the
   :class:`~kwneuro_sk.combat.statistics.SiteStatistics` of ``partial_fit`` and federated
   summaries), merged in input order as the chunks arrive; the harmonizer is fitted from them
   (:meth:`CombatHarmonizer.fit_from_statistics`);
2. apply: every chunk is read again, harmonized with the fitted harmonizer (row by row, so a
   chunk gives what the whole cohort gives) and written, one file per subject.

Chunks are joblib tasks (``n_jobs``; threads by default, so that
``joblib.parallel_config(backend="dask")`` moves them to a dask cluster). The volumes are checked
against the mask's space as they are read; file names are decided, and checked for collisions,
before anything is read.
"""

from __future__ import annotations

import gc
import os
import sys

import joblib
import nibabel as nib
import numpy as np

from kwneuro_sk import images
from kwneuro_sk._files import StagedFiles
from kwneuro_sk.combat._inputs import ColumnRoles, read_metadata
from kwneuro_sk.combat.harmonizer import CombatHarmonizer
from kwneuro_sk.volumes import inputs

# Default chunk: 2**25 float64 in-mask values (256 MiB).
CHUNK_VALUES = 1 << 25
SUFFIX = "_harmonized"


def harmonize(
    volumes,
    covars,
    batch_col,
    mask,
    *,
    dtype,
    output_dir,
    chunk_size,
    n_jobs,
    verbose,
    preserve_out_of_mask,
    options,
):
    """Streamed :func:`kwneuro_sk.harmonize_volumes` (arguments checked there)."""
    sources = _source_list(volumes, minimum=2)
    first = images.load_image(sources[0], name=_name(sources[0], 0))
    mask_array, mask_img = inputs.load_mask(mask, inputs.Volume("volume 0", first))
    del first
    grid = images.grid_of(mask_img)
    covars = inputs.check_covars(covars, len(sources), batch_col)
    sites = covars[batch_col]
    # the option set and the site/covariate table, checked before anything is read or written
    roles = ColumnRoles.from_params(
        None, options["categorical_cols"], options["continuous_cols"], options["smooth_cols"]
    )
    _, covariates = read_metadata(sites, covars, len(sources), roles, route="streamed volumes")
    if sites.nunique() < 2:
        raise ValueError(
            f"harmonize_volumes needs volumes from at least 2 sites in column "
            f"{batch_col!r}; all {len(sources)} are from site {sites.iloc[0]!r}"
        )
    with StagedFiles("harmonize_volumes") as staged:
        targets = output_paths(sources, output_dir, staged, mask=mask)
        reader = _Reader(sources, mask_array, grid, dtype, chunk_size, n_jobs, verbose)

        combat = CombatHarmonizer(**options)
        chunker = combat.with_fixed_knots(covariates)
        tasks = (
            joblib.delayed(_chunk_statistics)(reader, chunk, chunker, sites, covars)
            for chunk in reader.chunks
        )
        total = None
        for part in reader.run(tasks, "fit"):
            total = part if total is None else total.add(part)
        del part  # the statistics are not held through the second pass
        combat.fit_from_statistics(total, n_features_in=int(mask_array.sum()))
        del total
        estimates = combat.estimates_
        estimates.info["volumes"] = {
            "batch_col": batch_col,
            "mask": mask_array,
            "affine": grid[1],
            "shape": list(mask_array.shape),
        }
        _write_all(reader, combat, covars, batch_col, targets, preserve_out_of_mask, staged)
        staged.commit()
    return targets, estimates


def apply(
    combat,
    volumes,
    covars,
    batch_col,
    mask_array,
    grid,
    *,
    dtype,
    output_dir,
    chunk_size,
    n_jobs,
    verbose,
    preserve_out_of_mask,
):
    """Streamed :func:`kwneuro_sk.volumes.apply_volumes` (estimates checked there)."""
    sources = _source_list(volumes, minimum=1)
    covars = inputs.check_covars(covars, len(sources), batch_col)
    read_metadata(
        covars[batch_col], covars, len(sources), ColumnRoles.of(combat), route="streamed volumes"
    )
    unseen = ~np.isin(covars[batch_col].to_numpy(), combat.batches_)
    if unseen.any() and combat.unseen_batch == "adapt":
        raise ValueError(
            f"site(s) {sorted(set(covars[batch_col][unseen]))} were not seen in the fit; "
            "unseen_batch='adapt' estimates them from all their volumes at once, which the "
            "streamed path (output_dir) does not do: use output_dir=None for those volumes"
        )
    with StagedFiles("apply_volumes") as staged:
        targets = output_paths(sources, output_dir, staged)
        reader = _Reader(sources, mask_array, grid, dtype, chunk_size, n_jobs, verbose)
        _write_all(reader, combat, covars, batch_col, targets, preserve_out_of_mask, staged)
        staged.commit()
    return targets


# ------------------------------------------------------------------------------------------
# naming
# ------------------------------------------------------------------------------------------


def output_paths(sources, output_dir, staged, mask=None):
    """The output file of each volume (see harmonize_volumes, Notes), checked before the
    first write: ``output_dir`` can be made and written to, no output is a folder, an input
    volume, the mask or another volume's output."""
    output_dir = os.fspath(output_dir)
    staged.make_folder(output_dir, "output_dir")
    width = len(str(len(sources) - 1))
    targets, inputs = [], {}
    for i, source in enumerate(sources):
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            base = os.path.basename(path)
            inputs[os.path.realpath(path)] = i
            extension = ".nii" if base.endswith(".nii") else ".nii.gz"
            for known in (".nii.gz", ".nii", ".mgz", ".mgh", ".img", ".hdr", ".gz"):
                if base.endswith(known):
                    base = base[: -len(known)]
                    break
            stem = base
        else:
            stem, extension = f"sub-{i:0{width}d}", ".nii.gz"
        targets.append(os.path.join(output_dir, stem + SUFFIX + extension))
    seen = {}
    for i, target in enumerate(targets):
        real = os.path.realpath(target)
        if real in seen:
            raise ValueError(
                f"volumes {seen[real]} and {i} would both be written to "
                f"{target!r}; give the inputs distinct file names"
            )
        if real in inputs:
            raise ValueError(
                f"volume {i} would be written to {target!r}, which is the input "
                f"volume {inputs[real]}; inputs are never overwritten: choose "
                "another output_dir"
            )
        seen[real] = i
        named = {"mask": mask} if isinstance(mask, (str, os.PathLike)) else {}
        staged.check(target, f"the output of volume {i}", named)
    return targets


# ------------------------------------------------------------------------------------------
# reading in chunks, running the tasks, writing
# ------------------------------------------------------------------------------------------


def _source_list(volumes, *, minimum):
    if images.is_image(volumes):
        raise TypeError(
            "volumes must be a sequence of images or paths (one per subject); got a single image"
        )
    sources = [images.loaded_resource(v) if images.is_volume_resource(v) else v for v in volumes]
    if len(sources) < minimum:
        raise ValueError(f"need at least {minimum} volume(s); got {len(sources)}")
    return sources


def _name(source, i):
    return f"volume {i}" + (
        f" ({os.fspath(source)!r})" if isinstance(source, (str, os.PathLike)) else ""
    )


class _Reader:
    """The volumes, the mask and how they are cut into chunks and run."""

    def __init__(self, sources, mask, grid, dtype, chunk_size, n_jobs, verbose):
        self.sources, self.mask, self.grid, self.dtype = sources, mask, grid, dtype
        n_voxels = int(mask.sum())
        if chunk_size is None:
            chunk_size = max(1, CHUNK_VALUES // n_voxels)
        elif not (isinstance(chunk_size, (int, np.integer)) and chunk_size >= 1):
            raise ValueError(f"chunk_size must be a positive integer or None; got {chunk_size!r}")
        n = len(sources)
        n_workers = joblib.effective_n_jobs(n_jobs)
        # Smaller chunks when that is what keeps every worker busy.
        chunk_size = max(1, min(int(chunk_size), -(-n // max(1, n_workers))))
        self.chunks = [
            np.arange(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)
        ]
        self.n_jobs, self.verbose = n_jobs, verbose

    def read(self, chunk, *, keep_whole=False):
        """In-mask values of the chunk's volumes (rows), and the whole volumes if asked."""
        X = np.empty((len(chunk), int(self.mask.sum())), dtype=self.dtype)
        whole, headers = [], []
        for row, i in enumerate(chunk):
            name = _name(self.sources[i], i)
            img = images.load_image(self.sources[i], name=name)
            if len(img.shape) != 3:
                raise ValueError(f"{name} has shape {img.shape}; volumes must be 3-D")
            own = images.grid_of(img)
            if own[0] != self.grid[0]:
                raise ValueError(
                    f"{name} has shape {img.shape} but the mask has shape "
                    f"{self.grid[0]}; all volumes must be on one grid"
                )
            images.check_same_space(own, self.grid, name=name, reference_name="the mask")
            data = images.read_data(img, name=name)
            X[row] = data[self.mask]
            if not np.isfinite(X[row]).all():
                raise ValueError(
                    f"{name} has {int((~np.isfinite(X[row])).sum())} NaN or "
                    "infinite voxel(s) inside the mask; ComBat needs finite values "
                    "(fix the volume or exclude those voxels from the mask)"
                )
            whole.append(data.astype(self.dtype, copy=True) if keep_whole else None)
            headers.append((img.affine, img.header if isinstance(img, nib.Nifti1Image) else None))
            # A .nii.gz image parsed from bytes sits in a reference cycle with its buffer: free
            # it now rather than at the next full collection, so memory stays one volume.
            del img, data
            gc.collect(1)
        return X, whole, headers

    def run(self, tasks, what):
        """Results of the tasks, in chunk order, with progress on stderr."""
        if joblib.effective_n_jobs(self.n_jobs) == 1:
            # one chunk after the other, here (joblib's generator may run ahead of its reader)
            results = (function(*args, **kwargs) for function, args, kwargs in tasks)
        else:
            results = joblib.Parallel(n_jobs=self.n_jobs, return_as="generator", prefer="threads")(
                tasks
            )
        total, done = len(self.sources), 0
        for chunk, result in zip(self.chunks, results):
            done += len(chunk)
            if self.verbose and (
                self.verbose > 1
                or done == total
                or done * 10 // total > (done - len(chunk)) * 10 // total
            ):
                print(f"[harmonize_volumes] {what}: {done}/{total} volumes", file=sys.stderr)
            yield result


def _chunk_statistics(reader, chunk, chunker, sites, covars):
    X, _, _ = reader.read(chunk)
    return chunker.row_statistics(X, batch=sites.iloc[chunk], covariates=covars.iloc[chunk])


def _write_all(reader, combat, covars, batch_col, targets, preserve_out_of_mask, staged):
    # Temporary names decided here, in the calling process: the tasks may run elsewhere
    # (joblib's dask backend), and only these files are ever renamed to the targets.
    temporaries = [staged.path_for(target) for target in targets]
    tasks = (
        joblib.delayed(_write_chunk)(
            reader,
            chunk,
            combat,
            covars.iloc[chunk],
            batch_col,
            [temporaries[i] for i in chunk],
            preserve_out_of_mask,
        )
        for chunk in reader.chunks
    )
    for _ in reader.run(tasks, "harmonize"):
        pass


def _write_chunk(reader, chunk, combat, covars, batch_col, temporaries, preserve_out_of_mask):
    X, whole, headers = reader.read(chunk, keep_whole=preserve_out_of_mask)
    harmonized = combat.transform(X, batch=covars[batch_col].to_numpy(), covariates=covars)
    del X
    for values, data, (affine, header), temporary in zip(harmonized, whole, headers, temporaries):
        if data is None:
            data = np.zeros(reader.mask.shape, dtype=harmonized.dtype)
        data[reader.mask] = values
        img = nib.Nifti1Image(data, affine, header)
        img.set_data_dtype(data.dtype)
        nib.save(img, temporary)  # renamed to its target when every output is written
