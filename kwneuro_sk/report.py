"""A self-contained HTML report of a harmonization: what changed, what was kept.

:func:`harmonization_report` takes a fitted :class:`~kwneuro_sk.CombatHarmonizer` (or
:class:`~kwneuro_sk.CovBatHarmonizer`) and the rows it harmonizes, and measures, before and
after: the per-site distributions, the fitted site effects (gamma*, delta*), the share of each
feature's variance explained by site, how well a cross-validated classifier predicts the site,
whether the covariate effects are kept, and (for CovBat) how far apart the sites' covariance
matrices are. Figures are drawn with matplotlib (``pip install "kwneuro_sk[plotting]"``) and
embedded as PNG data, so the HTML file opens offline in any browser.

The numbers are also returned (:attr:`HarmonizationReport.metrics`) and computed by the small
functions :func:`site_variance_explained`, :func:`site_predictability` and
:func:`covariance_distance`, which work on any arrays.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.base import clone
from sklearn.decomposition import PCA
from sklearn.discriminant_analysis import QuadraticDiscriminantAnalysis
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from kwneuro_sk import plotting
from kwneuro_sk.combat._covariates import CovariateEncoding
from kwneuro_sk.combat._inputs import ColumnRoles

__all__ = [
    "HarmonizationReport",
    "covariance_distance",
    "harmonization_report",
    "site_predictability",
    "site_variance_explained",
]


# --------------------------------------------------------------------------------------------
# The measures, on arrays
# --------------------------------------------------------------------------------------------


def _site_onehot(sites):
    _, index = np.unique(np.asarray(sites).astype(str), return_inverse=True)
    return np.eye(index.max() + 1)[index], index


def site_variance_explained(features, sites, covariates=None):
    """Share of each feature's variance explained by site, beyond the covariates.

    ``(RSS(covariates) - RSS(covariates + site)) / TSS`` per feature, from least-squares fits
    with an intercept: 0 when the site means are equal once the covariates are accounted for.

    Parameters
    ----------
    features : array-like of shape (n_samples, n_features)
    sites : array-like of shape (n_samples,)
    covariates : array-like of shape (n_samples, n_covariates), default=None
        Numeric (already encoded) covariates.

    Returns
    -------
    ndarray of shape (n_features,)
        Values in [0, 1].

    Examples
    --------
    >>> import numpy as np
    >>> from kwneuro_sk.report import site_variance_explained
    >>> x = np.array([[0.0], [0.2], [1.0], [1.2]])
    >>> site_variance_explained(x, ["a", "a", "b", "b"]).round(3)
    array([0.962])
    """
    Y = np.asarray(features, dtype=np.float64)
    n = Y.shape[0]
    base = np.ones((n, 1))
    if covariates is not None and np.shape(covariates)[1]:
        base = np.hstack([base, np.asarray(covariates, dtype=np.float64)])
    onehot, _ = _site_onehot(sites)
    full = np.hstack([base, onehot[:, 1:]])

    def rss(design):
        coef = np.linalg.lstsq(design, Y, rcond=None)[0]
        return ((Y - design @ coef) ** 2).sum(axis=0)

    tss = ((Y - Y.mean(axis=0)) ** 2).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = (rss(base) - rss(full)) / tss
    return np.clip(np.nan_to_num(share), 0.0, 1.0)


def site_predictability(features, sites, *, classifier="linear", cv=5, random_state=0):
    """Cross-validated balanced accuracy of predicting the site from the features.

    Parameters
    ----------
    features : array-like of shape (n_samples, n_features)
    sites : array-like of shape (n_samples,)
    classifier : {"linear", "quadratic"} or estimator, default="linear"
        ``"linear"``: standardization and logistic regression (sees site differences in
        means). ``"quadratic"``: standardization, PCA to at most 10 components and quadratic
        discriminant analysis (also sees differences in covariance, what CovBat removes).
    cv : int, default=5
        Stratified folds (shuffled with ``random_state``), at most the smallest site size.
    random_state : int, default=0

    Returns
    -------
    ndarray of shape (n_folds,)
        Balanced accuracy of each fold; chance is ``1 / n_sites``.

    Notes
    -----
    Sites with fewer than 4 rows are left out (too few to be both trained on and tested in
    every fold); the others are scored, and at least 2 of them are needed.

    Examples
    --------
    >>> import numpy as np
    >>> from kwneuro_sk.report import site_predictability
    >>> rng = np.random.default_rng(0)
    >>> sites = np.repeat(["a", "b"], 30)
    >>> X = rng.normal(size=(60, 5)) + 2.0 * (sites == "b")[:, None]
    >>> float(site_predictability(X, sites).mean()) > 0.9
    True
    """
    X = np.asarray(features, dtype=np.float64)
    sites = np.asarray(sites).astype(str)
    folds = _prediction_folds(sites, cv, random_state)
    if folds.splits is None:
        raise ValueError(folds.why_not)
    estimator = _site_classifier(classifier, X.shape)
    return np.array(
        [_fold_score(estimator, X[train], X[test], sites, train, test) for train, test in folds]
    )


_PREDICTION_METHOD = (
    "After harmonization, without leakage: in each fold the harmonizer is refitted on the "
    "training rows only, and the held-out rows are harmonized by that refit (with their "
    "sites), as a new cohort would be; the classifier is trained on the harmonized training "
    "rows and scored on the held-out ones."
)

_MIN_SCORED_ROWS = 4  # per site: at least 2 training rows in every fold (QDA, ComBat scale)


@dataclass
class _PredictionFolds:
    """Stratified folds of the site-prediction cross-validation over the scored sites.

    Iterating gives ``(train, test)`` row positions of the scored sites; ``fit_rows(train)``
    adds the rows of the sites too small to be scored, which every harmonizer fit sees."""

    splits: list | None
    unscored: np.ndarray  # rows of sites with too few rows to be scored
    unscored_sites: list
    n_scored_sites: int
    why_not: str = ""

    def __iter__(self):
        return iter(self.splits)

    def fit_rows(self, train):
        return np.sort(np.concatenate([train, self.unscored]))


def _prediction_folds(sites, cv, random_state):
    names, counts = np.unique(sites, return_counts=True)
    scored_names = names[counts >= _MIN_SCORED_ROWS]
    is_scored = np.isin(sites, scored_names)
    unscored_sites = names[counts < _MIN_SCORED_ROWS].tolist()
    if len(scored_names) < 2:
        return _PredictionFolds(
            None,
            np.flatnonzero(~is_scored),
            unscored_sites,
            len(scored_names),
            f"site prediction needs at least 2 sites with {_MIN_SCORED_ROWS} rows or more; "
            f"{len(scored_names)} of the {len(names)} sites have that many",
        )
    scored = np.flatnonzero(is_scored)
    n_splits = max(2, min(cv, int(counts[counts >= _MIN_SCORED_ROWS].min())))
    splitter = StratifiedKFold(n_splits, shuffle=True, random_state=random_state)
    splits = [
        (scored[train], scored[test])
        for train, test in splitter.split(np.zeros((scored.size, 1)), sites[scored])
    ]
    return _PredictionFolds(splits, np.flatnonzero(~is_scored), unscored_sites, len(scored_names))


def _site_classifier(classifier, shape):
    if classifier == "linear":
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    if classifier == "quadratic":
        n_components = max(1, min(10, shape[1], shape[0] // 4))
        return make_pipeline(
            StandardScaler(),
            PCA(n_components, random_state=0),
            QuadraticDiscriminantAnalysis(reg_param=0.1),
        )
    return classifier


def _fold_score(estimator, X_train, X_test, sites, train, test):
    """Balanced accuracy on the test rows of a classifier fitted on the training rows."""
    model = clone(estimator).fit(X_train, sites[train])
    return balanced_accuracy_score(sites[test], model.predict(X_test))


def covariance_distance(features, sites):
    """Mean Frobenius distance between the sites' covariance matrices, in correlation units.

    Each feature is scaled to unit variance over all rows; then for every pair of sites the
    Frobenius norm of the difference of their (n - 1) covariance matrices is computed, and the
    pairs are averaged. The matrices are never formed: ``||C_a - C_b||^2 = ||C_a||^2 +
    ||C_b||^2 - 2 tr(C_a C_b)`` with ``tr(C_a C_b) = ||Y_a Y_b^T||^2 / ((n_a - 1)(n_b - 1))``
    for centred rows ``Y``, so the cost is that of n x n products, for any number of features.

    Parameters
    ----------
    features : array-like of shape (n_samples, n_features)
    sites : array-like of shape (n_samples,)
        Each site needs at least 2 rows.

    Returns
    -------
    float

    Examples
    --------
    >>> import numpy as np
    >>> from kwneuro_sk.report import covariance_distance
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(400, 3))
    >>> sites = np.repeat(["a", "b"], 200)
    >>> same = covariance_distance(X, sites)  # sampling noise only
    >>> X[200:, 1] += 2 * X[200:, 0]  # site b: features 0 and 1 correlated
    >>> bool(covariance_distance(X, sites) > 3 * same)
    True
    """
    X = np.asarray(features, dtype=np.float64)
    scale = X.std(axis=0)
    X = X / np.where(scale > 0, scale, 1.0)
    _, index = _site_onehot(sites)
    centred = []
    for k in range(index.max() + 1):
        rows = X[index == k]
        centred.append((rows - rows.mean(axis=0)) / np.sqrt(len(rows) - 1))
    gram = [[np.sum((a @ b.T) ** 2) for b in centred] for a in centred]
    distances = [
        np.sqrt(max(gram[i][i] + gram[j][j] - 2 * gram[i][j], 0.0))
        for i in range(len(centred))
        for j in range(i)
    ]
    return float(np.mean(distances))


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


@dataclass
class HarmonizationReport:
    """An HTML harmonization report and the numbers in it.

    Attributes
    ----------
    html : str
        The whole page; figures are embedded PNG data (no network references).
    metrics : dict
        The numbers shown, by name (``site_r2_median_before``, ``site_accuracy_linear_after``,
        ``covariance_distance_covbat``, ...).
    """

    html: str
    metrics: dict = field(default_factory=dict)

    def save(self, path):
        """Write the page to ``path`` (UTF-8) and return the path."""
        path = Path(path)
        path.write_text(self.html, encoding="utf-8")
        return path

    def _repr_html_(self):  # shown inline in Jupyter
        return self.html


def _figure_png(fig):
    plt = plotting.load_pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _rows_of(harmonizer, X, batch, covariates):
    """Feature matrix (DataFrame), site labels and covariate frame of the rows given."""
    names = list(harmonizer.get_feature_names_out())
    covariate_cols = ColumnRoles.of(harmonizer).covariates
    if harmonizer.batch_col is not None:
        if not isinstance(X, pd.DataFrame) or harmonizer.batch_col not in X.columns:
            raise ValueError(
                f"X must be a DataFrame holding the site column "
                f"{harmonizer.batch_col!r}, as given to fit"
            )
        _check_covariate_columns(covariate_cols, X, "X")
        features = X[names] if all(n in X.columns for n in names) else None
        sites, cov = X[harmonizer.batch_col], X[covariate_cols]
    else:
        if batch is None:
            raise ValueError("batch= is needed: the harmonizer takes sites as a keyword")
        features = (
            X[names] if isinstance(X, pd.DataFrame) else pd.DataFrame(np.asarray(X), columns=names)
        )
        sites = batch
        if covariate_cols:
            if not isinstance(covariates, pd.DataFrame):
                raise ValueError(
                    f"covariates= is needed: a DataFrame holding the covariate column(s) "
                    f"{covariate_cols} the harmonizer was fitted with"
                )
            _check_covariate_columns(covariate_cols, covariates, "covariates=")
            cov = covariates[covariate_cols]
        else:
            cov = pd.DataFrame(index=range(len(features)))
    if features is None:
        raise ValueError(
            f"X lacks feature columns the harmonizer was fitted on: "
            f"{[n for n in names if n not in X.columns][:10]}"
        )
    return features.reset_index(drop=True), np.asarray(sites), cov.reset_index(drop=True)


def _check_covariate_columns(columns, frame, where):
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(
            f"covariate column(s) {missing} the harmonizer was fitted with are not in {where} "
            f"(columns: {list(frame.columns)[:20]})"
        )


def _subset(rows, X, batch, covariates, from_columns, subjects=None):
    """fit/transform arguments of some rows of the call (positions ``rows``)."""

    def take(obj):
        if obj is None:
            return None
        if isinstance(obj, (pd.DataFrame, pd.Series)):
            return obj.iloc[rows]
        return np.asarray(obj)[rows]

    if from_columns:
        return (take(X),), {}
    kwargs = {"batch": take(batch), "covariates": take(covariates)}
    if subjects is not None:  # longitudinal ComBat, keyword route
        kwargs["subjects"] = take(subjects)
    return (take(X),), kwargs


class _FoldFailure(Exception):
    """A fold of the site-prediction cross-validation could not be refitted or applied."""


def _refitted_predictions(harmonizer, X, batch, covariates, folds, is_covbat, subjects=None):
    """Per fold: the harmonizer refitted on the fold's training rows (and the rows of sites
    too small to be scored), then the training and held-out rows harmonized by it.

    Returns ``{key: [(train_values, test_values), ...]}`` for ``"after"`` (and
    ``"after_combat"``: the ComBat step of a refitted CovBat)."""
    from kwneuro_sk.combat.harmonizer import CombatHarmonizer

    from_columns = harmonizer.batch_col is not None
    result = {"after": [], "after_combat": []}
    for k, (train, test) in enumerate(folds):
        try:
            args, kwargs = _subset(
                folds.fit_rows(train), X, batch, covariates, from_columns, subjects
            )
            model = clone(harmonizer).fit(*args, **kwargs)
            models = {"after": model}
            if is_covbat:
                models["after_combat"] = CombatHarmonizer.from_estimates(model.estimates_)
            for key, fitted in models.items():
                values = []
                for rows in (train, test):
                    args, kwargs = _subset(rows, X, batch, covariates, from_columns, subjects)
                    values.append(np.asarray(fitted.transform(*args, **kwargs), dtype=np.float64))
                result[key].append(tuple(values))
        except ValueError as error:
            raise _FoldFailure(
                f"the harmonizer refitted on the training rows of cross-validation fold "
                f"{k + 1} of {len(folds.splits)} could not harmonize its rows ({error})"
            ) from error
    return result


def _encoded_covariates(harmonizer, cov):
    """The covariate design ``Z`` of the rows, encoded as the fitted model encodes it."""
    return CovariateEncoding.from_state(harmonizer.estimates_.info).transform(cov)


def _covariate_effects(harmonizer, after, sites, cov):
    """Covariate coefficients fitted by the harmonizer and re-estimated on harmonized data."""
    Z = _encoded_covariates(harmonizer, cov)
    if Z.shape[1] == 0:
        return None
    onehot, _ = _site_onehot(sites)
    design = np.hstack([onehot, Z])
    coef = np.linalg.lstsq(design, np.asarray(after, dtype=np.float64), rcond=None)[0]
    return np.asarray(harmonizer.beta_), coef[onehot.shape[1] :]


def _table(rows):
    cells = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows
    )
    return f"<table>{cells}</table>"


def _fmt(value):
    return f"{value:.3f}"


_STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1000px; color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; border-bottom: 2px solid #4477aa; padding-bottom: .2em; }
h2 { font-size: 1.2em; margin-top: 2em; color: #234; }
table { border-collapse: collapse; margin: .6em 0; font-size: .92em; }
th, td { border: 1px solid #ccd; padding: .25em .7em; text-align: left; }
th { background: #eef2f7; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; display: block; margin: .5em 0; }
p.note { color: #555; font-size: .9em; }
"""


