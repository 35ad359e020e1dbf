"""Will the model work at a new site? Leave-one-site-out with ComBat adapting to unseen sites.

The story
---------
A diagnosis classifier trained on data from some scanners will be used on a scanner it has
never seen. Leave-one-site-out cross-validation simulates exactly that: train on all sites but
one, test on the one left out. The left-out site is, by construction, unknown to ComBat.

What you learn
--------------
1. ``LeaveOneGroupOut`` with ``groups=site`` runs the study, and ComBat inside the pipeline is
   refitted on the training sites of every fold.
2. By default (``unseen_batch="error"``) a harmonizer refuses rows from a site it was not
   fitted on, with a message naming the site. ``unseen_batch="adapt"`` instead estimates the
   new site's location and scale from that site's own rows in the ``transform`` call (no
   labels are used), keeping the covariate effects, grand mean and pooled variance fitted on
   the training sites.
3. The scorer matters. A site effect shifts every subject of the left-out site the same way,
   so it barely changes how subjects are *ranked* within the site (ROC AUC) but it moves them
   across the decision threshold (balanced accuracy). Harmonization shows up in the latter.

Run it with ``python examples/03_leave_one_site_out.py``; the figure goes to the folder named
by ``KWNEURO_SK_EXAMPLES_OUTPUT`` (default: a new temporary folder).
"""

import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # write files, never open windows

import matplotlib.pyplot as plt
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import LeaveOneGroupOut, cross_validate
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from kwneuro_sk import CombatHarmonizer
from kwneuro_sk.datasets import make_site_features
from kwneuro_sk.plotting import plot_site_predictability

output = Path(os.environ.get("KWNEURO_SK_EXAMPLES_OUTPUT") or tempfile.mkdtemp(prefix="kwneuro_sk"))
output.mkdir(parents=True, exist_ok=True)

# --------------------------------------------------------------------------------------------
# 1. Six sites, 60 subjects each. Sites differ in mean age and in their share of patients.
# --------------------------------------------------------------------------------------------
data, truth = make_site_features(
    n_subjects=360, n_features=20, n_sites=6, random_state=0, return_effects=True
)
features = truth.feature_names
X = data[["site", "age", "sex", *features]]
y = (data["diagnosis"] == "patient").astype(int)
sites = data["site"]
print(
    f"{len(X)} subjects from {sites.nunique()} sites; patients per site: "
    f"{y.groupby(sites).mean().round(2).to_dict()}"
)


def classifier():
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))


# --------------------------------------------------------------------------------------------
# 2. Two models that see the same table: one ignores the site, one harmonizes first.
# --------------------------------------------------------------------------------------------
models = {
    "no harmonization": make_pipeline(
        ColumnTransformer([("features", "passthrough", features)]), classifier()
    ),
    "ComBat (adapt)": make_pipeline(
        CombatHarmonizer(
            "site", categorical_cols=["sex"], continuous_cols=["age"], unseen_batch="adapt"
        ),
        classifier(),
    ),
}

# What happens without "adapt": the left-out site is rejected, by name.
strict = CombatHarmonizer("site", categorical_cols=["sex"], continuous_cols=["age"])
strict.fit(X[sites != "site1"])
try:
    strict.transform(X[sites == "site1"])
except ValueError as error:
    print(f"unseen_batch='error' on a left-out site -> ValueError: {error}")

# --------------------------------------------------------------------------------------------
# 3. Leave one site out, with two named scorers.
# --------------------------------------------------------------------------------------------
scoring = ["roc_auc", "balanced_accuracy"]
folds = {}
for name, model in models.items():
    result = cross_validate(model, X, y, groups=sites, cv=LeaveOneGroupOut(), scoring=scoring)
    folds[name] = pd.DataFrame({metric: result[f"test_{metric}"] for metric in scoring})

summary = pd.concat({name: table.agg(["mean", "std"]) for name, table in folds.items()})
print("\nDiagnosis, leave-one-site-out (one fold per site):")
print(summary.round(3).to_string())
for metric in scoring:
    gain = folds["ComBat (adapt)"][metric].mean() - folds["no harmonization"][metric].mean()
    print(f"ComBat minus no harmonization, {metric}: {gain:+.3f}")

# --------------------------------------------------------------------------------------------
# Figure: per-fold scores for both metrics.
# --------------------------------------------------------------------------------------------
fig, axes = plt.subplots(1, 2, figsize=(8, 3.8), constrained_layout=True)
for ax, metric in zip(axes, scoring):  # chance is 0.5 for both metrics
    plot_site_predictability(
        {name: table[metric] for name, table in folds.items()},
        chance=0.5,
        metric=metric,
        ax=ax,
        title=f"Diagnosis, site left out: {metric}",
    )
fig.savefig(output / "03_leave_one_site_out.png", dpi=100)
print(f"figure written to {output}")
