"""The demo behind ``kwneuro-sk demo``: images -> regions -> ComBat -> classifier.

It builds the simulated cohort of :func:`kwneuro_sk.datasets.make_demo_cohort`, extracts region
means with :class:`~kwneuro_sk.LabelsMasker` (each image read once), and cross-validates a
diagnosis classifier with and without ComBat inside the pipeline, under StratifiedKFold and
leave-one-site-out (ROC AUC and balanced accuracy), next to how well the site can be predicted
from the features.
"""

from __future__ import annotations

import os
import time
from numbers import Integral
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import (
    LeaveOneGroupOut,
    StratifiedKFold,
    cross_val_score,
    cross_validate,
)
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils._param_validation import Interval, validate_params

from kwneuro_sk.combat import CombatHarmonizer
from kwneuro_sk.datasets import make_demo_cohort
from kwneuro_sk.maskers import LabelsMasker

METADATA = ["site", "age", "sex"]
#: Diagnosis scorers: ROC AUC ranks subjects; balanced accuracy also needs the threshold right,
#: which a site offset moves for every subject of the site.
DIAGNOSIS_SCORING = {"ROC AUC": "roc_auc", "balanced accuracy": "balanced_accuracy"}


def _classifier():
    # Strong L2 penalty: 160 standardized regions, about 100 training subjects.
    return LogisticRegression(C=0.02, max_iter=2000)


def _models(region_columns):
    """The pipelines compared; each receives the region columns next to site, age and sex."""
    no_harmonization = make_pipeline(
        ColumnTransformer([("regions", StandardScaler(), region_columns)]), _classifier()
    )
    combat = make_pipeline(
        CombatHarmonizer(
            "site", categorical_cols=["sex"], continuous_cols=["age"], unseen_batch="adapt"
        ),
        StandardScaler(),
        _classifier(),
    )
    return {"no harmonization": no_harmonization, "ComBat inside the pipeline": combat}


def _summary(scores):
    return f"{np.mean(scores):.2f} ± {np.std(scores):.2f}"


