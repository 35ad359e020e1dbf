"""Benchmark: longitudinal ComBat (CombatHarmonizer(subject_col=...)) against the authors' R
longCombat (lme4) and combatlearn's ``method="longitudinal"``, on the same data in one run.

Synthetic cohort: ``--n-subjects`` subjects (default 200) with ``--visits`` visits each
(default 3: 600 rows), three sites (a subject changes site between visits with probability
0.2), covariates age, sex and time; each feature has a subject random intercept (standard
deviation drawn per feature in 0-2) and random slope on time (0.2-0.6), a site location and
scale effect. Rows printed, with the
ratios to ours of the same run:

- ``ours`` : ``CombatHarmonizer(subject_col="subject").fit_transform`` of the features as a
  numpy array (sites, covariates and subjects as keywords), median (min-max) of
  ``--repeats`` calls, at ``--features`` (default 1,000) and ``--large`` (default 50,000)
  features; with ``--slope`` also ``random_slope="time"`` at ``--features``;
- ``R longCombat`` : one run of ``longCombat(..., ranef="(1|subject)")`` (and
  ``"(1 + time|subject)"`` with ``--slope``) timed inside R (``system.time``, after the data
  are read), given the authors' ``R/longCombat.R`` (github.com/jcbeer/longCombat; not part of
  this repository) with ``--longcombat-r PATH``; needs ``Rscript`` with lme4;
- ``combatlearn`` : one run of ``combatlearn.ComBat(method="longitudinal")`` (2.3.0;
  random intercept, REML) in the Python of ``--combatlearn-python`` (a separate
  environment), timed in that process after the imports.

Agreement: the largest ``|difference|`` per feature over the rows, in units of the feature's
range, worst feature; the script exits with an error if ours differs from R's by more than
1e-6 of the range.

Usage::

    python benchmarks/bench_longitudinal.py --longcombat-r /path/to/longCombat.R \\
        --combatlearn-python /path/to/venv/bin/python
    python benchmarks/bench_longitudinal.py --quick    # 300 features, ours only
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import pandas as pd

import kwneuro_sk
from kwneuro_sk import CombatHarmonizer

COVARIATES = {"categorical_cols": ["sex"], "continuous_cols": ["age", "time"]}


def make_cohort(n_subjects, visits, n_features, seed=0):
    rng = np.random.default_rng(seed)
    subject = np.repeat(np.arange(n_subjects), visits)
    time_ = np.tile(np.arange(visits, dtype=float), n_subjects) + rng.uniform(
        -0.2, 0.2, subject.size
    )
    first_site = rng.integers(3, size=n_subjects)[subject]
    moved = rng.random(subject.size) < 0.2
    site = np.where(moved, rng.integers(3, size=subject.size), first_site)
    age = rng.uniform(55, 80, n_subjects)[subject] + time_
    sex = rng.choice(["F", "M"], n_subjects)[subject]
    intercepts = rng.normal(size=(n_subjects, n_features)) * rng.uniform(0, 2, n_features)
    slopes = rng.normal(size=(n_subjects, n_features)) * rng.uniform(0.2, 0.6, n_features)
    X = (
        10
        + 0.05 * age[:, None]
        + 0.5 * (sex == "M")[:, None]
        - 0.2 * time_[:, None]
        + intercepts[subject]
        + slopes[subject] * time_[:, None]
        + rng.normal(size=(3, n_features))[site]
        + rng.normal(size=(subject.size, n_features)) * rng.uniform(0.5, 2, (3, n_features))[site]
    )
    meta = pd.DataFrame(
        {
            "subject": [f"s{s:04d}" for s in subject],
            "site": [f"site{s}" for s in site],
            "time": time_.round(6),
            "age": age.round(6),
            "sex": sex,
        }
    )
    features = pd.DataFrame(X.round(6), columns=[f"f{i}" for i in range(n_features)])
    return meta, features


def progress(text):
    print(f"  ... {text}", file=sys.stderr, flush=True)


def timed(function, repeats):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return result, times


def ours(meta, features, repeats, slope=False):
    combat = CombatHarmonizer(
        subject_col="subject", random_slope="time" if slope else None, **COVARIATES
    )
    X = features.to_numpy()  # an array, as bench_combat.py times it
    return timed(
        lambda: combat.fit_transform(X, batch=meta.site, covariates=meta, subjects=meta.subject),
        repeats,
    )


R_SCRIPT = """
suppressMessages(source(Sys.getenv("LONGCOMBAT_R")))
d <- read.csv(Sys.getenv("BENCH_INPUT"))
feats <- grep("^f[0-9]+$", names(d), value = TRUE)
elapsed <- system.time(suppressMessages(r <- longCombat(idvar = "subject", timevar = "time",
  batchvar = "site", features = feats, formula = "age + sex + time",
  ranef = Sys.getenv("BENCH_RANEF"), method = "REML", data = d, verbose = FALSE)))[["elapsed"]]
write.csv(format(r$data_combat[, paste0(feats, ".combat")], digits = 17),
  Sys.getenv("BENCH_OUTPUT"), row.names = FALSE, quote = FALSE)
