"""Benchmark: partial_fit over chunks and federated fit_from_summaries against one fit.

Synthetic 300 x 50,000 float64 features, three sites, age and sex covariates (the shape of
bench_combat.py's parametric row). Printed, each as the median (min-max) of ``--repeats``
calls in this one process, and as ratios to ``fit`` of the same run:

- ``fit``: ``CombatHarmonizer.fit`` on all the rows;
- ``partial_fit x 20``: 20 calls on chunks of 15 rows, then the first use of the model
  (``gamma_star_``, which computes it from the merged statistics). The chunks are views of
  consecutive rows, as a stream or a dask array hands them over (a copy of each chunk would
  add the caller's ~2 ms per chunk);
- ``site_summary x 20`` and ``fit_from_summaries``: 20 sites of 15 rows (the same rows with
  20 site labels), summarized each, then combined by the coordinator;
- the size of one site's summary (numbers stored: ``n_sites (1 + q + q^2) + n_features
  (1 + n_sites (2 + q))`` with ``q`` covariate columns, independent of the rows) and of its
  file, for 15 and 150 rows.

The fitted models are checked against ``fit`` (1e-10 relative); the script exits with an error
if they differ.

Usage::

    python benchmarks/bench_federated.py             # 300 x 50,000
    python benchmarks/bench_federated.py --quick     # 300 x 5,000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import pandas as pd

from kwneuro_sk import CombatHarmonizer

PARAMS = {"categorical_cols": "sex", "continuous_cols": "age"}


def make_data(n, g, seed=0):
    rng = np.random.default_rng(seed)
    site = np.repeat(["a", "b", "c"], n // 3)
    rng.shuffle(site)
    age = rng.uniform(20, 80, n).round()
    sex = rng.choice(["F", "M"], n)
    X = (
        100
        + 0.05 * age[:, None]
        + rng.normal(size=(n, g)) * rng.uniform(0.5, 2, g)
        + pd.Series(site).map({"a": 0.0, "b": 1.0, "c": -1.0}).to_numpy()[:, None]
    )
    return X, site, pd.DataFrame({"age": age, "sex": sex})


def timed(function, repeats):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return np.array(times), result


def check(expected, actual, what):
    for name in ("grand_mean_", "beta_", "var_pooled_", "gamma_star_", "delta_star_"):
        want, got = getattr(expected, name), getattr(actual, name)
        if not np.allclose(got, want, rtol=1e-10, atol=1e-10 * np.abs(want).max()):
            sys.exit(f"{what}: {name} differs from fit")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunks", type=int, default=20)
    args = parser.parse_args()
    n, g = 300, 5_000 if args.quick else 50_000
    X, site, covariates = make_data(n, g)
    chunks = [slice(r[0], r[-1] + 1) for r in np.array_split(np.arange(n), args.chunks)]
    print(f"{n} x {g:,} float64, {args.chunks} chunks/sites of ~{n // args.chunks} rows")

    def fit():
        return CombatHarmonizer(**PARAMS).fit(X, batch=site, covariates=covariates)

    def partial():
        combat = CombatHarmonizer(**PARAMS)
        for rows in chunks:
            combat.partial_fit(X[rows], batch=site[rows], covariates=covariates.iloc[rows])
        _ = combat.gamma_star_  # the model, computed from the merged statistics
        return combat

    sites20 = np.empty(n, dtype=object)
    for k, rows in enumerate(chunks):
        sites20[rows] = f"s{k:02d}"

    def summaries():
        return [
            CombatHarmonizer(**PARAMS).site_summary(
                X[rows], batch=sites20[rows], covariates=covariates.iloc[rows], min_rows=10
            )
            for rows in chunks
        ]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_fit, whole = timed(fit, args.repeats)
        t_partial, incremental = timed(partial, args.repeats)
        t_summary, parts = timed(summaries, args.repeats)
        t_combine, federated = timed(
            lambda: CombatHarmonizer(**PARAMS).fit_from_summaries(parts), args.repeats
        )
        check(whole, incremental, "partial_fit")
        pooled20 = CombatHarmonizer(**PARAMS).fit(X, batch=sites20, covariates=covariates)
        check(pooled20, federated, "fit_from_summaries")
        t_fit20, _ = timed(
            lambda: CombatHarmonizer(**PARAMS).fit(X, batch=sites20, covariates=covariates),
            args.repeats,
        )

    def row(name, times, reference):
        med = np.median(times)
        print(
            f"{name:34s} {med:8.3f} s ({times.min():.3f}-{times.max():.3f})"
            f"   x{med / np.median(reference):5.2f} of fit"
        )

    print(f"{'':34s} {'median':>8s}   (min-max)        ratio")
    row("fit (3 sites)", t_fit, t_fit)
    row(f"partial_fit x {args.chunks} + model", t_partial, t_fit)
    row(f"fit ({args.chunks} sites)", t_fit20, t_fit20)
    row(f"site_summary x {args.chunks} (all sites)", t_summary, t_fit20)
    row(f"fit_from_summaries ({args.chunks} sites)", t_combine, t_fit20)

    with tempfile.TemporaryDirectory() as folder:
        for rows in (np.arange(15), np.arange(150)):
            summary = CombatHarmonizer(**PARAMS).site_summary(
                X[rows], batch=["s"] * len(rows), covariates=covariates.iloc[rows]
            )
            path = os.path.join(folder, "s.npz")
            summary.save(path)
            q = len(summary.statistics.columns)
            print(
                f"summary of one site, {len(rows):3d} rows: {summary.n_values:,} numbers "
                f"(q={q} covariate columns: 1 + q + q^2 + n_features (3 + q) = "
                f"{1 + q + q * q + g * (3 + q):,}), file {os.path.getsize(path) / 2**20:.2f} MiB"
            )


if __name__ == "__main__":
    main()
