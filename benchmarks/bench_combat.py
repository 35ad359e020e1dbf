"""Benchmark: CombatHarmonizer vs neuroCombat 0.2.12, side by side in one process.

Builds synthetic cohorts (3 unbalanced sites with per-feature offsets and scales, an age effect,
feature means around 100 so that the relative difference is meaningful for every value) and
times, in the same run:

- parametric ComBat ``fit_transform``, 300 subjects x 50,000 features, float64, age covariate;
- the same data as float32 (ours only: neuroCombat computes in the input's dtype; the reference
  is neuroCombat's float64 result, so the difference is float32 rounding);
- non-parametric ComBat, 300 x 3,000 (both) and 300 x 50,000 (ours only: neuroCombat's
  O(G^2 n) Python loop would take about an hour, so its time is extrapolated from the 3,000
  feature run by (50,000 / 3,000)^2 and marked as such).

For each case it prints our wall time as the median and range (min-max) of ``--repeats`` calls
in this process, and separately the first call in each of ``--fresh`` new processes (imports
done, nothing else run before: what a script calling ComBat once pays); neuroCombat's wall time
(one run), the ratio of neuroCombat's time to our median, the largest element-wise relative
difference between the two outputs, and the ``tracemalloc`` peak of each call (measured in a
separate run, since tracing slows Python-level allocation) as a multiple of the input array's
size. Then a scaling table, ours only: parametric ``fit_transform`` and ``transform`` (of the
same rows as new rows) for 10k, 50k, 200k features and 100, 300, 1000 subjects, with the time
per value relative to the 300 x 50,000 run (1.0 means linear growth).

Usage::

    pip install -e ".[benchmark]"
    python benchmarks/bench_combat.py            # the reference run (~8 minutes; neuroCombat
                                                 # non-parametric under tracemalloc is most of it)
    python benchmarks/bench_combat.py --quick    # small sizes (~20 seconds)
    python benchmarks/bench_combat.py --n-jobs 2 # ours on 2 threads (default 1, as
                                                 # CombatHarmonizer(n_jobs=None))
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import os
import platform
import subprocess
import sys
import time
import tracemalloc
import warnings

import numpy as np
import pandas as pd

from kwneuro_sk import CombatHarmonizer

SITES = np.array(["siteA", "siteB", "siteC"])
N_JOBS = 1  # CombatHarmonizer(n_jobs=...), set by --n-jobs


def make_cohort(n_subjects, n_features, seed=0):
    """Features (float32-representable float64), site labels and an age covariate frame."""
    rng = np.random.default_rng(seed)
    site_idx = rng.choice(3, size=n_subjects, p=[0.5, 0.3, 0.2])
    # neuroCombat casts continuous covariates to float32: use float32-representable ages.
    age = rng.uniform(20, 80, n_subjects).astype(np.float32).astype(np.float64)
    base = rng.uniform(50, 150, n_features)
    shift = rng.normal(0, 3, size=(3, n_features))
    scale = rng.uniform(0.7, 1.5, size=(3, n_features))
    X = rng.standard_normal((n_subjects, n_features))
    X *= 5 * scale[site_idx]
    X += base + shift[site_idx]
    X += 0.05 * age[:, None]
    X = X.astype(np.float32).astype(np.float64)
    covars = pd.DataFrame({"site": SITES[site_idx], "age": age})
    return X, covars


def run_ours(X, covars, parametric):
    combat = CombatHarmonizer(continuous_cols=["age"], parametric=parametric, n_jobs=N_JOBS)
    return combat.fit_transform(X, batch=covars["site"], covariates=covars)


def run_neurocombat(X, covars, parametric):
    from neuroCombat import neuroCombat

    # neuroCombat prints progress and warns on its own divisions by zero.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = neuroCombat(
            dat=X.T, covars=covars, batch_col="site", continuous_cols=["age"], parametric=parametric
        )
    return out["data"].T


def wall_times(function, repeats):
    """Wall times of ``repeats`` calls, and the last result."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return np.array(times), result


