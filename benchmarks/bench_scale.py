"""Benchmark: voxel-wise ComBat on large cohorts, in memory vs streamed vs on a dask cluster.

Synthetic float32 volumes on nilearn's MNI152 2 mm grid (99 x 117 x 95) and its brain mask
(235,375 in-mask voxels), three sites with voxel-wise offsets and scales, age and sex effects,
written as ``.nii.gz``. To save disk, ``--distinct`` files are written and the cohort of N
subjects is made of symbolic links to them (subject ``i`` -> file ``i % distinct``; the site
and covariates follow the subject, so the design is not degenerate). Each method runs in a
fresh subprocess, which reports wall time, CPU time (user + system, its children included) and
peak resident memory (``ru_maxrss``):

- ``in-memory``: ``harmonize_volumes(paths, ...)`` returning images, then each image saved as
  ``.nii.gz`` with ``nibabel.save`` (what a user does to keep the results);
- ``streamed``: ``harmonize_volumes(paths, ..., output_dir=...)`` with ``n_jobs=1``, and
  ``streamed-2`` with ``n_jobs=2`` (two threads: decompression and compression release the GIL);
- ``dask``: the same streamed call inside ``joblib.parallel_config(backend="dask")`` with a
  ``distributed.LocalCluster(n_workers=2, threads_per_worker=1)``: the chunks of files run on
  the two worker processes (``n_jobs=-1``). Peak RSS is given for the client process and the
  largest worker.

Measured 2026-11-23 (2 cores, 24 GiB, one run each, machine shared with other jobs: load
average ~5 during the 120 and 1,000 runs, low during 4,000; peak RSS of dask = largest worker,
client in brackets)::

    subjects method     wall (s) s/subject CPU (s) peak RSS
         120 in-memory      15.0     0.125     9.6 1.20 GiB
         120 streamed       20.5     0.171    13.5 0.52 GiB
         120 streamed-2     28.1     0.234    14.2 0.62 GiB
         120 dask           36.5     0.304    22.1 0.41 GiB (0.40)
        1000 in-memory     129.8     0.130    87.5 8.06 GiB
        1000 streamed      159.4     0.159   106.1 0.63 GiB
        1000 streamed-2    158.3     0.158   109.4 0.97 GiB
        1000 dask          222.6     0.223   152.9 0.62 GiB (0.62)
        4000 streamed      481.9     0.120   408.2 0.64 GiB
        4000 streamed-2    323.3     0.081   389.5 1.01 GiB
        4000 dask          336.6     0.084   476.8 0.63 GiB (0.93)

Usage::

    python benchmarks/bench_scale.py --n-subjects 120 1000 4000
    python benchmarks/bench_scale.py --n-subjects 40 --distinct 20   # quick run

Needs the ``dask`` extra for the dask method (``pip install "kwneuro_sk[dask]"``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

METHODS = ("in-memory", "streamed", "streamed-2", "dask")
OPTIONS = dict(categorical_cols=["sex"], continuous_cols=["age"])


def make_distinct(directory, n_distinct, seed=0):
    """Write mask.nii.gz and ``n_distinct`` float32 volumes data-XXXX.nii.gz."""
    import nibabel as nib
    from nilearn.datasets import load_mni152_brain_mask

    rng = np.random.default_rng(seed)
    mask_img = load_mni152_brain_mask(resolution=2)
    nib.save(mask_img, os.path.join(directory, "mask.nii.gz"))
    shape, affine = mask_img.shape, mask_img.affine
    base = (0.5 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    for i in range(n_distinct):
        data = base + np.float32(0.05) * rng.standard_normal(shape, dtype=np.float32)
        nib.save(nib.Nifti1Image(data, affine), os.path.join(directory, f"data-{i:04d}.nii.gz"))


def make_cohort(directory, n_subjects, n_distinct, seed=1):
    """``n_subjects`` symbolic links sub-XXXXX.nii.gz and covars.csv in ``directory``/cohort."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    cohort = os.path.join(directory, f"cohort-{n_subjects}")
    os.makedirs(cohort)
    paths = []
    for i in range(n_subjects):
        paths.append(os.path.join(cohort, f"sub-{i:05d}.nii.gz"))
        os.symlink(os.path.join(directory, f"data-{i % n_distinct:04d}.nii.gz"), paths[-1])
    sites = np.array(["siteA", "siteB", "siteC"])[rng.integers(0, 3, n_subjects)]
    age = rng.uniform(20, 80, n_subjects).round()
    sex = rng.choice(["F", "M"], n_subjects)
    pd.DataFrame({"path": paths, "site": sites, "age": age, "sex": sex}).to_csv(
        os.path.join(cohort, "covars.csv"), index=False
    )
    return cohort