_MAP_SLICES = 5  # axial slices per map in the montage
_MAP_SITES = 6  # sites drawn (the first, in fitted order)


def _site_effect_maps_section(harmonizer, plt):
    """A slice montage of gamma*, delta* (per site) and the pooled standard deviation, for a
    harmonizer whose model was made by harmonize_volumes (None otherwise)."""
    estimates = getattr(harmonizer, "estimates_", None)
    if estimates is None or "volumes" not in estimates.info:
        return None
    from kwneuro_sk.volumes import site_effect_maps

    images = site_effect_maps(estimates)
    mask = np.asarray(estimates.info["volumes"]["mask"], dtype=bool)
    filled = np.flatnonzero(mask.any(axis=(0, 1)))
    slices = np.unique(np.linspace(filled[0], filled[-1], _MAP_SLICES + 2).round().astype(int))
    slices = slices[1:-1] if len(slices) > 2 else slices
    sites = [str(s) for s in np.asarray(estimates.info["batches"])[:_MAP_SITES]]
    names = list(images)
    rows = [n for n in names if n.startswith("gamma_star_")][:_MAP_SITES]
    rows += [n for n in names if n.startswith("delta_star_")][:_MAP_SITES]
    rows.append("sigma")
    data = {name: images[name].get_fdata(dtype=np.float32) for name in rows}
    gamma_lim = max(float(np.abs(data[n][mask]).max()) for n in rows if "gamma" in n) or 1.0
    delta_lim = max(float(np.abs(np.log(data[n][mask])).max()) for n in rows if "delta" in n)
    fig, axes = plt.subplots(
        len(rows),
        len(slices),
        figsize=(1.6 * len(slices) + 1.6, 1.6 * len(rows)),
        squeeze=False,
        constrained_layout=True,
    )
    for r, name in enumerate(rows):
        volume = np.where(mask, data[name], np.nan)
        if name.startswith("gamma"):
            shown, style = volume, {"cmap": "RdBu_r", "vmin": -gamma_lim, "vmax": gamma_lim}
        elif name.startswith("delta"):  # a variance ratio: symmetric on a log scale
            lim = delta_lim or 1.0
            shown, style = np.log(volume), {"cmap": "PuOr_r", "vmin": -lim, "vmax": lim}
        else:
            shown, style = volume, {"cmap": "viridis"}
        for c, z in enumerate(slices):
            image = axes[r, c].imshow(shown[:, :, z].T, origin="lower", **style)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(f"z = {z}", fontsize="small")
        label = "log " + name if name.startswith("delta") else name
        axes[r, 0].set_ylabel(label, fontsize="small", parse_math=False)
        fig.colorbar(image, ax=axes[r, :].tolist(), shrink=0.8)
    more = len(estimates.info["batches"]) - len(sites)
    return (
        "Site-effect maps",
        "Where each site differs, voxel by voxel (axial slices of the mask): gamma* is the "
        "site's location in pooled standard deviations (0: no shift), delta* its variance "
        "ratio, drawn on a log scale (0: no change), and sigma the pooled residual standard "
        "deviation in image units. Write them as NIfTI files with "
        "VolumeEstimates.site_effect_maps or kwneuro-sk maps."
        + (f" The first {len(sites)} sites are drawn ({more} more)." if more > 0 else ""),
        _figure_png(fig),
        "",
    )


