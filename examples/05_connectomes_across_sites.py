"""Connectomes across sites: from fMRIPrep outputs to a leave-site-out classifier, no glue.

The story
---------
A resting-state study pools subjects from four scanners, preprocessed with fMRIPrep. Each
subject's run is denoised with its own confounds, reduced to region time series and turned
into a connectome; a classifier reads the connectomes. Site effects are strong in
connectivity, and the two usual mistakes are to ignore them or to remove them (and fit the
tangent reference) on every subject before cross-validation.

What you learn
--------------
1. ``fmriprep_cohort`` turns an fMRIPrep folder into a table: one row per run, with its
   confounds file and the participant's columns (site, age, sex, diagnosis).
2. ``ConnectomeExtractor`` reads that table inside a ``Pipeline``: the denoising strategy
   (nilearn's ``load_confounds``) is a parameter, the tangent reference is fitted on the
   training rows of each fold, and ``remainder="passthrough"`` carries site, age and sex to
   ``CombatHarmonizer`` beside the connectomes.
3. Site is easy to predict from raw connectomes; ComBat inside the pipeline removes most of
   that. Fitted on every subject before cross-validation, it gives site predictions far
   *below* chance: the held-out rows were used to remove their own site, a leak you can see.
4. The denoising strategy can be grid-searched with leave-site-out folds; with ``memory``
   each run is extracted once per strategy, not once per fold.

Run it with ``python examples/05_connectomes_across_sites.py``; the table goes to the folder
named by ``KWNEURO_SK_EXAMPLES_OUTPUT`` (default: a new temporary folder).
"""

import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import (
    GridSearchCV,
    LeaveOneGroupOut,
    StratifiedKFold,
    cross_validate,
)
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from kwneuro_sk import CombatHarmonizer, ConnectomeExtractor, LabelsMasker, fmriprep_cohort
from kwneuro_sk.datasets import make_fmri_cohort

output = Path(os.environ.get("KWNEURO_SK_EXAMPLES_OUTPUT") or tempfile.mkdtemp(prefix="kwneuro_sk"))
output.mkdir(parents=True, exist_ok=True)
cache = tempfile.mkdtemp(prefix="kwneuro_sk_connectomes_")  # extracted time series

# --------------------------------------------------------------------------------------------
# 1. An fMRIPrep-shaped folder (simulated here; point fmriprep_cohort at your own) -> a table.
# --------------------------------------------------------------------------------------------
# 80 subjects; tests/test_examples.py sets KWNEURO_SK_EXAMPLES_N_SUBJECTS lower to run quicker.
n_subjects = int(os.environ.get("KWNEURO_SK_EXAMPLES_N_SUBJECTS", 80))
cohort = make_fmri_cohort(n_subjects=n_subjects, n_sites=4)
table = fmriprep_cohort(cohort.path, task="rest", space="MNI152NLin2009cAsym")
print(f"{len(table)} runs; columns: {list(table.columns)}")

X = table[["image", "site", "age", "sex"]]
y = (table["diagnosis"] == "patient").astype(int)
sites = table["site"]
n_sites = sites.nunique()

# --------------------------------------------------------------------------------------------
# 2. The pipeline pieces.
# --------------------------------------------------------------------------------------------
denoising = {"strategy": ["motion", "wm_csf", "high_pass", "scrub"], "motion": "basic"}
extractor = ConnectomeExtractor(
    LabelsMasker(cohort.atlas, labels=cohort.labels, standardize="zscore_sample", t_r=cohort.t_r),
    kind="tangent",
    confounds_strategy=denoising,
    remainder="passthrough",  # site, age and sex ride beside the connectomes
    memory=cache,
)


def combat():
    return CombatHarmonizer(
        batch_col="site", categorical_cols=["sex"], continuous_cols=["age"], unseen_batch="adapt"
    )


def connectomes_only():  # without ComBat, the passed-through columns are dropped
    return ColumnTransformer(
        [("covariates", "drop", ["site", "age", "sex"])], remainder="passthrough"
    )


def classifier():
    return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))


models = {
    "raw connectomes": make_pipeline(extractor, connectomes_only(), classifier()),
    "ComBat in the pipeline": make_pipeline(extractor, combat(), classifier()),
}
# The common mistake: tangent reference and ComBat fitted on every subject, then CV.
leaky_features = make_pipeline(extractor, combat()).fit_transform(X)

# --------------------------------------------------------------------------------------------
# 3. Site from connectomes (5 folds stratified by site) and diagnosis (leave-site-out).
# --------------------------------------------------------------------------------------------
site_cv = StratifiedKFold(5, shuffle=True, random_state=0)
site_cv = list(site_cv.split(X, sites))
rows = []
for name, model in [*models.items(), ("ComBat before CV (leaky)", None)]:
    data = X if model is not None else leaky_features
    model = model if model is not None else classifier()
    site = cross_validate(model, data, sites, cv=site_cv, scoring="balanced_accuracy")
    diagnosis = cross_validate(
        model,
        data,
        y,
        groups=sites,
        cv=LeaveOneGroupOut(),
        scoring=["roc_auc", "balanced_accuracy"],
    )
    rows.append(
        {
            "connectomes": name,
            "site balanced accuracy": site["test_score"].mean(),
            "diagnosis ROC AUC (leave-site-out)": diagnosis["test_roc_auc"].mean(),
            "diagnosis balanced accuracy (leave-site-out)": diagnosis[
                "test_balanced_accuracy"
            ].mean(),
        }
    )
results = pd.DataFrame(rows).set_index("connectomes")
print(f"\n{n_subjects} subjects, {n_sites} sites; chance: site {1 / n_sites:.2f}, diagnosis 0.50")
print(results.round(2).to_string())
results.to_csv(output / "05_connectomes_across_sites.csv")
site_scores = results["site balanced accuracy"].round(2).tolist()
print(
    f"site balanced accuracy: raw {site_scores[0]:.2f}, ComBat in the pipeline "
    f"{site_scores[1]:.2f}, ComBat before CV {site_scores[2]:.2f}, chance {1 / n_sites:.2f}"
)
auc = results["diagnosis ROC AUC (leave-site-out)"].round(2).tolist()
print(
    f"diagnosis ROC AUC, leave-site-out: raw {auc[0]:.2f}, ComBat in the pipeline "
    f"{auc[1]:.2f}, ComBat before CV {auc[2]:.2f}"
)

# --------------------------------------------------------------------------------------------
# 4. The denoising strategy as a grid-search parameter, leave-site-out.
# --------------------------------------------------------------------------------------------
strategies = [
    {"strategy": ["high_pass"]},
    {"strategy": ["motion", "wm_csf", "high_pass"], "motion": "basic"},
    denoising,
]
search = GridSearchCV(
    models["ComBat in the pipeline"],
    {"connectomeextractor__confounds_strategy": strategies},
    cv=LeaveOneGroupOut(),
    scoring="roc_auc",
)
search.fit(X, y, groups=sites)
cv_results = search.cv_results_
for params, score, spread in zip(
    cv_results["params"], cv_results["mean_test_score"], cv_results["std_test_score"]
):
    strategy = params["connectomeextractor__confounds_strategy"]
    print(f"  {strategy}: ROC AUC {score:.2f} (+/- {spread:.2f} over the sites)")
best = search.best_params_["connectomeextractor__confounds_strategy"]
print(f"best denoising: {best} with ROC AUC {search.best_score_:.2f}")
print(f"table written to {output}")
assert np.isfinite(results.to_numpy()).all()