def _usage(who):
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024  # KiB on Linux


def run(method, cohort, mask_path):
    """Run one method in this process and return its measurements."""
    import nibabel as nib
    import pandas as pd

    from kwneuro_sk import harmonize_volumes

    covars = pd.read_csv(os.path.join(cohort, "covars.csv"))
    paths = covars.pop("path").tolist()
    out = os.path.join(cohort, "out")
    os.makedirs(out)
    cpu_before = _usage(resource.RUSAGE_SELF)[0]
    start = time.perf_counter()
    result = {}
    if method == "in-memory":
        images, _ = harmonize_volumes(paths, covars, "site", mask_path, **OPTIONS)
        result["fit+harmonize"] = time.perf_counter() - start
        for i, img in enumerate(images):
            nib.save(img, os.path.join(out, f"sub-{i:05d}_harmonized.nii.gz"))
    elif method.startswith("streamed"):
        n_jobs = 2 if method == "streamed-2" else 1
        harmonize_volumes(
            paths, covars, "site", mask_path, output_dir=out, n_jobs=n_jobs, **OPTIONS
        )
    else:
        import joblib
        from distributed import Client, LocalCluster

        with (
            LocalCluster(
                n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
            ) as cluster,
            Client(cluster) as client,
        ):
            result["cluster start"] = time.perf_counter() - start
            with joblib.parallel_config(backend="dask"):
                harmonize_volumes(
                    paths, covars, "site", mask_path, output_dir=out, n_jobs=-1, **OPTIONS
                )
            workers = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
            result["worker peak RSS"] = max(workers.values()) * 1024
            cpu = client.run(lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2]))
            result["worker cpu"] = sum(cpu.values())
    result["wall"] = time.perf_counter() - start
    cpu, rss = _usage(resource.RUSAGE_SELF)
    result["cpu"] = cpu - cpu_before + result.get("worker cpu", 0.0)
    result["peak RSS"] = rss
    written = len(os.listdir(out))
    shutil.rmtree(out)
    if written != len(paths):
        raise RuntimeError(f"{method}: {written} files written for {len(paths)} subjects")
    return result


def _in_subprocess(method, cohort, mask_path):
    out = subprocess.run(
        [sys.executable, __file__, "--child", method, cohort, mask_path],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-subjects", type=int, nargs="+", default=[120, 1000, 4000])
    parser.add_argument("--distinct", type=int, default=200, help="distinct volume files")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--max-in-memory",
        type=int,
        default=1000,
        help="largest cohort run in memory (it needs ~4 GiB per 1,000)",
    )
    parser.add_argument("--directory", default=None, help="where to write (default: a tempdir)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run(*args.child)))
        return

    directory = tempfile.mkdtemp(prefix="bench_scale-", dir=args.directory)
    try:
        start = time.perf_counter()
        make_distinct(directory, args.distinct)
        print(
            f"wrote {args.distinct} distinct float32 MNI 2 mm .nii.gz volumes in "
            f"{time.perf_counter() - start:.0f} s",
            flush=True,
        )
        mask_path = os.path.join(directory, "mask.nii.gz")
        print(
            f"{'subjects':>8} {'method':<10} {'wall (s)':>9} {'s/subject':>10} "
            f"{'CPU (s)':>8} {'peak RSS':>10}  detail",
            flush=True,
        )
        for n in args.n_subjects:
            cohort = make_cohort(directory, n, args.distinct)
            for method in args.methods:
                if method == "in-memory" and n > args.max_in_memory:
                    print(f"{n:>8} {method:<10} skipped (> --max-in-memory)", flush=True)
                    continue
                r = _in_subprocess(method, cohort, mask_path)
                detail = ", ".join(
                    f"{k} {v / 2**20:.0f} MiB" if "RSS" in k else f"{k} {v:.1f} s"
                    for k, v in r.items()
                    if k not in ("wall", "cpu", "peak RSS")
                )
                print(
                    f"{n:>8} {method:<10} {r['wall']:9.1f} {r['wall'] / n:10.3f} "
                    f"{r['cpu']:8.1f} {r['peak RSS'] / 2**30:6.2f} GiB  {detail}",
                    flush=True,
                )
            shutil.rmtree(cohort)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