def harmonization_report(
    harmonizer,
    X,
    X_harmonized=None,
    *,
    batch=None,
    covariates=None,
    subjects=None,
    cv=5,
    max_features=3,
    title="Harmonization report",
):
    """Build a self-contained HTML report of a fitted harmonizer on some rows.

    Parameters
    ----------
    harmonizer : CombatHarmonizer or CovBatHarmonizer
        Fitted.
    X : DataFrame or array-like of shape (n_samples, n_columns)
        The rows before harmonization, in the form given to ``fit``/``transform`` (with the
        site and covariate columns when ``batch_col`` is set).
    X_harmonized : array-like of shape (n_samples, n_features_out), default=None
        The same rows harmonized; computed with ``harmonizer.transform`` when None.
    batch, covariates : default=None
        Sites and covariates, when the harmonizer takes them as keywords.
    subjects : array-like, default=None
        Subjects, when a longitudinal harmonizer (``subject_col``) takes them as keywords.
    cv : int, default=5
        Folds of the site-prediction cross-validation.
    max_features : int, default=3
        Features whose distributions are drawn (those with the largest site differences).
    title : str, default="Harmonization report"

    Returns
    -------
    HarmonizationReport
        ``.html`` (the page), ``.metrics`` (its numbers) and ``.save(path)``.

    Notes
    -----
    The distributions, variance shares and covariate effects describe the rows given as
    harmonized by ``harmonizer`` (``X_harmonized``). Site prediction after harmonization is
    measured without leakage: in each stratified fold a clone of the harmonizer is fitted on
    the training rows only, the classifier is trained on those rows harmonized by it, and
    scored on the held-out rows harmonized by it with their own sites (every site is in every
    training fold). With no site effect it is near chance, as a new cohort would see it.
    Sites with fewer than 4 rows are in every fit but not scored.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from kwneuro_sk import CombatHarmonizer
    >>> from kwneuro_sk.datasets import make_site_features
    >>> from kwneuro_sk.report import harmonization_report
    >>> data = make_site_features(n_subjects=90, n_features=6).drop(columns="subject")
    >>> combat = CombatHarmonizer("site", ["sex", "diagnosis"], ["age"]).fit(data)
    >>> report = harmonization_report(combat, data)
    >>> report.html.startswith("<!DOCTYPE html>")
    True
    >>> report.metrics["site_accuracy_linear_after"] < report.metrics["site_accuracy_linear_before"]
    True
    >>> path = report.save("report.html")  # doctest: +SKIP
    """
    from kwneuro_sk.combat.covbat import CovBatHarmonizer
    from kwneuro_sk.combat.harmonizer import CombatHarmonizer

    check_is_fitted(harmonizer, "gamma_star_")
    before, sites, cov = _rows_of(harmonizer, X, batch, covariates)
    if X_harmonized is None:
        kwargs = (
            {} if harmonizer.batch_col is not None else {"batch": batch, "covariates": covariates}
        )
        if subjects is not None:
            kwargs["subjects"] = subjects
        X_harmonized = harmonizer.transform(X, **kwargs)
    after = np.asarray(X_harmonized, dtype=np.float64)
    if after.shape != before.shape:
        raise ValueError(
            f"X_harmonized has shape {after.shape}; the {before.shape[1]} "
            f"features of {before.shape[0]} rows were expected"
        )
    after_frame = pd.DataFrame(after, columns=before.columns)
    site_names, counts = np.unique(sites.astype(str), return_counts=True)
    Z = _encoded_covariates(harmonizer, cov)
    is_covbat = isinstance(harmonizer, CovBatHarmonizer)
    method = "CovBat" if is_covbat else "ComBat"
    notes = []
    plt = plotting.load_pyplot()
    metrics = {
        "n_samples": len(sites),
        "n_features": before.shape[1],
        "n_sites": len(site_names),
    }
    if getattr(harmonizer, "subject_col", None) is not None:  # longitudinal ComBat
        method = "longitudinal ComBat"
        metrics["n_subjects_fitted"] = len(harmonizer.subjects_)
        metrics["singular_fits"] = int(np.sum(harmonizer.singular_fit_))
    sections = []

    # 1. distributions
    fig = plotting.plot_site_distributions(before, after_frame, sites, max_features=max_features)
    sections.append(
        (
            "Per-site distributions",
            "The features with the largest site differences before harmonization "
            "(one-way ANOVA F): one histogram per site, before and after.",
            _figure_png(fig),
            "",
        )
    )

    # 2. fitted site effects
    fig = plotting.plot_combat_estimates(harmonizer)
    table = _table(
        [
            (f"site {s} (n={n})", f"mean gamma* {np.mean(g):+.3f}, mean delta* {np.mean(d):.3f}")
            for s, n, g, d in zip(
                harmonizer.batches_,
                harmonizer.n_samples_per_batch_,
                harmonizer.gamma_star_,
                harmonizer.delta_star_,
            )
        ]
    )
    sections.append(
        (
            "Fitted site effects (gamma*, delta*)",
            "Location (gamma*) and scale (delta*) of each site, in standardized units; "
            "no site effect is gamma = 0, delta = 1.",
            _figure_png(fig),
            table,
        )
    )

    # 3. variance explained by site
    r2_before = site_variance_explained(before, sites, Z)
    r2_after = site_variance_explained(after, sites, Z)
    for stage, r2 in (("before", r2_before), ("after", r2_after)):
        metrics[f"site_r2_median_{stage}"] = float(np.median(r2))
        metrics[f"site_r2_max_{stage}"] = float(np.max(r2))
    fig, ax = plt.subplots(figsize=(7.5, 3.2), constrained_layout=True)
    order = np.argsort(-r2_before)
    rank = np.arange(1, len(order) + 1)
    ax.plot(rank, r2_before[order], "o-", markersize=3, color="C3", label="before")
    ax.plot(rank, r2_after[order], "o-", markersize=3, color="C0", label="after")
    ax.set_xlabel("feature (sorted by share before)")
    ax.set_ylabel("share of variance explained by site")
    ax.set_ylim(bottom=0)
    ax.legend()
    table = _table(
        [
            (
                "median / max before",
                f"{_fmt(metrics['site_r2_median_before'])} / {_fmt(metrics['site_r2_max_before'])}",
            ),
            (
                "median / max after",
                f"{_fmt(metrics['site_r2_median_after'])} / {_fmt(metrics['site_r2_max_after'])}",
            ),
        ]
    )
    sections.append(
        (
            "Variance explained by site, per feature",
            "(RSS without site - RSS with site) / total sum of squares, with the "
            "covariates in both models.",
            _figure_png(fig),
            table,
        )
    )

    # 4. site predictability
    folds = _prediction_folds(sites.astype(str), cv, 0)
    labels = sites.astype(str)
    inputs = [("before", "before"), ("after " + method, "after")]
    if is_covbat:
        inputs.insert(1, ("after ComBat", "after_combat"))
    refitted = None
    if folds.splits is not None:
        try:
            refitted = _refitted_predictions(
                harmonizer, X, batch, covariates, folds, is_covbat, subjects
            )
        except _FoldFailure as failure:
            notes.append(
                f"Site predictability is not shown: {failure}. Rare categorical levels or "
                "sites with few rows can leave a fold without them; a smaller cv helps."
            )
    if refitted is not None:
        before_values = before.to_numpy(dtype=np.float64)
        prediction_chance = 1.0 / folds.n_scored_sites
        metrics["chance"] = prediction_chance
        kinds = ("linear", "quadratic")
        fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.6), constrained_layout=True)
        rows = []
        for ax, kind in zip(axes, kinds):
            estimator = _site_classifier(kind, before.shape)
            scores = {}
            for label, key in inputs:
                per_fold = np.array(
                    [
                        _fold_score(
                            estimator,
                            *(
                                (before_values[train], before_values[test])
                                if key == "before"
                                else refitted[key][k]
                            ),
                            labels,
                            train,
                            test,
                        )
                        for k, (train, test) in enumerate(folds)
                    ]
                )
                scores[label] = per_fold
                metrics[f"site_accuracy_{kind}_{key}"] = float(per_fold.mean())
                rows.append((f"{kind}, {label}", _fmt(per_fold.mean())))
            plotting.plot_site_predictability(
                scores,
                chance=prediction_chance,
                metric="balanced accuracy",
                ax=ax,
                title=f"{kind} classifier",
            )
        left_out = (
            f" Sites with fewer than {_MIN_SCORED_ROWS} rows are not scored (their rows are "
            f"in every harmonizer fit): {', '.join(folds.unscored_sites)}."
            if folds.unscored_sites
            else ""
        )
        sections.append(
            (
                "Site predictability (cross-validated)",
                f"Balanced accuracy of predicting the site ({folds.n_scored_sites} sites, "
                f"chance {prediction_chance:.2f}) with {len(folds.splits)}-fold "
                "stratified cross-validation: logistic regression (linear: site means) and "
                "quadratic discriminant analysis on up to 10 principal components (quadratic: "
                f"site covariances too). {_PREDICTION_METHOD}{left_out}",
                _figure_png(fig),
                _table(rows),
            )
        )
    elif folds.splits is None:
        notes.append(f"Site predictability is not shown: {folds.why_not}.")

    # 5. covariate effects
    effects = _covariate_effects(harmonizer, after, sites, cov)
    if effects is not None:
        fitted, re_estimated = effects
        names = list(harmonizer.covariate_names_)
        fig, axes = plt.subplots(
            1,
            len(names),
            figsize=(3.3 * len(names) + 0.5, 3.3),
            constrained_layout=True,
            squeeze=False,
        )
        rows = []
        for k, (ax, name) in enumerate(zip(axes[0], names)):
            x, y = fitted[k], re_estimated[k]
            corr = float(np.corrcoef(x, y)[0, 1]) if np.std(x) > 0 and np.std(y) > 0 else 1.0
            metrics[f"covariate_effect_correlation_{name}"] = corr
            ax.scatter(x, y, s=10, alpha=0.7)
            lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
            ax.plot([lo, hi], [lo, hi], "--", color="0.4", linewidth=1)
            ax.set_title(f"{name}: r = {corr:.3f}", fontsize="medium", parse_math=False)
            ax.set_xlabel("fitted (before harmonization)")
            ax.set_ylabel("re-estimated after")
            rows.append((name, f"r = {corr:.3f}"))
        sections.append(
            (
                "Covariate effects kept",
                "Per feature, each covariate's coefficient fitted by the harmonizer "
                "on the data before harmonization (x) against the coefficient "
                "re-estimated on the harmonized data (y), both with site intercepts. "
                "On the diagonal: the effect is preserved.",
                _figure_png(fig),
                _table(rows),
            )
        )

    # 6. covariance between sites
    if is_covbat:
        kwargs = (
            {} if harmonizer.batch_col is not None else {"batch": batch, "covariates": covariates}
        )
        after_combat = CombatHarmonizer.from_estimates(harmonizer.estimates_).transform(X, **kwargs)
        paired = np.isin(labels, site_names[counts >= 2])  # a covariance needs 2 rows
        if np.unique(labels[paired]).size >= 2:
            distance = {
                label: covariance_distance(
                    np.asarray(data, dtype=np.float64)[paired], labels[paired]
                )
                for label, data in (
                    ("before", before),
                    ("after ComBat", after_combat),
                    ("after CovBat", after),
                )
            }
            metrics["covariance_distance_before"] = distance["before"]
            metrics["covariance_distance_combat"] = distance["after ComBat"]
            metrics["covariance_distance_covbat"] = distance["after CovBat"]
            fig, ax = plt.subplots(figsize=(5.5, 3.2), constrained_layout=True)
            ax.bar(list(distance), list(distance.values()), color=["C3", "C1", "C0"], alpha=0.8)
            ax.set_ylabel("mean Frobenius distance")
            ax.set_title("between-site covariance distance", fontsize="medium")
            single = site_names[counts < 2].tolist()
            sections.append(
                (
                    "Between-site covariance (CovBat)",
                    f"Mean over site pairs of the Frobenius distance between the sites' "
                    f"covariance matrices (features scaled to unit variance). CovBat "
                    f"harmonized {harmonizer.n_components_} principal component scores."
                    + (
                        f" Sites with a single row have no covariance: {', '.join(single)}."
                        if single
                        else ""
                    ),
                    _figure_png(fig),
                    _table([(k, _fmt(v)) for k, v in distance.items()]),
                )
            )
        else:
            notes.append(
                "The between-site covariance is not shown: fewer than 2 sites have 2 rows or more."
            )

    # 7. site-effect maps of a voxel-wise model (harmonize_volumes)
    maps_section = _site_effect_maps_section(harmonizer, plt)
    if maps_section is not None:
        sections.append(maps_section)

    options = {k: v for k, v in harmonizer.get_params().items() if v is not None}
    summary = _table(
        [
            ("method", method),
            ("rows / features / sites", f"{len(sites)} / {before.shape[1]} / {len(site_names)}"),
            ("rows per site", ", ".join(f"{s}: {n}" for s, n in zip(site_names, counts))),
            ("covariates", ", ".join(harmonizer.covariate_names_) or "none"),
            ("options", ", ".join(f"{k}={v!r}" for k, v in options.items())),
            (
                "site share of variance, median (before -> after)",
                f"{_fmt(metrics['site_r2_median_before'])} -> "
                f"{_fmt(metrics['site_r2_median_after'])}",
            ),
        ]
        + (
            [
                (
                    "site prediction, linear (before -> after with the harmonizer refitted "
                    "in each fold; chance)",
                    f"{_fmt(metrics['site_accuracy_linear_before'])} -> "
                    f"{_fmt(metrics['site_accuracy_linear_after'])}; {metrics['chance']:.2f}",
                ),
                (
                    "site prediction, quadratic (before -> after)",
                    f"{_fmt(metrics['site_accuracy_quadratic_before'])} -> "
                    f"{_fmt(metrics['site_accuracy_quadratic_after'])}",
                ),
            ]
            if "site_accuracy_linear_after" in metrics
            else []
        )
        + (
            [
                (
                    "between-site covariance distance (before -> ComBat -> CovBat)",
                    f"{_fmt(metrics['covariance_distance_before'])} -> "
                    f"{_fmt(metrics['covariance_distance_combat'])} -> "
                    f"{_fmt(metrics['covariance_distance_covbat'])}",
                )
            ]
            if "covariance_distance_covbat" in metrics
            else []
        )
    )
    body = [f"<h1>{html.escape(title)}</h1>", "<h2>Summary</h2>", summary]
    body += [f'<p class="note">{html.escape(note)}</p>' for note in notes]
    for heading, text, png, extra in sections:
        body.append(f"<h2>{html.escape(heading)}</h2><p>{html.escape(text)}</p>")
        body.append(f'<img alt="{html.escape(heading)}" src="data:image/png;base64,{png}">')
        body.append(extra)
    body.append('<p class="note">Generated by kwneuro_sk.report.harmonization_report.</p>')
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )
    return HarmonizationReport(page, metrics)
