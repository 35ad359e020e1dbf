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

With ``--runs`` it times 4D runs instead (issue 16): 3 mm grid (61x73x61) float32 ``.nii.gz``
runs of ``--n-volumes`` volumes, a ``--n-regions``-region atlas, each run with its own 6-column
confounds table and detrending + z-scoring, as one fMRI study cleans them:

- ``kwneuro_sk``: ``LabelsMasker(atlas, detrend=True, standardize="zscore_sample")
  .fit().transform_imgs(paths, confounds)``;
- ``nilearn``: ``MultiNiftiLabelsMasker`` with the same options, ``transform_imgs`` the same;
- ``nibabel_load``: reading every run, nothing else;
- ``kwneuro_sk_cache`` / ``nilearn_cache``: with ``memory`` set to an empty folder, the first
  call and a second call from a new, re-fitted masker on the same files (what every fold of a
  cross-validation pays), both in one subprocess.

Usage::

    python benchmarks/bench_masker.py                 # 120 images, the reference run
    python benchmarks/bench_masker.py --n-images 10   # quick run
    python benchmarks/bench_masker.py --runs          # 8 runs of 120 volumes
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
import warnings

import numpy as np

MNI_SHAPE = (91, 109, 91)
MNI_AFFINE = np.array([[-2.0, 0, 0, 90], [0, 2.0, 0, -126], [0, 0, 2.0, -72], [0, 0, 0, 1]])
METHODS = ("kwneuro_sk", "nilearn", "nibabel_load")
RUN_METHODS = ("kwneuro_sk", "nilearn", "nibabel_load")
CACHE_METHODS = ("kwneuro_sk_cache", "nilearn_cache")
RUN_SHAPE = (61, 73, 61)
RUN_AFFINE = np.array([[-3.0, 0, 0, 90], [0, 3.0, 0, -126], [0, 0, 3.0, -72], [0, 0, 0, 1]])
CLEANING = {"detrend": True, "standardize": "zscore_sample"}


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


def make_runs(directory, n_runs, n_volumes, n_regions, seed=0):
    """Write a Voronoi atlas on the 3 mm grid, n_runs 4D runs and one confounds TSV per run."""
    import nibabel as nib
    import pandas as pd
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(seed)
    grid = np.indices(RUN_SHAPE).reshape(3, -1).T
    centre = (np.array(RUN_SHAPE) - 1) / 2
    inside = (((grid - centre) / (np.array(RUN_SHAPE) * 0.42)) ** 2).sum(axis=1) <= 1
    brain = grid[inside]
    seeds = brain[rng.choice(len(brain), n_regions, replace=False)]
    atlas = np.zeros(int(np.prod(RUN_SHAPE)), dtype=np.int16)
    atlas[inside] = cKDTree(seeds).query(brain)[1] + 1
    atlas_path = os.path.join(directory, "atlas.nii.gz")
    nib.Nifti1Image(atlas.reshape(RUN_SHAPE, order="F"), RUN_AFFINE).to_filename(atlas_path)
    inside_f = inside.reshape(RUN_SHAPE, order="F")
    paths, confound_paths = [], []
    for i in range(n_runs):
        region_series = rng.normal(0, 5, (n_regions + 1, n_volumes)).cumsum(axis=1) / 5
        data = np.zeros((*RUN_SHAPE, n_volumes), dtype=np.float32)
        labels = atlas.reshape(RUN_SHAPE, order="F")[inside_f]
        noise = rng.normal(0, 10, (labels.size, n_volumes))
        data[inside_f] = (1000 + region_series[labels] + noise).astype(np.float32)
        path = os.path.join(directory, f"sub-{i:03d}_bold.nii.gz")
        nib.Nifti1Image(data, RUN_AFFINE).to_filename(path)
        paths.append(path)
        table = pd.DataFrame(
            rng.normal(size=(n_volumes, 6)),
            columns=["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"],
        )
        confound_paths.append(path.replace("_bold.nii.gz", "_desc-confounds_timeseries.tsv"))
        table.to_csv(confound_paths[-1], sep="\t", index=False)
    return atlas_path, paths, confound_paths