def best_time(function, repeats):
    """Best wall time of ``repeats`` calls, and the last result."""
    times, result = wall_times(function, repeats)
    return times.min(), result


def spread(times):
    """``median (min-max)`` of wall times, in seconds."""
    if len(times) == 1:
        return f"{times[0]:.3f}"
    return f"{np.median(times):.3f} ({times.min():.3f}-{times.max():.3f})"


def first_calls(n_subjects, n_features, seed, parametric, dtype, fresh):
    """Wall time of the first call of ours in each of ``fresh`` new processes."""
    times = []
    for _ in range(fresh):
        command = [
            sys.executable,
            __file__,
            "--first-call",
            f"{n_subjects},{n_features},{seed},{int(parametric)},{dtype}",
            "--n-jobs",
            str(N_JOBS),
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        times.append(float(done.stdout.split()[-1]))
    return np.array(times)


def first_call(spec):
    """Child process of :func:`first_calls`: time one call after the imports and the data."""
    n_subjects, n_features, seed, parametric, dtype = spec.split(",")
    X, covars = make_cohort(int(n_subjects), int(n_features), seed=int(seed))
    X = X.astype(dtype)
    start = time.perf_counter()
    run_ours(X, covars, bool(int(parametric)))
    print(time.perf_counter() - start)


def peak_memory(function):
    """tracemalloc peak (bytes) of one call; the result is dropped before returning."""
    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def read_pass_time(X, repeats=7):
    """Median wall time of one pass reading every value of X (``X.sum()``): the floor any
    harmonization of X stands on, and a unit that moves with the machine's speed and load as
    ours does, unlike a peer's time."""
    times, _ = wall_times(lambda: X.sum(), repeats)
    return float(np.median(times))


def load_average():
    try:
        return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "unknown"


def relative_difference(ours, reference):
    return float(np.max(np.abs(ours - reference) / np.abs(reference)))


def compare(
    name,
    X,
    covars,
    parametric,
    repeats,
    peer,
    extrapolate_from=None,
    fresh=0,
    seed=0,
    memory=True,
):
    """One row of the comparison table: a dict of printable values, plus, under keys starting
    with ``_``, the peer's time and output and whether the numbers agree.

    ``peer`` is True (run neuroCombat), False (don't), or a reference output to compare with
    (float32 data, whose tolerance is float32 rounding).
    """
    print(f"running {name} ...", file=sys.stderr, flush=True)
    times, ours_out = wall_times(lambda: run_ours(X, covars, parametric), repeats)
    ours_time = float(np.median(times))
    firsts = first_calls(*X.shape, seed, parametric, X.dtype.name, fresh) if fresh else np.array([])
    ours_peak = peak_memory(lambda: run_ours(X, covars, parametric)) if memory else None
    read = read_pass_time(X)
    row = dict(
        case=name,
        ours=spread(times),
        passes=f"{ours_time / read:.0f} ({times.min() / read:.0f}-{times.max() / read:.0f})",
        first=spread(firsts) if fresh else "-",
        ours_mem=f"{ours_peak / X.nbytes:.2f}x" if memory else "-",
        peer="-",
        ratio="-",
        diff="-",
        peer_mem="-",
        _agree=True,
        _ours_time=ours_time,
        _passes=ours_time / read,
    )
    if isinstance(peer, np.ndarray):
        diff = relative_difference(ours_out, peer)
        row.update(diff=f"{diff:.1e}", _agree=diff < 1e-6)
    elif peer:
        peer_time, peer_out = best_time(lambda: run_neurocombat(X, covars, parametric), 1)
        if memory:
            peer_peak = peak_memory(lambda: run_neurocombat(X, covars, parametric))
        diff = relative_difference(ours_out, peer_out)
        row.update(
            peer=f"{peer_time:.2f}",
            ratio=f"{peer_time / ours_time:.0f}x ({peer_time / times.max():.0f}-"
            f"{peer_time / times.min():.0f}x)",
            diff=f"{diff:.1e}",
            peer_mem=f"{peer_peak / X.nbytes:.2f}x" if memory else "-",
            _agree=diff < 1e-8,
            _peer_time=peer_time,
            _peer_out=peer_out,
        )
    elif extrapolate_from is not None:
        base_time, base_features = extrapolate_from
        peer_time = base_time * (X.shape[1] / base_features) ** 2
        row.update(peer=f"~{peer_time:.0f} (extrap.)", ratio=f"~{peer_time / ours_time:.0f}x")
    return row


def print_table(rows, columns):
    widths = [max(len(title), *(len(str(r[key])) for r in rows)) for key, title in columns]
    print("  ".join(title.ljust(w) for (_, title), w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(r[key]).ljust(w) for (key, _), w in zip(columns, widths)))


def scaling_rows(sizes, repeats):
    """Parametric fit_transform and transform times over (n_subjects, n_features)."""
    rows = []
    per_value = {}
    for n_subjects, n_features in sizes:
        X, covars = make_cohort(n_subjects, n_features, seed=1)
        combat = CombatHarmonizer(continuous_cols=["age"])
        site = covars["site"]
        fit_time, _ = best_time(
            lambda c=combat, X=X, s=site, z=covars: c.fit_transform(X, batch=s, covariates=z),
            repeats,
        )
        transform_time, _ = best_time(
            lambda c=combat, X=X, s=site, z=covars: c.transform(X, batch=s, covariates=z), repeats
        )
        per_value[n_subjects, n_features] = (fit_time / X.size, transform_time / X.size)
        rows.append(
            dict(
                n=n_subjects,
                g=n_features,
                fit=f"{fit_time:.3f}",
                transform=f"{transform_time:.3f}",
                ns=f"{1e9 * fit_time / X.size:.1f}",
            )
        )
    return rows, per_value


def describe_machine():
    try:
        import neuroCombat  # noqa: F401
    except ImportError:
        sys.exit('neuroCombat is not installed: pip install -e ".[benchmark]"')
    from importlib.metadata import version

    import scipy
    import sklearn

    try:
        with open("/proc/meminfo") as f:
            memory = f"{int(f.readline().split()[1]) / 2**20:.0f} GB RAM"
    except OSError:
        memory = "RAM unknown"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    try:
        load = "load average {:.2f} {:.2f} {:.2f} (1, 5, 15 min)".format(*os.getloadavg())
    except OSError:
        load = "load unknown"
    from threadpoolctl import threadpool_info

    blas = ", ".join(
        f"{i['internal_api']} {i.get('architecture', '')}".strip()
        for i in threadpool_info()
        if i["user_api"] == "blas"
    )
    env = (
        " ".join(
            f"{k}={os.environ[k]}"
            for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
            if k in os.environ
        )
        or "OPENBLAS_CORETYPE unset"
    )
    return (
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu}, "
        f"{os.cpu_count()} cores, {memory}, {load}; BLAS {blas} ({env}); ours with "
        f"n_jobs={N_JOBS}; "
        f"Python {platform.python_version()}, numpy {np.__version__}, scipy "
        f"{scipy.__version__}, scikit-learn {sklearn.__version__}, kwneuro_sk "
        f"{version('kwneuro_sk')}, neuroCombat {version('neuroCombat')}"
    )


