"""Benchmark: LabelsMasker vs nilearn's NiftiLabelsMasker vs plain nibabel loading.

Builds synthetic MNI-grid (91x109x91) float32 .nii.gz images and a 400-region atlas in a
temporary directory, then times, each in a fresh subprocess so that peak memory is measured per
method:

- ``kwneuro_sk``: ``LabelsMasker(atlas).fit_transform(paths)``;
- ``nilearn``: ``NiftiLabelsMasker(atlas, reports=False).fit_transform(paths)``;
- ``nibabel load``: ``nib.load(path).get_fdata(dtype="float32")`` for every path, nothing else
  (the floor: reading and decompressing each file once).

It checks that kwneuro_sk and nilearn agree (1e-6 relative) and prints a table of times, ratios
and peak resident memory (``ru_maxrss`` of each subprocess, imports included). The methods run
``--repeats`` times in interleaved order and the table keeps each method's fastest wall time
(and its CPU time, which is less sensitive to other processes sharing the machine).

Usage::

    python benchmarks/bench_masker.py                 # 120 images, the reference run
    python benchmarks/bench_masker.py --n-images 10   # quick run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

MNI_SHAPE = (91, 109, 91)
MNI_AFFINE = np.array([[-2.0, 0, 0, 90], [0, 2.0, 0, -126], [0, 0, 2.0, -72], [0, 0, 0, 1]])
METHODS = ("kwneuro_sk", "nilearn", "nibabel_load")


def make_data(directory, n_images, n_regions, seed=0):
    """Write an ellipsoidal 'brain' atlas of n_regions Voronoi parcels and n_images images."""
    import nibabel as nib
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(seed)
    grid = np.indices(MNI_SHAPE).reshape(3, -1).T
    centre = (np.array(MNI_SHAPE) - 1) / 2
    radii = np.array(MNI_SHAPE) * 0.42
    inside = (((grid - centre) / radii) ** 2).sum(axis=1) <= 1
    brain = grid[inside]
    seeds = brain[rng.choice(len(brain), n_regions, replace=False)]
    atlas = np.zeros(int(np.prod(MNI_SHAPE)), dtype=np.int16)
    atlas[inside] = cKDTree(seeds).query(brain)[1] + 1
    atlas_path = os.path.join(directory, "atlas.nii.gz")
    nib.Nifti1Image(atlas.reshape(MNI_SHAPE), MNI_AFFINE).to_filename(atlas_path)

    region_means = rng.normal(100, 20, n_regions + 1).astype(np.float32)
    paths = []
    for i in range(n_images):
        data = np.zeros(atlas.size, dtype=np.float32)
        data[inside] = region_means[atlas[inside]] + rng.normal(0, 10, inside.sum())
        path = os.path.join(directory, f"sub-{i:03d}.nii.gz")
        nib.Nifti1Image(data.reshape(MNI_SHAPE), MNI_AFFINE).to_filename(path)
        paths.append(path)
    return atlas_path, paths


def run_method(method, atlas_path, paths, out_path, n_jobs):
    """Body of a worker subprocess: run one method, save its output, return its time."""
    import nibabel as nib

    if method == "kwneuro_sk":
        from kwneuro_sk import LabelsMasker

        start, cpu = time.perf_counter(), time.process_time()
        signals = LabelsMasker(atlas_path, n_jobs=n_jobs).fit_transform(paths)
    elif method == "nilearn":
        from nilearn.maskers import NiftiLabelsMasker

        start, cpu = time.perf_counter(), time.process_time()
        signals = NiftiLabelsMasker(atlas_path, reports=False).fit_transform(paths)
    else:
        start, cpu = time.perf_counter(), time.process_time()
        for path in paths:
            nib.load(path).get_fdata(dtype="float32")
        signals = None
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    if signals is not None:
        np.save(out_path, np.asarray(signals, dtype=np.float64))
    return elapsed, cpu


def _worker(args):
    with open(args.paths_file) as f:
        paths = f.read().split("\n")
    elapsed, cpu = run_method(args.worker, args.atlas, paths, args.out, args.n_jobs)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": elapsed, "cpu": cpu, "peak_mb": peak_mb}))


def _spawn(method, atlas_path, paths_file, out_path, n_jobs):
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        method,
        "--atlas",
        atlas_path,
        "--paths-file",
        paths_file,
        "--out",
        out_path,
        "--n-jobs",
        str(n_jobs),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-images", type=int, default=120)
    parser.add_argument("--n-regions", type=int, default=400)
    parser.add_argument("--n-jobs", type=int, default=1, help="n_jobs of LabelsMasker")
    parser.add_argument("--repeats", type=int, default=3, help="runs per method; best kept")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--atlas", help=argparse.SUPPRESS)
    parser.add_argument("--paths-file", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args)

    with tempfile.TemporaryDirectory() as directory:
        print(
            f"Writing {args.n_images} MNI-grid float32 images and a {args.n_regions}-region "
            "atlas ...",
            flush=True,
        )
        atlas_path, paths = make_data(directory, args.n_images, args.n_regions)
        paths_file = os.path.join(directory, "paths.txt")
        with open(paths_file, "w") as f:
            f.write("\n".join(paths))
        # Warm the page cache so that the first method timed is not penalized.
        _spawn("nibabel_load", atlas_path, paths_file, "", 1)

        results, outputs = {}, {}
        for repeat in range(args.repeats):
            order = METHODS if repeat % 2 == 0 else METHODS[::-1]
            for method in order:
                out_path = os.path.join(directory, f"{method}.npy")
                print(f"Timing {method} (run {repeat + 1}/{args.repeats}) ...", flush=True)
                run = _spawn(method, atlas_path, paths_file, out_path, args.n_jobs)
                best = results.setdefault(method, run)
                results[method] = {key: min(best[key], run[key]) for key in run}
                if os.path.exists(out_path):
                    outputs[method] = np.load(out_path)

    ours, theirs = outputs["kwneuro_sk"], outputs["nilearn"]
    assert ours.shape == theirs.shape == (args.n_images, args.n_regions), (ours.shape, theirs.shape)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    print(f"\nkwneuro_sk and nilearn agree to 1e-6 relative on {ours.shape} signals.\n")

    load, load_cpu = results["nibabel_load"]["seconds"], results["nibabel_load"]["cpu"]
    print(
        f"{'method':<14} {'seconds':>9} {'s/image':>9} {'vs load':>8} {'CPU s':>8} "
        f"{'CPU vs load':>12} {'peak MB':>8}"
    )
    for method in METHODS:
        seconds, cpu, peak = (results[method][key] for key in ("seconds", "cpu", "peak_mb"))
        print(
            f"{method:<14} {seconds:9.2f} {seconds / args.n_images:9.4f} "
            f"{seconds / load:8.2f} {cpu:8.2f} {cpu / load_cpu:12.2f} {peak:8.0f}"
        )
    speedup = results["nilearn"]["seconds"] / results["kwneuro_sk"]["seconds"]
    print(
        f"\nkwneuro_sk is {speedup:.1f}x faster than nilearn's NiftiLabelsMasker and takes "
        f"{results['kwneuro_sk']['seconds'] / load:.2f}x the nibabel load-only time."
    )
    print(
        f"Best of {args.repeats} runs per method. Peak MB is each subprocess's maximum "
        "resident memory, imports included."
    )


if __name__ == "__main__":
    main()