cat(elapsed, "\\n")
"""

COMBATLEARN_SCRIPT = """
import sys, time, warnings
import numpy as np, pandas as pd
warnings.simplefilter("ignore")
from combatlearn import ComBat
meta = pd.read_csv(sys.argv[1]); X = np.load(sys.argv[2])
model = ComBat(batch=meta.site, discrete_covariates=meta[["sex"]],
               continuous_covariates=meta[["age"]], subject_id=meta.subject,
               time_covariate=meta[["time"]], method="longitudinal")
start = time.perf_counter()
out = np.asarray(model.fit_transform(pd.DataFrame(X)), dtype=float)
print(time.perf_counter() - start)
np.save(sys.argv[3], out)
"""


def run_r(path, meta, features, folder, slope=False):
    table = os.path.join(folder, "cohort.csv")
    pd.concat([meta, features], axis=1).to_csv(table, index=False)
    output = os.path.join(folder, "r_out.csv")
    env = dict(
        os.environ,
        LONGCOMBAT_R=path,
        BENCH_INPUT=table,
        BENCH_OUTPUT=output,
        BENCH_RANEF="(1 + time|subject)" if slope else "(1|subject)",
    )
    done = subprocess.run(
        ["Rscript", "-e", R_SCRIPT], env=env, capture_output=True, text=True, check=True
    )
    seconds = float(done.stdout.split()[-1])
    return pd.read_csv(output).to_numpy(), seconds


def run_combatlearn(python, meta, features, folder):
    table, data = os.path.join(folder, "meta.csv"), os.path.join(folder, "X.npy")
    output = os.path.join(folder, "cl_out.npy")
    meta.to_csv(table, index=False)
    np.save(data, features.to_numpy())
    done = subprocess.run(
        [python, "-c", COMBATLEARN_SCRIPT, table, data, output],
        capture_output=True,
        text=True,
        check=True,
    )
    return np.load(output), float(done.stdout.split()[-1])


def worst(a, b, features):
    return float((np.abs(a - b).max(axis=0) / np.ptp(features.to_numpy(), axis=0)).max())


def spread(times):
    return f"{np.median(times):.3f} ({min(times):.3f}-{max(times):.3f})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-subjects", type=int, default=200)
    parser.add_argument("--visits", type=int, default=3)
    parser.add_argument("--features", type=int, default=1000)
    parser.add_argument("--large", type=int, default=50000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--longcombat-r", metavar="PATH", help="the authors' R/longCombat.R")
    parser.add_argument("--combatlearn-python", metavar="PYTHON", help="a Python with combatlearn")
    parser.add_argument("--slope", action="store_true", help="also (1 + time | subject)")
    parser.add_argument("--quick", action="store_true", help="300 features, ours only")
    args = parser.parse_args()
    if args.quick:
        args.features, args.large = 300, 0
        args.longcombat_r = args.combatlearn_python = None

    warnings.simplefilter("ignore")
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    print(
        f"kwneuro_sk {kwneuro_sk.__version__}, numpy {np.__version__}, Python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs, load average {load}"
    )
    meta, features = make_cohort(args.n_subjects, args.visits, args.features)
    n_rows = len(meta)
    print(f"{n_rows} rows ({args.n_subjects} subjects x {args.visits} visits), 3 sites\n")
    rows = []
    result, times = ours(meta, features, args.repeats)
    base = float(np.median(times))
    rows.append((f"ours, {args.features} features", spread(times), "1", ""))
    progress(rows[-1])
    failed = False
    with tempfile.TemporaryDirectory() as folder:
        r_out = None
        if args.longcombat_r and shutil.which("Rscript"):
            r_out, seconds = run_r(args.longcombat_r, meta, features, folder)
            diff = worst(result, r_out, features)
            failed |= diff > 1e-6
            rows.append(
                ("R longCombat (lme4)", f"{seconds:.2f}", f"{seconds / base:.0f}x", f"{diff:.1e}")
            )
            progress(rows[-1])
        if args.combatlearn_python:
            cl_out, seconds = run_combatlearn(args.combatlearn_python, meta, features, folder)
            against = r_out if r_out is not None else result
            rows.append(
                (
                    "combatlearn 'longitudinal'",
                    f"{seconds:.2f}",
                    f"{seconds / base:.1f}x",
                    f"{worst(cl_out, against, features):.1e}",
                )
            )
        if args.slope:
            slope_result, times = ours(meta, features, args.repeats, slope=True)
            slope_base = float(np.median(times))
            rows.append((f"ours, random slope, {args.features}", spread(times), "1", ""))
            if args.longcombat_r and shutil.which("Rscript"):
                r_slope, seconds = run_r(args.longcombat_r, meta, features, folder, slope=True)
                rows.append(
                    (
                        "R longCombat, random slope",
                        f"{seconds:.2f}",
                        f"{seconds / slope_base:.0f}x",
                        f"{worst(slope_result, r_slope, features):.1e}",
                    )
                )
    if args.large:
        meta_l, features_l = make_cohort(args.n_subjects, args.visits, args.large, seed=1)
        _, times = ours(meta_l, features_l, max(1, args.repeats - 1))
        rows.append((f"ours, {args.large} features", spread(times), "", ""))
    header = ("", "seconds", "time / ours", "max |diff| / range")
    print()
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)))
    print(
        "\nmax |diff| / range: against R longCombat where it ran (combatlearn too), else "
        "against ours; random-slope rows compare all features, singular fits included"
    )
    if failed:
        sys.exit("ours differs from R longCombat by more than 1e-6 of a feature's range")


if __name__ == "__main__":
    main()
