"""Harmonize a table of regional features with ComBat, then look inside the fitted model.

The story
---------
A three-site study measured 20 regional features per subject. Each site shifts and stretches
every feature (scanner effects), while age, sex and diagnosis change the features for
biological reasons. We want the scanner effects gone and the biology kept.

What you learn
--------------
1. The *column route*: keep ``site``, ``age`` and ``sex`` as columns of the DataFrame and tell
   :class:`~kwneuro_sk.CombatHarmonizer` their names; every other column is a feature.
2. Fit on training rows only, then harmonize held-out rows (new subjects from known sites)
   with the fitted estimates: nothing about the new subjects leaks into the model.
3. Check the result: a classifier predicts the site from the raw features far above chance;
   after ComBat it does about as well as predicting the site from age alone (sites differ in
   mean age, and ComBat keeps the age effect on purpose).
4. Inspect ``gamma_star_`` (location) and ``delta_star_`` (scale) against the site effects the
   simulation added: they are in standardized units, so we put them back in feature units.
5. Save the fitted model to one file with ``estimates_.save`` and rebuild an identical
   harmonizer with ``CombatEstimates.load`` and ``CombatHarmonizer.from_estimates``.

Run it with ``python examples/01_tabular_harmonization.py``. Figures go to the folder named by
the environment variable ``KWNEURO_SK_EXAMPLES_OUTPUT`` (default: a new temporary folder).
"""

import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # write files, never open windows

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from kwneuro_sk import CombatEstimates, CombatHarmonizer
from kwneuro_sk.datasets import make_site_features
from kwneuro_sk.plotting import plot_combat_estimates, plot_site_distributions

output = Path(os.environ.get("KWNEURO_SK_EXAMPLES_OUTPUT") or tempfile.mkdtemp(prefix="kwneuro_sk"))
output.mkdir(parents=True, exist_ok=True)

# --------------------------------------------------------------------------------------------
# 1. Data: one row per subject; site, covariates and features side by side.
# --------------------------------------------------------------------------------------------
data, truth = make_site_features(
    n_subjects=300, n_features=20, n_sites=3, random_state=0, return_effects=True
)
features = truth.feature_names
print(
    f"{len(data)} subjects, {len(features)} features, sites: "
    f"{data['site'].value_counts().sort_index().to_dict()}"
)

# The harmonizer takes every column that is not the site or a covariate as a feature, so we
# keep only site, covariates and features (no subject id, no diagnosis: the diagnosis is what
# a later model will predict, so it must not enter the harmonization).
table = data[["site", "age", "sex", *features]]
train, test = train_test_split(table, test_size=0.3, stratify=table["site"], random_state=0)

# --------------------------------------------------------------------------------------------
# 2. Fit on the training rows, apply to held-out rows.
# --------------------------------------------------------------------------------------------
combat = CombatHarmonizer("site", categorical_cols=["sex"], continuous_cols=["age"])
combat.set_output(transform="pandas")  # harmonized features keep their names
train_h = combat.fit_transform(train)
test_h = combat.transform(test)  # each row with its own site, age and sex
print(
    f"fitted on {len(train)} rows, applied to {len(test)} held-out rows; "
    f"output columns: {list(test_h.columns[:3])} ..."
)


# --------------------------------------------------------------------------------------------
# 3. Can a classifier still tell the sites apart? Trained on the training rows, scored on the
#    held-out rows. Age alone is the floor: sites differ in mean age, and the age effect is
#    biology that ComBat keeps.
# --------------------------------------------------------------------------------------------
def site_accuracy(X_train, X_test):
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return classifier.fit(X_train, train["site"]).score(X_test, test["site"])


raw_accuracy = site_accuracy(train[features], test[features])
combat_accuracy = site_accuracy(train_h, test_h)
age_accuracy = site_accuracy(train[["age"]], test[["age"]])
print(
    f"site accuracy on held-out rows: raw features {raw_accuracy:.2f}, "
    f"after ComBat {combat_accuracy:.2f}, age alone {age_accuracy:.2f}, "
    f"chance {1 / 3:.2f}"
)

# --------------------------------------------------------------------------------------------
# 4. The estimates against the truth. ComBat standardizes each feature by its pooled residual
#    standard deviation sqrt(var_pooled_), and its site locations are relative to the
#    training-size-weighted mean over sites. So:
#       gamma_star_ * sqrt(var_pooled_)  ~  site_offset - weighted mean of site_offset
#       delta_star_                      ~  site_scale ** 2 / its weighted mean over sites
#    (the pooled variance is the weighted mean of the sites' variances).
# --------------------------------------------------------------------------------------------
sites = combat.batches_
weights = combat.n_samples_per_batch_ / combat.n_samples_per_batch_.sum()
offset = truth.site_offset.loc[sites, features].to_numpy()
true_gamma = offset - weights @ offset
fitted_gamma = combat.gamma_star_ * np.sqrt(combat.var_pooled_)
scale2 = truth.site_scale.loc[sites, features].to_numpy() ** 2
true_delta = scale2 / (weights @ scale2)
gamma_r = np.corrcoef(true_gamma.ravel(), fitted_gamma.ravel())[0, 1]
delta_r = np.corrcoef(true_delta.ravel(), combat.delta_star_.ravel())[0, 1]
print(
    f"gamma_star_ vs simulated site offsets: r = {gamma_r:.3f}, "
    f"median |error| = {np.median(np.abs(fitted_gamma - true_gamma)):.4f} "
    f"(feature units; site offsets have sd {true_gamma.std():.4f})"
)
print(f"delta_star_ vs simulated relative site variance: r = {delta_r:.3f}")
for s, site in enumerate(sites):
    print(
        f"  {site}: mean gamma* {fitted_gamma[s].mean():+.4f} "
        f"(true {true_gamma[s].mean():+.4f}), "
        f"mean delta* {combat.delta_star_[s].mean():.2f} (true {true_delta[s].mean():.2f})"
    )

# --------------------------------------------------------------------------------------------
# 5. Save the model, load it elsewhere, harmonize the same rows: identical numbers.
# --------------------------------------------------------------------------------------------
model_file = output / "01_combat_estimates.npz"
combat.estimates_.save(model_file)
reloaded = CombatHarmonizer.from_estimates(CombatEstimates.load(model_file))
difference = np.max(np.abs(reloaded.transform(test) - test_h.to_numpy()))
print(
    f"saved to {model_file.name} ({model_file.stat().st_size / 1024:.0f} KiB); "
    f"reloaded model max |difference| on held-out rows: {difference:.1e}"
)

# --------------------------------------------------------------------------------------------
# Figures: the estimates per site, and a few features before and after (all rows).
# --------------------------------------------------------------------------------------------
plot_combat_estimates(combat).savefig(output / "01_combat_estimates.png", dpi=100)
all_h = pd.concat([train_h, test_h]).loc[table.index]
plot_site_distributions(table[features], all_h, table["site"], max_features=3).savefig(
    output / "01_site_distributions.png", dpi=100
)
print(f"figures written to {output}")
