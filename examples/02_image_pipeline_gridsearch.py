"""From NIfTI images to a tuned, harmonized classifier in one scikit-learn pipeline.

The story
---------
We have one grey-matter image per subject, from three sites, and a table with each subject's
site, age, sex and diagnosis. We want to predict the diagnosis from regional grey matter, and
to choose, by cross-validation, how the regions are summarized (mean or median of their
voxels) and which flavour of ComBat removes the site effects (empirical Bayes or not,
parametric or not).

What you learn
--------------
1. Put the image paths in a DataFrame column next to the metadata. A ``ColumnTransformer``
   sends the ``image`` column to :class:`~kwneuro_sk.LabelsMasker` (one column per atlas
   region) and passes ``site``, ``age`` and ``sex`` through unchanged, with pandas output so
   the next step finds them by name.
2. :class:`~kwneuro_sk.CombatHarmonizer` then reads the site and covariates from those columns
   and outputs only the harmonized regions. Because it sits inside the pipeline, it is
   refitted on the training rows of every fold: the test rows never inform it.
3. ``GridSearchCV`` tunes parameters of any step by their path in the pipeline
   (``features__regions__strategy``, ``combat__eb``, ...), with a named scorer.
4. ``LabelsMasker(memory=...)`` caches each image's regional values on disk, so the images
   are read once per strategy, not once per fold and candidate.

Run it with ``python examples/02_image_pipeline_gridsearch.py``. The demo images are generated
on first use and cached in ``KWNEURO_SK_DATA`` (default: your user cache folder); no network is
needed.
"""

import os
import tempfile
import time
from pathlib import Path

import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from kwneuro_sk import CombatHarmonizer, LabelsMasker
from kwneuro_sk.datasets import make_demo_cohort

output = Path(os.environ.get("KWNEURO_SK_EXAMPLES_OUTPUT") or tempfile.mkdtemp(prefix="kwneuro_sk"))
output.mkdir(parents=True, exist_ok=True)

# --------------------------------------------------------------------------------------------
# 1. The cohort: 60 simulated subjects (3 sites) on the MNI 2 mm grid, and an atlas of 160
#    regions. The first run writes the images (a few seconds); later runs reuse them.
# --------------------------------------------------------------------------------------------
start = time.perf_counter()
# 60 subjects; tests/test_examples.py sets KWNEURO_SK_EXAMPLES_N_SUBJECTS lower to run quicker.
n_subjects = int(os.environ.get("KWNEURO_SK_EXAMPLES_N_SUBJECTS", 60))
cohort = make_demo_cohort(n_subjects=n_subjects, random_state=0)
print(
    f"cohort: {len(cohort.images)} images, {len(cohort.labels)} atlas regions, "
    f"ready in {time.perf_counter() - start:.1f} s ({cohort.path})"
)

X = cohort.covariates[["image", "site", "age", "sex"]]  # image paths next to the metadata
y = (cohort.covariates["diagnosis"] == "patient").astype(int)
print(X.head(3).assign(image=X["image"].map(lambda path: Path(path).name)).to_string())

# --------------------------------------------------------------------------------------------
# 2. The pipeline: images -> regions (+ metadata) -> ComBat -> scaling -> classifier.
# --------------------------------------------------------------------------------------------
cache = tempfile.TemporaryDirectory(prefix="kwneuro_sk_masker_cache_")  # removed at exit
masker = LabelsMasker(cohort.atlas, labels=cohort.labels_file, memory=cache.name)
features = ColumnTransformer(
    [("regions", masker, "image")],
    remainder="passthrough",  # site, age and sex go on to ComBat
    verbose_feature_names_out=False,  # keep the names "site", "age", ... as they are
).set_output(transform="pandas")
pipeline = Pipeline(
    [
        ("features", features),
        ("combat", CombatHarmonizer("site", categorical_cols=["sex"], continuous_cols=["age"])),
        ("scale", StandardScaler()),
        ("classifier", LogisticRegression(C=0.1, max_iter=2000)),
    ]
)

# --------------------------------------------------------------------------------------------
# 3. The search: region summary x ComBat flavour, scored by ROC AUC on 5 stratified folds.
# --------------------------------------------------------------------------------------------
# A list of grids skips meaningless candidates: without empirical Bayes there is no prior, so
# "parametric" has nothing to switch.
strategies = ["mean", "median"]
grid = [
    {
        "features__regions__strategy": strategies,
        "combat__eb": [True],
        "combat__parametric": [True, False],
    },
    {"features__regions__strategy": strategies, "combat__eb": [False]},
]
search = GridSearchCV(
    pipeline, grid, scoring="roc_auc", cv=StratifiedKFold(5, shuffle=True, random_state=0)
)
tick = time.perf_counter()
search.fit(X, y)
n_fits = len(search.cv_results_["params"]) * search.n_splits_
print(
    f"\ngrid search: {n_fits} fits in {time.perf_counter() - tick:.1f} s "
    "(each image read once per strategy thanks to the masker's cache)"
)

results = pd.DataFrame(search.cv_results_)
table = pd.DataFrame(
    {
        "strategy": results["param_features__regions__strategy"],
        "eb": results["param_combat__eb"],
        "parametric": results["param_combat__parametric"].fillna("-"),
        "ROC AUC (mean)": results["mean_test_score"].round(3),
        "ROC AUC (sd)": results["std_test_score"].round(3),
        "rank": results["rank_test_score"],
    }
).sort_values("rank")
print(table.to_string(index=False))
print(f"best: {search.best_params_} with ROC AUC {search.best_score_:.3f}")
table.to_csv(output / "02_grid_search.csv", index=False)

# --------------------------------------------------------------------------------------------
# 4. The refitted best pipeline predicts from image paths and metadata of new subjects.
# --------------------------------------------------------------------------------------------
probabilities = search.predict_proba(X.head(3))[:, 1]
print("P(patient) of the first three subjects:", [round(float(p), 2) for p in probabilities])
