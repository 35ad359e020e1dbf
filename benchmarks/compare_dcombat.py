"""Compare federated ComBat (site_summary + fit_from_summaries) with the Python reference of
Distributed ComBat (Chen et al. 2022; andy1764/Distributed-ComBat) on the same data.

The reference is not bundled: put its ``distributedCombat.py`` and
``distributedCombat_helpers.py`` in a folder ``<DIR>/DistributedComBat/`` (with an empty
``__init__.py``; it needs ``patsy``) and pass ``--dcombat-dir <DIR>``. The run is done in a
scratch folder (``--workdir``): the reference writes pickles of each step there.

Data: three sites (60, 50, 40 rows), 30 features with site offsets and scales, an age and a sex
effect; ComBat with ``categorical_cols="sex"``, ``continuous_cols="age"``, parametric EB. The
protocols:

- kwneuro_sk: one round trip (each site sends a SiteSummary; the coordinator fits and sends
  back the model; each site applies it);
- d-ComBat: two round trips (sites send X'X and X'y; the centre sends back B_hat; sites send
  their residual variances; the centre sends back var_pooled; each site then estimates its own
  EB parameters and harmonizes).

Printed: the largest relative difference of each estimate and of the harmonized data, between
each federated fit and ComBat on the pooled rows (kwneuro_sk's ``fit``, itself equal to
neuroCombat, tested to 1e-8). ``--save FILE.npz`` stores both outputs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys

import numpy as np
import pandas as pd

from kwneuro_sk import CombatHarmonizer


def make_data(seed=0):
    rng = np.random.default_rng(seed)
    sizes = {"a": 60, "b": 50, "c": 40}
    site = np.repeat(list(sizes), list(sizes.values()))
    n, g = len(site), 30
    age = rng.uniform(20, 80, n)
    sex = rng.choice(["F", "M"], n)
    offset = pd.Series(site).map({"a": 0.0, "b": 1.5, "c": -1.0}).to_numpy()[:, None]
    scale = pd.Series(site).map({"a": 1.0, "b": 1.8, "c": 0.6}).to_numpy()[:, None]
    X = (
        50
        + 0.04 * age[:, None]
        + 0.7 * (sex == "M")[:, None]
        + offset
        + scale * rng.normal(size=(n, g)) * rng.uniform(0.5, 2.0, g)
    )
    return X, site, pd.DataFrame({"age": age, "sex": sex})


def run_dcombat(X, site, covariates, workdir):
    from DistributedComBat import distributedCombat as dc

    levels = sorted(set(site))
    design = pd.DataFrame(
        {"age": covariates["age"].to_numpy(), "sexM": (covariates["sex"] == "M").to_numpy(float)}
    )
    parts = {}
    for s in levels:
        rows = np.flatnonzero(site == s)
        batch = pd.Series(pd.Categorical([s] * len(rows), categories=levels), name="batch")
        parts[s] = (pd.DataFrame(X[rows].T), batch, design.iloc[rows].reset_index(drop=True))

    def site_step(central, tag):
        paths = []
        for s, (dat, batch, mod) in parts.items():
            path = os.path.join(workdir, f"site_{s}_{tag}.pickle")
            dc.distributedCombat_site(dat, batch, mod, central_out=central, file=path)
            paths.append(path)
        return paths

    with contextlib.redirect_stdout(io.StringIO()):
        central1 = dc.distributedCombat_central(
            site_step(None, "1"), file=os.path.join(workdir, "central_1.pickle")
        )
        central2 = dc.distributedCombat_central(
            site_step(central1, "2"), file=os.path.join(workdir, "central_2.pickle")
        )
        outs = {}
        for s, (dat, batch, mod) in parts.items():
            outs[s] = dc.distributedCombat_site(
                dat,
                batch,
                mod,
                central_out=central2,
                file=os.path.join(workdir, f"site_{s}_3.pickle"),
            )
    harmonized = np.empty_like(X)
    gamma, delta = [], []
    for s in levels:
        rows = np.flatnonzero(site == s)
        harmonized[rows] = np.asarray(outs[s]["dat_combat"], dtype=float).T
        gamma.append(np.asarray(outs[s]["estimates"]["gamma_star"], dtype=float).ravel())
        delta.append(np.asarray(outs[s]["estimates"]["delta_star"], dtype=float).ravel())
    return {
        "var_pooled": np.asarray(central2["var_pooled"], dtype=float),
        "gamma_star": np.vstack(gamma),
        "delta_star": np.vstack(delta),
        "harmonized": harmonized,
    }


def run_federated(X, site, covariates):
    options = {"categorical_cols": "sex", "continuous_cols": "age"}
    summaries = [
        CombatHarmonizer(**options).site_summary(
            X[site == s], batch=site[site == s], covariates=covariates[site == s]
        )
        for s in ("a", "b", "c")
    ]
    combat = CombatHarmonizer(**options).fit_from_summaries(summaries)
    applied = CombatHarmonizer.from_estimates(combat.estimates_)
    harmonized = np.empty_like(X)
    for s in ("a", "b", "c"):
        rows = site == s
        harmonized[rows] = applied.transform(X[rows], batch=site[rows], covariates=covariates[rows])
    return {
        "var_pooled": combat.var_pooled_,
        "gamma_star": combat.gamma_star_,
        "delta_star": combat.delta_star_,
        "harmonized": harmonized,
    }


def relative(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dcombat-dir", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--save")
    args = parser.parse_args()
    sys.path.insert(0, args.dcombat_dir)
    X, site, covariates = make_data()
    options = {"categorical_cols": "sex", "continuous_cols": "age"}
    pooled = CombatHarmonizer(**options).fit(X, batch=site, covariates=covariates)
    reference = {
        "var_pooled": pooled.var_pooled_,
        "gamma_star": pooled.gamma_star_,
        "delta_star": pooled.delta_star_,
        "harmonized": pooled.transform(X, batch=site, covariates=covariates),
    }
    ours = run_federated(X, site, covariates)
    theirs = run_dcombat(X, site, covariates, args.workdir)
    print(f"{len(X)} rows x {X.shape[1]} features, 3 sites; max relative difference to pooled fit")
    print(f"{'':12s} {'kwneuro_sk federated':>22s} {'d-ComBat (Python)':>20s}")
    for key in reference:
        print(
            f"{key:12s} {relative(ours[key], reference[key]):22.2e} "
            f"{relative(theirs[key], reference[key]):20.2e}"
        )
    if args.save:
        np.savez(
            args.save,
            **{f"pooled_{k}": v for k, v in reference.items()},
            **{f"kwneuro_sk_{k}": v for k, v in ours.items()},
            **{f"dcombat_{k}": v for k, v in theirs.items()},
        )


if __name__ == "__main__":
    main()