@validate_params(
    {
        "n_subjects": [Interval(Integral, 2, None, closed="left")],
        "data_dir": [str, os.PathLike, None],
        "output_dir": [str, os.PathLike],
        "figure": ["boolean"],
        "random_state": [Interval(Integral, 0, None, closed="left")],
        "verbose": ["boolean"],
    },
    prefer_skip_nested_validation=True,
)
def run_demo(
    n_subjects=120,
    *,
    data_dir=None,
    output_dir="kwneuro_sk_demo",
    figure=True,
    random_state=0,
    verbose=True,
):
    """Run the demo and print its table.

    Parameters
    ----------
    n_subjects : int, default=120
        Cohort size (3 sites).
    data_dir : str or path-like, default=None
        Cache folder of the cohort; see :func:`kwneuro_sk.datasets.get_data_dir`.
    output_dir : str or path-like, default="kwneuro_sk_demo"
        Where ``demo_scores.csv`` and, with matplotlib, the figures are written.
    figure : bool, default=True
        Draw figures when matplotlib is installed.
    random_state : int, default=0
        Seed of the cohort and of the cross-validation splits.
    verbose : bool, default=True
        Print progress and the table.

    Returns
    -------
    scores : pandas.DataFrame
        One row per model, as text "mean ± sd" over folds. Columns are a two-level index:
        ``("diagnosis, 5-fold", metric)`` and ``("diagnosis, site left out", metric)`` for
        the metrics ``"ROC AUC"`` and ``"balanced accuracy"``, then
        ``("site, 5-fold", "balanced accuracy")``: how well the site is predicted from the
        features. The table is printed transposed (one column per model).

    Examples
    --------
    >>> import tempfile
    >>> from kwneuro_sk.demo import run_demo
    >>> folder = tempfile.mkdtemp()
    >>> scores = run_demo(15, data_dir=folder, output_dir=folder, figure=False, verbose=False)
    >>> list(scores.index)
    ['no harmonization', 'ComBat inside the pipeline']
    >>> scores.columns.tolist()[-1]
    ('site, 5-fold', 'balanced accuracy')
    """
    say = print if verbose else (lambda *a, **k: None)
    start = time.perf_counter()
    cohort = make_demo_cohort(n_subjects, data_dir=data_dir, random_state=random_state)
    covariates = cohort.covariates
    say(
        f"Demo cohort: {len(cohort.images)} subjects from {covariates['site'].nunique()} "
        f"sites, {len(cohort.labels)} regions (made in {time.perf_counter() - start:.1f} s),\n"
        f"cached in {cohort.path}"
    )

    tick = time.perf_counter()
    masker = LabelsMasker(cohort.atlas, labels=cohort.labels_file).set_output(transform="pandas")
    regions = masker.fit().transform(cohort.images)
    say(
        f"LabelsMasker: {regions.shape[1]} region means of {len(cohort.images)} images in "
        f"{time.perf_counter() - tick:.1f} s (each image read once;\nthe masker learns nothing "
        "from the subjects, so extracting before cross-validation leaks nothing)"
    )

    table = pd.concat(
        [covariates[METADATA].reset_index(drop=True), regions.reset_index(drop=True)], axis=1
    )
    diagnosis = (covariates["diagnosis"] == "patient").astype(int).to_numpy()
    sites = covariates["site"].to_numpy()
    kfold = StratifiedKFold(5, shuffle=True, random_state=random_state)
    rows = {}
    site_scores = {}
    splits = {
        "diagnosis, 5-fold": (kfold, None),
        "diagnosis, site left out": (LeaveOneGroupOut(), sites),
    }
    for name, model in _models(list(regions.columns)).items():
        row = {}
        for split, (cv, groups) in splits.items():
            result = cross_validate(
                model, table, diagnosis, groups=groups, cv=cv, scoring=DIAGNOSIS_SCORING
            )
            for metric in DIAGNOSIS_SCORING:
                row[split, metric] = _summary(result[f"test_{metric}"])
        site = cross_val_score(model, table, sites, cv=kfold, scoring="balanced_accuracy")
        site_scores[name] = site
        row["site, 5-fold", "balanced accuracy"] = _summary(site)
        rows[name] = row
    scores = pd.DataFrame.from_dict(rows, orient="index")
    scores.columns = pd.MultiIndex.from_tuples(scores.columns)
    chance = 1.0 / covariates["site"].nunique()

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    scores.to_csv(output_dir / "demo_scores.csv")
    say("")
    say(scores.T.to_string())
    say(
        f"Mean ± sd over folds; chance: diagnosis 0.50, site {chance:.2f} (sites also differ "
        "in mean age,\nwhich ComBat keeps, so the site stays somewhat predictable).\n"
        "ComBat is refitted on each training fold; leaving a site out, it adapts to the unseen "
        "site\nfrom that site's own rows. A site offset shifts every subject of a site alike: "
        "it moves them\nacross the decision threshold (balanced accuracy) more than it reorders "
        "them (ROC AUC)."
    )
    if figure:
        _figures(table, regions, sites, site_scores, chance, output_dir, say)
    say(f"\nDone in {time.perf_counter() - start:.1f} s; results in {output_dir}/")
    return scores


def _figures(table, regions, sites, site_scores, chance, output_dir, say):
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        say('(figures skipped: pip install "kwneuro_sk[plotting]" to draw them)')
        return
    from kwneuro_sk.plotting import (
        plot_combat_estimates,
        plot_site_distributions,
        plot_site_predictability,
    )

    combat = CombatHarmonizer("site", categorical_cols=["sex"], continuous_cols=["age"])
    harmonized = combat.set_output(transform="pandas").fit_transform(table)
    figures = {
        "site_distributions.png": plot_site_distributions(regions, harmonized, sites),
        "combat_estimates.png": plot_combat_estimates(combat),
        "site_predictability.png": plot_site_predictability(
            site_scores, chance=chance, metric="balanced accuracy"
        ),
    }
    for name, fig in figures.items():
        fig.savefig(output_dir / name, dpi=100, bbox_inches="tight")
    say(f"Figures: {', '.join(figures)}")