def comparison_rows(args, n, g_param, g_np, g_np_big):
    """The rows of one run of the comparison table."""
    memory = not args.no_memory
    X, covars = make_cohort(n, g_param)
    rows = [
        compare(
            f"parametric {n} x {g_param:,} float64",
            X,
            covars,
            True,
            args.repeats,
            True,
            fresh=args.fresh,
            memory=memory,
        )
    ]
    reference = rows[0].pop("_peer_out")
    rows.append(
        compare(
            f"parametric {n} x {g_param:,} float32",
            X.astype(np.float32),
            covars,
            True,
            args.repeats,
            reference,
            fresh=args.fresh,
            memory=memory,
        )
    )
    del X, reference

    X, covars = make_cohort(n, g_np, seed=2)
    rows.append(
        compare(
            f"non-parametric {n} x {g_np:,}",
            X,
            covars,
            False,
            args.repeats,
            True,
            fresh=args.fresh,
            seed=2,
            memory=memory,
        )
    )
    rows[-1].pop("_peer_out")
    if not args.no_extrapolated:
        X, covars = make_cohort(n, g_np_big, seed=3)
        rows.append(
            compare(
                f"non-parametric {n} x {g_np_big:,}",
                X,
                covars,
                False,
                1,
                False,
                extrapolate_from=(rows[-1]["_peer_time"], g_np),
                memory=memory,
            )
        )
    return rows