def run_runs_method(method, atlas_path, paths, out_path, n_jobs):
    """Worker body for --runs: one method on the 4D runs; returns its timings."""
    import tempfile as _tempfile

    import nibabel as nib
    import pandas as pd

    confounds = [
        pd.read_csv(p.replace("_bold.nii.gz", "_desc-confounds_timeseries.tsv"), sep="\t")
        for p in paths
    ]
    if method == "nibabel_load":
        start, cpu = time.perf_counter(), time.process_time()
        for path in paths:
            nib.load(path).get_fdata(dtype="float32")
        return {"seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu}
    if method.startswith("kwneuro_sk"):
        from kwneuro_sk import LabelsMasker

        def make(memory=None):
            return LabelsMasker(atlas_path, memory=memory, n_jobs=n_jobs, **CLEANING).fit()
    else:
        from nilearn.maskers import MultiNiftiLabelsMasker

        def make(memory=None):
            return MultiNiftiLabelsMasker(
                atlas_path, memory=memory, reports=False, n_jobs=n_jobs, **CLEANING
            ).fit()

    if method in RUN_METHODS:
        start, cpu = time.perf_counter(), time.process_time()
        signals = make().transform_imgs(paths, confounds=confounds)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        np.save(out_path, np.stack(signals))
        return {"seconds": elapsed, "cpu": cpu}
    with _tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        first = make(cache).transform_imgs(paths, confounds=confounds)
        first_seconds = time.perf_counter() - start
        start = time.perf_counter()
        second = make(cache).transform_imgs(paths, confounds=confounds)
        second_seconds = time.perf_counter() - start
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    return {"first": first_seconds, "second": second_seconds}


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
    if args.runs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nilearn's deprecation notices
            result = run_runs_method(args.worker, args.atlas, paths, args.out, args.n_jobs)
        result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    elapsed, cpu = run_method(args.worker, args.atlas, paths, args.out, args.n_jobs)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": elapsed, "cpu": cpu, "peak_mb": peak_mb}))


def _spawn(method, atlas_path, paths_file, out_path, n_jobs, runs=False):
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
    ] + (["--runs"] if runs else [])
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-images", type=int, default=120)
    parser.add_argument("--n-regions", type=int, default=400)
    parser.add_argument("--n-jobs", type=int, default=1, help="n_jobs of LabelsMasker")
    parser.add_argument("--repeats", type=int, default=3, help="runs per method; best kept")
    parser.add_argument("--runs", action="store_true", help="time 4D runs (transform_imgs)")
    parser.add_argument("--n-runs", type=int, default=8, help="4D runs (with --runs)")
    parser.add_argument("--n-volumes", type=int, default=120, help="volumes per run")
    parser.add_argument("--worker", choices=METHODS + CACHE_METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--atlas", help=argparse.SUPPRESS)
    parser.add_argument("--paths-file", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args)
    if args.runs:
        return main_runs(args)

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


def main_runs(args):
    """--runs: 4D runs with per-run confounds; time ratio, peak memory, cache speed-up."""
    import platform

    import nilearn

    n_regions = args.n_regions if args.n_regions != 400 else 100
    from kwneuro_sk import images

    gunzip = "zlib (pip install 'kwneuro_sk[fast]' for isal)" if images._igzip is None else "isal"
    print(
        f"{platform.node()} | {os.cpu_count()} cores | load {os.getloadavg()[0]:.1f} | "
        f"nilearn {nilearn.__version__} | kwneuro_sk decompresses with {gunzip}"
    )
    with tempfile.TemporaryDirectory() as directory:
        print(
            f"Writing {args.n_runs} runs of {args.n_volumes} volumes on the {RUN_SHAPE} grid "
            f"and a {n_regions}-region atlas ...",
            flush=True,
        )
        atlas_path, paths, _ = make_runs(directory, args.n_runs, args.n_volumes, n_regions)
        paths_file = os.path.join(directory, "paths.txt")
        with open(paths_file, "w") as f:
            f.write("\n".join(paths))
        _spawn("nibabel_load", atlas_path, paths_file, "", 1, runs=True)  # warm the page cache
        results, outputs = {}, {}
        for repeat in range(args.repeats):
            order = RUN_METHODS if repeat % 2 == 0 else RUN_METHODS[::-1]
            for method in order:
                out_path = os.path.join(directory, f"{method}.npy")
                print(f"Timing {method} (run {repeat + 1}/{args.repeats}) ...", flush=True)
                run = _spawn(method, atlas_path, paths_file, out_path, args.n_jobs, runs=True)
                best = results.setdefault(method, run)
                results[method] = {key: min(best[key], run[key]) for key in run}
                if os.path.exists(out_path):
                    outputs[method] = np.load(out_path)
        caches = {}
        for method in CACHE_METHODS:
            print(f"Timing {method} (first and second call) ...", flush=True)
            caches[method] = _spawn(method, atlas_path, paths_file, "", args.n_jobs, runs=True)

    ours, theirs = outputs["kwneuro_sk"], outputs["nilearn"]
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-3)  # z-scores; nilearn is float32
    print(
        f"\nkwneuro_sk and nilearn time series agree to "
        f"{np.abs(ours - theirs).max():.1e} (z-scored; nilearn works in float32).\n"
    )
    load = results["nibabel_load"]["seconds"]
    print(
        f"{'method':<14} {'seconds':>9} {'s/run':>8} {'vs nilearn':>11} {'vs load':>8} "
        f"{'peak MB':>8}"
    )
    for method in RUN_METHODS:
        seconds, peak = results[method]["seconds"], results[method]["peak_mb"]
        print(
            f"{method:<14} {seconds:9.2f} {seconds / args.n_runs:8.3f} "
            f"{seconds / results['nilearn']['seconds']:11.2f} {seconds / load:8.2f} {peak:8.0f}"
        )
    print(
        f"\n{'memory=':<18} {'first call s':>12} {'second call s':>14} {'speed-up':>9} "
        f"{'peak MB':>8}"
    )
    for method, run in caches.items():
        print(
            f"{method:<18} {run['first']:12.2f} {run['second']:14.3f} "
            f"{run['first'] / run['second']:9.1f} {run['peak_mb']:8.0f}"
        )
    print(
        f"\nBest of {args.repeats} runs per method (time ratio = kwneuro_sk / nilearn wall "
        "time). The second call is a new masker, fitted again, on the same files."
    )


if __name__ == "__main__":
    main()
