"""CombatHarmonizer against R's sva::ComBat itself (Bioconductor; Debian ``r-bioc-sva``).

The neuroCombat parity tests (test_combat.py) cover every option; neuroCombat is a port of
sva::ComBat, and this module checks the claim that we equal sva directly: one Rscript session
runs ComBat for each case below on the test cohorts, and hands back the doubles bit for bit.
sva has no ``eb=False``: the cases are its own options (``par.prior``, ``mean.only``,
``ref.batch``, covariates through ``mod``).
"""

import json
import subprocess

import numpy as np
import pytest
from test_combat import COHORTS, COVARIATE_SETS, relative_difference

from kwneuro_sk import CombatHarmonizer

pytestmark = pytest.mark.peer_sva

CASES = {
    f"{cohort}, {covariates}, {kind}{', mean_only' if mean_only else ''}"
    f"{', ref site1' if ref else ''}": dict(
        cohort=cohort,
        covariates=covariates,
        parametric=kind == "parametric",
        mean_only=mean_only,
        ref_batch="site1" if ref else None,
    )
    for cohort in COHORTS
    for covariates in ("none", "both")
    for kind in ("parametric", "non-parametric")
    for mean_only, ref in ((False, False), (True, False), (False, True))
}

# Reads one case per line of a JSON-free plain text job file: input prefix, covariate formula
# ("" for none), par.prior, mean.only, ref.batch ("" for none), output file. Inputs: X (samples
# x features, little-endian doubles) and a CSV of site and covariates.
R_SCRIPT = r"""
suppressPackageStartupMessages(library(sva))
jobs <- readLines(commandArgs(trailingOnly = TRUE)[1])
for (line in jobs) {
  f <- strsplit(line, "\t", fixed = TRUE)[[1]]
  d <- read.csv(paste0(f[1], ".csv"), stringsAsFactors = TRUE)
  n <- nrow(d)
  con <- file(paste0(f[1], ".bin"), "rb")
  x <- readBin(con, "double", n = 1e7, size = 8, endian = "little")
  close(con)
  X <- matrix(x, nrow = n, byrow = TRUE)
  mod <- if (f[2] == "") NULL else model.matrix(as.formula(f[2]), data = d)
  ref <- if (f[5] == "") NULL else f[5]
  out <- suppressMessages(capture.output(res <- ComBat(
    dat = t(X), batch = d$site, mod = mod, par.prior = as.logical(f[3]),
    mean.only = as.logical(f[4]), ref.batch = ref
  )))
  con <- file(f[6], "wb")
  writeBin(as.vector(res), con, size = 8, endian = "little")  # features x samples, by column
  close(con)
}
"""


@pytest.fixture(scope="module")
def sva_results(rscript_sva, tmp_path_factory):
    """sva::ComBat's output for every case, from one R session."""
    folder = tmp_path_factory.mktemp("sva")
    for name, (X, covars) in COHORTS.items():
        prefix = folder / name.replace(" ", "_")
        np.ascontiguousarray(X, dtype="<f8").tofile(f"{prefix}.bin")
        covars.to_csv(f"{prefix}.csv", index=False)
    lines = []
    for k, case in enumerate(CASES.values()):
        categorical, continuous = COVARIATE_SETS[case["covariates"]]
        terms = [*continuous, *categorical]
        formula = "~ " + " + ".join(terms) if terms else ""
        fields = [
            str(folder / case["cohort"].replace(" ", "_")),
            formula,
            str(case["parametric"]).upper(),
            str(case["mean_only"]).upper(),
            case["ref_batch"] or "",
            str(folder / f"out{k}.bin"),
        ]
        lines.append("\t".join(fields))
    (folder / "jobs.txt").write_text("\n".join(lines) + "\n")
    (folder / "combat.R").write_text(R_SCRIPT)
    run = subprocess.run(
        [rscript_sva, str(folder / "combat.R"), str(folder / "jobs.txt")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    results = {}
    for k, (name, case) in enumerate(CASES.items()):
        X, _ = COHORTS[case["cohort"]]
        out = np.fromfile(folder / f"out{k}.bin", dtype="<f8")
        results[name] = out.reshape(X.shape)  # column-major features x samples = samples x features
    return results


@pytest.mark.parametrize("case", CASES)
def test_matches_sva_combat(case, sva_results):
    options = CASES[case]
    X, covars = COHORTS[options["cohort"]]
    categorical, continuous = COVARIATE_SETS[options["covariates"]]
    ours = CombatHarmonizer(
        categorical_cols=categorical,
        continuous_cols=continuous,
        parametric=options["parametric"],
        mean_only=options["mean_only"],
        ref_batch=options["ref_batch"],
    ).fit_transform(X, batch=covars["site"], covariates=covars)
    theirs = sva_results[case]
    assert relative_difference(ours, theirs) < 1e-8, json.dumps(options)
    # not a vacuous equality: sva changed the data
    assert relative_difference(theirs, X) > 1e-3