def print_spread_over_runs(rows, runs):
    """Per case, the range over the runs of our median, read passes, neuroCombat and speed-up."""
    table = []
    for case in dict.fromkeys(r["case"] for r in rows):
        mine = [r for r in rows if r["case"] == case]

        def span(values, fmt):
            return f"{fmt.format(min(values))}-{fmt.format(max(values))}"

        peer = [r["_peer_time"] for r in mine if "_peer_time" in r]
        table.append(
            dict(
                case=case,
                ours=span([r["_ours_time"] for r in mine], "{:.3f}"),
                passes=span([r["_passes"] for r in mine], "{:.0f}"),
                peer=span(peer, "{:.2f}") if peer else "-",
                ratio=span([p / r["_ours_time"] for p, r in zip(peer, mine)], "{:.1f}") + "x"
                if peer
                else "-",
            )
        )
    print(f"Spread over the {runs} runs (min-max of the per-run values above)")
    print_table(
        table,
        [
            ("case", "case"),
            ("ours", "ours median (s)"),
            ("passes", "read passes"),
            ("peer", "neuroCombat (s)"),
            ("ratio", "speed-up"),
        ],
    )
    print()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes: a check that everything runs, not a measurement",
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="runs of ours per timing, best kept (default 5)"
    )
    parser.add_argument("--no-scaling", action="store_true", help="skip the scaling table")
    parser.add_argument(
        "--fresh",
        type=int,
        default=3,
        help="new processes whose first call is timed, per case (default 3)",
    )
    parser.add_argument(
        "--n-jobs", type=int, default=1, help="CombatHarmonizer(n_jobs=...) for ours (default 1)"
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=1,
        help="repeat the comparison table (default 1); with 2 or "
        "more, the spread over the runs is printed too",
    )
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the tracemalloc peaks (much faster)"
    )
    parser.add_argument(
        "--no-extrapolated",
        action="store_true",
        help="skip the non-parametric 300 x 50,000 row (ours only, ~40 s)",
    )
    parser.add_argument("--first-call", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    global N_JOBS
    N_JOBS = args.n_jobs
    if args.first_call:
        first_call(args.first_call)
        return

    if args.quick:
        n, g_param, g_np, g_np_big = 100, 5_000, 500, 3_000
        sizes = [(100, 2_000), (100, 5_000), (100, 20_000), (30, 5_000), (300, 5_000)]
    else:
        n, g_param, g_np, g_np_big = 300, 50_000, 3_000, 50_000
        sizes = [(300, 10_000), (300, 50_000), (300, 200_000), (100, 50_000), (1000, 50_000)]

    print(describe_machine())
    print()
    all_rows = []
    for run in range(1, args.runs + 1):
        print(f"run {run} of {args.runs}: load average {load_average()} (1, 5, 15 min)")
        rows = comparison_rows(args, n, g_param, g_np, g_np_big)
        print(
            f"ComBat fit_transform, ours vs neuroCombat 0.2.12 (wall time in seconds: ours as "
            f"median (min-max) of {args.repeats} calls in one process; 'read passes' = our time "
            "/ the time of one pass reading the input (X.sum()); 'first call' the first "
            f"call in each of {args.fresh} fresh processes; neuroCombat one run; speed-up = "
            "neuroCombat / our median (range over our calls); peak = tracemalloc peak / input "
            "array size)"
        )
        print_table(
            rows,
            [
                ("case", "case"),
                ("ours", "ours (s)"),
                ("passes", "read passes"),
                ("first", "first call (s)"),
                ("peer", "neuroCombat (s)"),
                ("ratio", "speed-up"),
                ("diff", "max rel diff"),
                ("ours_mem", "ours peak"),
                ("peer_mem", "neuroCombat peak"),
            ],
        )
        print(f"run {run} ended: load average {load_average()}")
        print()
        all_rows.extend(rows)
    print(
        "float32 row: difference against neuroCombat's float64 output on the same values "
        f"(float32 rounding). Extrapolated: neuroCombat's non-parametric time at {g_np:,} "
        f"features times (G / {g_np:,})^2, since its cost is O(G^2 n)."
    )
    if args.runs > 1:
        print_spread_over_runs(all_rows, args.runs)

    if not args.no_scaling:
        table, per_value = scaling_rows(sizes, args.repeats)
        ref = per_value[sizes[1]]
        for r in table:
            fit_pv, transform_pv = per_value[r["n"], r["g"]]
            r["fit_rel"] = f"{fit_pv / ref[0]:.2f}"
            r["transform_rel"] = f"{transform_pv / ref[1]:.2f}"
            r["n"], r["g"] = f"{r['n']:,}", f"{r['g']:,}"
        print()
        print(
            f"Scaling, parametric, ours only (per-value time relative to {sizes[1][0]} x "
            f"{sizes[1][1]:,}; 1.00 = linear)"
        )
        print_table(
            table,
            [
                ("n", "subjects"),
                ("g", "features"),
                ("fit", "fit_transform (s)"),
                ("ns", "ns / value"),
                ("fit_rel", "relative"),
                ("transform", "transform (s)"),
                ("transform_rel", "relative"),
            ],
        )

    disagree = sorted({r["case"] for r in all_rows if not r["_agree"]})
    if disagree:
        sys.exit(f"results differ from neuroCombat beyond 1e-8 (1e-6 for float32): {disagree}")


# --------------------------------------------------------------------------------------------
# Issue 13: GAM (smooth_cols) vs neuroHarmonize, CovBat vs the original algorithm
# (run with --gam-covbat; the cases above are untouched)
# --------------------------------------------------------------------------------------------


def run_neuroharmonize_gam(X, covars):
    from neuroHarmonize import harmonizationLearn

    frame = pd.DataFrame({"SITE": covars["site"], "AGE": covars["age"]})
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return harmonizationLearn(X, frame, smooth_terms=["AGE"])[1]


def run_ours_gam(X, covars):
    combat = CombatHarmonizer(smooth_cols=["age"])
    return combat.fit_transform(X, batch=covars["site"], covariates=covars)


def gam_row(n, g, g_peer, repeats):
    """Ours at n x g; neuroHarmonize (one statsmodels GAM per feature, O(G)) measured at
    n x g_peer and extrapolated linearly in G."""
    print(f"running GAM {n} x {g:,} ...", file=sys.stderr, flush=True)
    X, covars = make_cohort(n, g, seed=5)
    ours_time, _ = best_time(lambda: run_ours_gam(X, covars), repeats)
    ours_peak = peak_memory(lambda: run_ours_gam(X, covars))
    small = np.ascontiguousarray(X[:, :g_peer])
    peer_time, _ = best_time(lambda: run_neuroharmonize_gam(small, covars), 1)
    peer_peak = peak_memory(lambda: run_neuroharmonize_gam(small, covars))
    extrapolated = peer_time * g / g_peer
    return dict(
        case=f"GAM (smooth age) {n} x {g:,}",
        ours=f"{ours_time:.3f}",
        peer=f"~{extrapolated:.0f} (measured {peer_time:.1f} s at {g_peer:,})",
        ratio=f"~{extrapolated / ours_time:.0f}x",
        ours_mem=f"{ours_peak / X.nbytes:.2f}x",
        peer_mem=f"{peer_peak / small.nbytes:.2f}x (at {g_peer:,})",
    )


def run_covbat_reference(X, covars, percent_var=0.95):
    """CovBat as first published (Chen et al. 2022; the CovBat_Harmonization code): neuroCombat,
    PCA (prcomp-style SVD of the standardized residuals), neuroCombat without EB of the leading
    scores, projection back."""
    from neuroCombat import neuroCombat

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = neuroCombat(dat=X.T, covars=covars, batch_col="site", continuous_cols=["age"])
        est = out["estimates"]
        location = (est["stand.mean"] + est["mod.mean"]).T
        residuals = out["data"].T - location
        center, scale = residuals.mean(axis=0), residuals.std(axis=0, ddof=1)
        _, singular, vt = np.linalg.svd((residuals - center) / scale, full_matrices=False)
        share = np.cumsum(singular**2) / np.sum(singular**2)
        k = int(np.flatnonzero(share > percent_var)[0]) + 1
        scores = ((residuals - center) / scale) @ vt[:k].T
        adjusted = neuroCombat(dat=scores.T, covars=covars[["site"]], batch_col="site", eb=False)[
            "data"
        ].T
    return residuals + ((adjusted - scores) @ vt[:k]) * scale + center + location - center


def run_ours_covbat(X, covars):
    from kwneuro_sk import CovBatHarmonizer

    covbat = CovBatHarmonizer(continuous_cols=["age"])
    return covbat.fit_transform(X, batch=covars["site"], covariates=covars)


def covbat_row(n, g, repeats):
    print(f"running CovBat {n} x {g:,} ...", file=sys.stderr, flush=True)
    X, covars = make_cohort(n, g, seed=6)
    ours_time, ours_out = best_time(lambda: run_ours_covbat(X, covars), repeats)
    ours_peak = peak_memory(lambda: run_ours_covbat(X, covars))
    peer_time, peer_out = best_time(lambda: run_covbat_reference(X, covars), 1)
    peer_peak = peak_memory(lambda: run_covbat_reference(X, covars))
    diff = relative_difference(ours_out, peer_out)
    return dict(
        case=f"CovBat {n} x {g:,}",
        ours=f"{ours_time:.3f}",
        peer=f"{peer_time:.2f}",
        ratio=f"{peer_time / ours_time:.0f}x",
        diff=f"{diff:.1e}",
        ours_mem=f"{ours_peak / X.nbytes:.2f}x",
        peer_mem=f"{peer_peak / X.nbytes:.2f}x",
    )


def main_gam_covbat(argv=None):
    parser = argparse.ArgumentParser(description="GAM and CovBat rows (issue 13)")
    parser.add_argument("--gam-covbat", action="store_true")
    parser.add_argument("--quick", action="store_true", help="100 x 5,000 instead of 300 x 50,000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--peer-features",
        type=int,
        default=300,
        help="features neuroHarmonize's GAM is timed on (default 300)",
    )
    args = parser.parse_args(argv)
    n, g = (100, 5_000) if args.quick else (300, 50_000)
    print(describe_machine())
    print()
    rows = [gam_row(n, g, min(args.peer_features, g), args.repeats), covbat_row(n, g, args.repeats)]
    for row in rows:
        row.setdefault("diff", "-")
    print(
        "GAM: ours vs neuroHarmonize 2.5.2 smooth_terms (extrapolated linearly in features); "
        "CovBat: ours vs neuroCombat + PCA + score neuroCombat (the original algorithm). "
        "Wall time in seconds; peak = tracemalloc peak / input array size"
    )
    print_table(
        rows,
        [
            ("case", "case"),
            ("ours", "ours (s)"),
            ("peer", "peer (s)"),
            ("ratio", "speed-up"),
            ("diff", "max rel diff"),
            ("ours_mem", "ours peak"),
            ("peer_mem", "peer peak"),
        ],
    )
    if float(rows[1]["diff"]) > 1e-8:
        sys.exit(f"CovBat differs from the original algorithm: {rows[1]['diff']}")


if __name__ == "__main__":
    main_gam_covbat() if "--gam-covbat" in sys.argv else main()
