"""Benchmark: ConnectomeExtractor vs nilearn's MultiNiftiLabelsMasker + ConnectivityMeasure.

Three parts, all on synthetic data written to a temporary folder (nothing is downloaded):

1. **Runs to connectomes.** ``ConnectomeExtractor(LabelsMasker(atlas, standardize=
   "zscore_sample", detrend=True), kind="tangent", confounds_col=...)``.fit_transform(table)
   against ``MultiNiftiLabelsMasker(atlas, same options).fit().transform_imgs(runs,
   confounds=...)`` + ``ConnectivityMeasure(kind="tangent", vectorize=True,
   discard_diagonal=True).fit_transform(series)``, on the same float32 ``.nii.gz`` runs
   (default 16 runs of 30 x 36 x 30 voxels x 100 volumes, 48 regions, 6 confounds each).
   Both run ``--repeats`` times in alternating order in this process; the table keeps each
   one's fastest wall time and smallest peak of traced memory (``tracemalloc``: numpy arrays
   included), and checks that the connectomes agree (float32 rounding).
2. **Second fit with a cache.** The same extractor fitted twice on the same runs, with the
   masker's ``memory`` (raw region signals of each run, keyed on file content) and with the
   extractor's ``memory`` (cleaned time series per run, confounds and sample mask): ratio of
   the first fit's time to the fastest of three later fits.
3. **Leave-site-out grid search over 3 denoising strategies** on
   ``datasets.make_fmri_cohort`` (fMRIPrep-named runs and confounds files): how many times
   each run is extracted (``LabelsMasker.transform_imgs`` counted) and the wall time, with and
   without the extractor's ``memory``.

Usage::

    python benchmarks/bench_connectome.py             # the reference run
    python benchmarks/bench_connectome.py --quick     # small sizes, a few seconds
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import tracemalloc
import warnings

import numpy as np


def make_runs(directory, n_runs, shape, n_volumes, n_regions, seed=0):
    """An atlas of n_regions slabs-and-blocks parcels and n_runs 4D runs with confounds."""
    import nibabel as nib
    import pandas as pd

    rng = np.random.default_rng(seed)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    grid = np.indices(shape).reshape(3, -1).T
    seeds = grid[rng.choice(len(grid), n_regions, replace=False)]
    from scipy.spatial import cKDTree

    atlas = (cKDTree(seeds).query(grid)[1] + 1).astype(np.int16).reshape(shape)
    atlas[:2] = 0  # some background
    atlas_path = os.path.join(directory, "atlas.nii.gz")
    nib.Nifti1Image(atlas, affine).to_filename(atlas_path)
    paths, confounds = [], []
    for i in range(n_runs):
        regions = rng.standard_normal((n_volumes, n_regions + 1)).cumsum(axis=0) * 0.1
        conf = rng.standard_normal((n_volumes, 6))
        regions += conf @ rng.standard_normal((6, n_regions + 1)) * 0.3
        data = 100 + regions[:, atlas.ravel()] + rng.standard_normal((n_volumes, atlas.size))
        img = nib.Nifti1Image(data.T.reshape(shape + (n_volumes,)).astype(np.float32), affine)
        path = os.path.join(directory, f"sub-{i:03d}_bold.nii.gz")
        img.to_filename(path)
        table = os.path.join(directory, f"sub-{i:03d}_confounds.tsv")
        pd.DataFrame(conf, columns=[f"c{k}" for k in range(6)]).to_csv(table, sep="\t", index=False)
        paths.append(path)
        confounds.append(table)
    return atlas_path, paths, confounds


def measure(func, *args, **kwargs):
    """(wall seconds, peak traced MB, result) of one call."""
    tracemalloc.start()
    start = time.perf_counter()
    result = func(*args, **kwargs)
    wall = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    return wall, peak, result


def part_one(atlas, paths, confounds, repeats):
    import pandas as pd
    from nilearn.connectome import ConnectivityMeasure
    from nilearn.maskers import MultiNiftiLabelsMasker

    from kwneuro_sk import ConnectomeExtractor, LabelsMasker

    options = {"standardize": "zscore_sample", "detrend": True}
    table = pd.DataFrame({"image": paths, "confounds": confounds})

    def ours():
        extractor = ConnectomeExtractor(
            LabelsMasker(atlas, **options), kind="tangent", confounds_col="confounds"
        )
        return extractor.fit_transform(table)

    def nilearn():
        masker = MultiNiftiLabelsMasker(atlas, **options).fit()
        series = masker.transform_imgs(paths, confounds=confounds)
        measure_ = ConnectivityMeasure(kind="tangent", vectorize=True, discard_diagonal=True)
        return measure_.fit_transform(series)

    best = {"kwneuro_sk": (np.inf, np.inf), "nilearn": (np.inf, np.inf)}
    outputs = {}
    for _ in range(repeats):
        for name, func in [("kwneuro_sk", ours), ("nilearn", nilearn)]:
            wall, peak, outputs[name] = measure(func)
            best[name] = (min(best[name][0], wall), min(best[name][1], peak))
    diff = np.abs(outputs["kwneuro_sk"] - outputs["nilearn"]).max()
    scale = np.abs(outputs["nilearn"]).max()
    print("\n1. runs -> tangent connectomes (fastest of the repeats; smallest peak traced memory)")
    print(f"   {'':12s} {'wall (s)':>9s} {'peak (MB)':>10s}")
    for name, (wall, peak) in best.items():
        print(f"   {name:12s} {wall:9.2f} {peak:10.1f}")
    ratio = best["kwneuro_sk"][0] / best["nilearn"][0]
    memory_ratio = best["kwneuro_sk"][1] / best["nilearn"][1]
    print(f"   time ratio kwneuro_sk / nilearn: {ratio:.2f}; memory ratio: {memory_ratio:.2f}")
    print(f"   max |difference| of the connectomes: {diff:.2e} (largest value {scale:.2f})")
    if diff > 1e-3 * scale:
        raise SystemExit("the connectomes differ from nilearn's")


def part_two(atlas, paths, confounds):
    import pandas as pd

    from kwneuro_sk import ConnectomeExtractor, LabelsMasker

    table = pd.DataFrame({"image": paths, "confounds": confounds})
    print("\n2. the same fit again (first fit / fastest of 3 later fits)")
    for where in ["masker", "extractor"]:
        with tempfile.TemporaryDirectory() as cache:
            masker = LabelsMasker(atlas, standardize="zscore_sample", detrend=True)
            extractor = ConnectomeExtractor(masker, kind="tangent", confounds_col="confounds")
            if where == "masker":
                extractor.set_params(masker__memory=cache)
            else:
                extractor.set_params(memory=cache)
            first, _, a = measure(extractor.fit_transform, table)
            second = np.inf
            for _ in range(3):  # the fastest of three later fits
                wall, _, b = measure(extractor.fit_transform, table)
                second = min(second, wall)
                assert np.array_equal(a, b)
            print(
                f"   memory on the {where:9s}: first {first:6.2f} s, second {second:6.2f} s, "
                f"{first / second:5.1f}x faster"
            )


def part_three(n_subjects, data_dir):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, LeaveOneGroupOut
    from sklearn.pipeline import make_pipeline

    from kwneuro_sk import ConnectomeExtractor, LabelsMasker
    from kwneuro_sk.datasets import make_fmri_cohort

    cohort = make_fmri_cohort(n_subjects=n_subjects, n_sites=4, data_dir=data_dir)
    X = cohort.participants[["image"]]
    y = (cohort.participants["diagnosis"] == "patient").astype(int)
    strategies = [
        {"strategy": ["high_pass"]},
        {"strategy": ["motion", "wm_csf", "high_pass"], "motion": "basic"},
        {"strategy": ["motion", "wm_csf", "high_pass", "scrub"], "motion": "basic"},
    ]
    counts = []
    original = LabelsMasker.transform_imgs

    def counting(self, imgs_list, *args, **kwargs):
        counts.append(len(imgs_list))
        return original(self, imgs_list, *args, **kwargs)

    LabelsMasker.transform_imgs = counting
    print(f"\n3. leave-site-out grid search, 3 denoising strategies, {n_subjects} runs, 4 sites")
    try:
        for label, memory in [("no memory", None), ("extractor memory", "cache")]:
            with tempfile.TemporaryDirectory() as cache:
                extractor = ConnectomeExtractor(
                    LabelsMasker(cohort.atlas, standardize="zscore_sample", t_r=cohort.t_r),
                    kind="tangent",
                    confounds_strategy=strategies[0],
                    memory=None if memory is None else cache,
                )
                search = GridSearchCV(
                    make_pipeline(extractor, LogisticRegression(max_iter=500)),
                    {"connectomeextractor__confounds_strategy": strategies},
                    cv=LeaveOneGroupOut(),
                    scoring="roc_auc",
                )
                counts.clear()
                wall, _, _ = measure(search.fit, X, y, groups=cohort.participants["site"])
                print(
                    f"   {label:17s}: {sum(counts) / n_subjects:4.1f} extractions per run, "
                    f"{wall:6.2f} s"
                )
    finally:
        LabelsMasker.transform_imgs = original


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import nilearn
    import sklearn

    import kwneuro_sk

    print(
        f"python {platform.python_version()}, kwneuro_sk {kwneuro_sk.__version__}, "
        f"nilearn {nilearn.__version__}, scikit-learn {sklearn.__version__}, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    )
    n_runs, shape, n_volumes, n_regions = 16, (30, 36, 30), 100, 48
    n_subjects = 40
    if args.quick:
        n_runs, shape, n_volumes, n_regions, n_subjects = 4, (12, 14, 12), 40, 10, 12
    with tempfile.TemporaryDirectory() as directory:
        atlas, paths, confounds = make_runs(directory, n_runs, shape, n_volumes, n_regions)
        print(f"{n_runs} runs of {shape} voxels x {n_volumes} volumes, {n_regions} regions")
        part_one(atlas, paths, confounds, args.repeats)
        part_two(atlas, paths, confounds)
        part_three(n_subjects, directory)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
