"""Figures to check a harmonization: site distributions, ComBat estimates, site predictability.

matplotlib is an optional dependency (``pip install "kwneuro_sk[plotting]"``); it is imported
when a function is called, not when this module is imported. Every function returns the
:class:`matplotlib.figure.Figure` it drew and never calls ``show``: display or save it as you
would any figure (``fig.savefig("combat.png")``).
"""

from __future__ import annotations

import warnings
from numbers import Integral, Real

import numpy as np
import pandas as pd
from sklearn.feature_selection import f_classif
from sklearn.utils._param_validation import Interval, validate_params

__all__ = ["plot_combat_estimates", "plot_site_distributions", "plot_site_predictability"]

_INSTALL_HINT = 'Plotting needs matplotlib: pip install "kwneuro_sk[plotting]"'


def load_pyplot():
    """matplotlib.pyplot, or an ImportError that says how to install it (for the figures
    here and those of :mod:`kwneuro_sk.report`)."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return plt


# --------------------------------------------------------------------------------------------
# Per-site distributions before and after
# --------------------------------------------------------------------------------------------


@validate_params(
    {
        "before": ["array-like"],
        "after": ["array-like"],
        "sites": ["array-like"],
        "features": ["array-like", str, Integral, None],
        "max_features": [Interval(Integral, 1, None, closed="left")],
        "bins": [Interval(Integral, 1, None, closed="left")],
        "figsize": ["array-like", None],
    },
    prefer_skip_nested_validation=True,
)
def plot_site_distributions(
    before,
    after,
    sites,
    features=None,
    *,
    max_features: int = 4,
    bins: int = 20,
    figsize=None,
):
    """Per-site histograms of a few features, before and after harmonization.

    One row per feature, two columns (before, after) sharing the bins and the x axis, one step
    histogram per site. Before harmonization the sites' histograms are shifted and stretched;
    after, they should overlap (up to real differences in the sites' populations).

    Parameters
    ----------
    before : pandas.DataFrame or array-like of shape (n_samples, n_features)
        Feature values before harmonization. Column names, when present, name the features.
    after : pandas.DataFrame or array-like of shape (n_samples, n_features)
        The same rows and features after harmonization.
    sites : array-like of shape (n_samples,)
        Site label of each row.
    features : list of str or int, default=None
        Features to draw, by name (DataFrame input) or position. ``None`` picks the
        ``max_features`` features whose site differences are largest before harmonization
        (one-way ANOVA F statistic).
    max_features : int, default=4
        How many features to pick when ``features`` is None.
    bins : int, default=20
        Number of histogram bins per feature.
    figsize : tuple of float, default=None
        Figure size in inches; by default 9 wide and 2.3 per feature.

    Returns
    -------
    matplotlib.figure.Figure
        Axes in row-major order: ``fig.axes[2 * k]`` is feature ``k`` before,
        ``fig.axes[2 * k + 1]`` after.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from kwneuro_sk import CombatHarmonizer
    >>> from kwneuro_sk.datasets import make_site_features
    >>> from kwneuro_sk.plotting import plot_site_distributions
    >>> data = make_site_features(n_subjects=90, n_features=6)
    >>> harmonizer = CombatHarmonizer("site", ["sex", "diagnosis"], ["age"])
    >>> after = harmonizer.fit_transform(data.drop(columns="subject"))
    >>> before = data[harmonizer.get_feature_names_out()]
    >>> fig = plot_site_distributions(before, after, data["site"], max_features=2)
    >>> len(fig.axes)
    4
    """
    plt = load_pyplot()
    names, before = _as_matrix(before, "before")
    _, after = _as_matrix(after, "after")
    if after.shape != before.shape:
        raise ValueError(
            f"before and after must have the same shape, got {before.shape} and {after.shape}."
        )
    sites = _as_labels(sites, before.shape[0], "sites")
    site_names, site_index = np.unique(sites, return_inverse=True)

    if features is None:
        columns = np.argsort(-_site_f_statistic(before, site_index))[:max_features]
    else:
        columns = _feature_positions(features, names)

    n_rows = len(columns)
    fig, axes = plt.subplots(
        n_rows,
        2,
        figsize=figsize or (9.0, 0.6 + 2.3 * n_rows),
        squeeze=False,
        constrained_layout=True,
    )
    colors = _site_colors(plt, len(site_names))
    for row, column in enumerate(columns):
        values = np.concatenate([before[:, column], after[:, column]])
        edges = np.histogram_bin_edges(values[np.isfinite(values)], bins=bins)
        for ax, data, stage in zip(axes[row], (before, after), ("before", "after")):
            for s, site in enumerate(site_names):
                x = data[site_index == s, column]
                ax.hist(
                    x[np.isfinite(x)],
                    bins=edges,
                    density=True,
                    histtype="step",
                    linewidth=1.5,
                    color=colors[s],
                    label=str(site),
                )
            ax.set_title(
                f"{names[column]}: {stage} harmonization", fontsize="medium", parse_math=False
            )
            ax.set_yticks([])
        axes[row, 1].sharex(axes[row, 0])
        axes[row, 0].set_ylabel("density")
    _as_text(axes[0, 1].legend(title="site", fontsize="small", loc="upper right").get_texts())
    return fig


# --------------------------------------------------------------------------------------------
# Fitted ComBat estimates
# --------------------------------------------------------------------------------------------


@validate_params(
    {
        "harmonizer_or_estimates": "no_validation",
        "show_hat": ["boolean"],
        "max_features": [Interval(Integral, 1, None, closed="left")],
        "figsize": ["array-like", None],
    },
    prefer_skip_nested_validation=True,
)
def plot_combat_estimates(
    harmonizer_or_estimates, *, show_hat: bool = True, max_features: int = 2000, figsize=None
):
    """The fitted site effects of ComBat: gamma* (location) and delta* (scale) per site.

    One point per feature at each site. Filled points are the empirical-Bayes estimates
    (``gamma_star_``, ``delta_star_``); hollow points, when ``show_hat`` is True, are the
    per-feature least-squares estimates (``gamma_hat_``, ``delta_hat_``) they were shrunk
    from. Both are in the standardized units ComBat works in (features divided by their
    pooled standard deviation): no site effect is gamma = 0 and delta = 1, drawn as dashed
    lines.

    Parameters
    ----------
    harmonizer_or_estimates : CombatHarmonizer or CombatEstimates
        A fitted :class:`~kwneuro_sk.CombatHarmonizer` (or any object with ``batches_``,
        ``gamma_star_`` and ``delta_star_`` of shape (n_sites, n_features), optionally
        ``gamma_hat_`` and ``delta_hat_``), or a :class:`~kwneuro_sk.CombatEstimates`
        (its ``estimates`` dict and ``info["batches"]``).
    show_hat : bool, default=True
        Also draw the estimates before shrinkage when available.
    max_features : int, default=2000
        Draw at most this many features (a fixed random subset, the same at every site), so
        that voxel-wise estimates with 10^5 features stay quick and readable.
    figsize : tuple of float, default=None
        Figure size in inches; by default it grows with the number of sites.

    Returns
    -------
    matplotlib.figure.Figure
        Two axes: ``fig.axes[0]`` gamma, ``fig.axes[1]`` delta; one x tick per site.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from kwneuro_sk import CombatHarmonizer
    >>> from kwneuro_sk.datasets import make_site_features
    >>> from kwneuro_sk.plotting import plot_combat_estimates
    >>> data = make_site_features(n_subjects=90, n_features=6)
    >>> harmonizer = CombatHarmonizer("site", ["sex", "diagnosis"], ["age"])
    >>> harmonizer = harmonizer.fit(data.drop(columns="subject"))
    >>> fig = plot_combat_estimates(harmonizer)
    >>> [ax.get_ylabel() for ax in fig.axes]
    ['gamma (location)', 'delta (scale)']
    """
    plt = load_pyplot()
    sites, estimates = _combat_arrays(harmonizer_or_estimates)
    n_sites = len(sites)
    n_features = estimates["gamma_star"].shape[1]
    rng = np.random.default_rng(0)  # fixed subset and jitter: same figure for same estimates
    if n_features > max_features:
        shown = np.sort(rng.choice(n_features, size=max_features, replace=False))
        estimates = {name: value[:, shown] for name, value in estimates.items()}

    fig, axes = plt.subplots(
        1, 2, figsize=figsize or (3.0 + 1.4 * n_sites, 3.8), constrained_layout=True
    )
    panels = (("gamma", "gamma (location)", 0.0), ("delta", "delta (scale)", 1.0))
    for ax, (name, label, no_effect) in zip(axes, panels):
        star = estimates[f"{name}_star"]
        hat = estimates.get(f"{name}_hat") if show_hat else None
        jitter = rng.uniform(-0.18, 0.18, size=star.shape[1])
        for s in range(n_sites):
            if hat is not None:
                ax.scatter(
                    s + jitter,
                    hat[s],
                    s=14,
                    facecolors="none",
                    edgecolors="0.55",
                    linewidths=0.8,
                    label=f"{name} hat (least squares)" if s == 0 else None,
                )
            ax.scatter(
                s + jitter,
                star[s],
                s=14,
                color="C0",
                label=f"{name}* (empirical Bayes)" if s == 0 else None,
            )
        ax.axhline(no_effect, color="0.3", linestyle="--", linewidth=1)
        ax.set_xticks(range(n_sites), [str(site) for site in sites], parse_math=False)
        ax.set_xlim(-0.6, n_sites - 0.4)
        ax.set_xlabel("site")
        ax.set_ylabel(label)
        ax.legend(fontsize="small", loc="best")
    drawn = estimates["gamma_star"].shape[1]
    subset = f"{drawn} of {n_features}" if drawn < n_features else f"{n_features}"
    fig.suptitle(f"ComBat site effects ({subset} features, standardized units)")
    return fig


def _combat_arrays(source):
    """Site labels and the gamma/delta arrays of a fitted harmonizer or a CombatEstimates."""
    names = ("gamma_star", "delta_star", "gamma_hat", "delta_hat")
    if hasattr(source, "estimates") and hasattr(source, "info"):
        found = {name: source.estimates[name] for name in names if name in source.estimates}
        sites = source.info.get("batches")
    elif hasattr(source, "gamma_star_"):
        found = {name: getattr(source, name + "_") for name in names if hasattr(source, name + "_")}
        sites = getattr(source, "batches_", None)
    else:
        raise TypeError(
            "harmonizer_or_estimates must be a fitted CombatHarmonizer or a CombatEstimates, "
            f"got {type(source).__name__}. Fit the harmonizer first."
        )
    if sites is None or "gamma_star" not in found or "delta_star" not in found:
        raise ValueError(
            "harmonizer_or_estimates has no batches/gamma_star/delta_star: is it fitted?"
        )
    sites = np.asarray(sites)
    arrays = {}
    for name, value in found.items():
        value = np.asarray(value, dtype=float)
        if value.ndim != 2 or value.shape[0] != sites.size:
            raise ValueError(
                f"{name} must have shape (n_sites={sites.size}, n_features), got {value.shape}."
            )
        arrays[name] = value
    return sites, arrays


# --------------------------------------------------------------------------------------------
# Site predictability
# --------------------------------------------------------------------------------------------


@validate_params(
    {
        "scores": [dict, pd.Series, pd.DataFrame],
        "chance": [Interval(Real, None, None, closed="neither"), None],
        "metric": [str],
        "title": [str],
        "ax": "no_validation",
        "figsize": ["array-like", None],
    },
    prefer_skip_nested_validation=True,
)
def plot_site_predictability(
    scores,
    *,
    chance: float | None = None,
    metric: str = "accuracy",
    title: str = "Site predictability",
    ax=None,
    figsize=None,
):
    """Bar summary of how well a classifier predicts the site, e.g. before vs after ComBat.

    Site predictability is the standard check of harmonization: before, a classifier tells the
    sites apart from the features; after, it should do no better than chance. Each bar is the
    mean score of a condition, with its cross-validation folds drawn as points and their
    standard deviation as an error bar.

    Parameters
    ----------
    scores : dict or pandas.DataFrame or pandas.Series
        Condition name -> score or per-fold scores (e.g. the output of
        ``sklearn.model_selection.cross_val_score``). A DataFrame has one column per condition
        and one row per fold; a Series one value per condition.
    chance : float, default=None
        Chance level to draw as a dashed line, e.g. ``1 / n_sites`` for balanced accuracy or
        the majority-site fraction for accuracy. Nothing is drawn when None.
    metric : str, default="accuracy"
        Label of the y axis.
    title : str, default="Site predictability"
        Axes title.
    ax : matplotlib.axes.Axes, default=None
        Axes to draw on; a new figure is made when None.
    figsize : tuple of float, default=None
        Size of the new figure in inches; ignored when ``ax`` is given.

    Returns
    -------
    matplotlib.figure.Figure
        The figure holding the axes: one bar per condition, with x tick labels naming them.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from kwneuro_sk.plotting import plot_site_predictability
    >>> fig = plot_site_predictability(
    ...     {"raw": [0.97, 1.0, 0.93], "ComBat": [0.30, 0.37, 0.33]}, chance=1 / 3
    ... )
    >>> [label.get_text() for label in fig.axes[0].get_xticklabels()]
    ['raw', 'ComBat']
    """
    plt = load_pyplot()
    folds = _score_table(scores)

    if ax is None:
        fig, ax = plt.subplots(
            figsize=figsize or (2.4 + 1.1 * len(folds), 3.8), constrained_layout=True
        )
    else:
        fig = ax.figure
    positions = np.arange(len(folds))
    means = [np.mean(values) for values in folds.values()]
    errors = [np.std(values) if len(values) > 1 else 0.0 for values in folds.values()]
    bars = ax.bar(
        positions,
        means,
        yerr=errors,
        capsize=4,
        width=0.6,
        color=[f"C{k % 10}" for k in positions],
        alpha=0.75,
    )
    for position, values in zip(positions, folds.values()):
        if len(values) > 1:
            ax.scatter(np.full(len(values), position), values, s=12, color="black", zorder=3)
    for bar, mean in zip(bars, means):  # the mean, written at the foot of its bar
        ax.annotate(
            f"{mean:.2f}",
            (bar.get_x() + bar.get_width() / 2, 0),
            xytext=(0, 4),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize="small",
        )
    if chance is not None:
        ax.axhline(chance, color="0.3", linestyle="--", linewidth=1, label=f"chance ({chance:.2f})")
        ax.legend(fontsize="small", loc="upper right")
    ax.set_xticks(positions, list(folds), parse_math=False)
    ax.set_ylabel(metric)
    top = max([1.0, *(np.max(values) for values in folds.values())])
    ax.set_ylim(0, top * 1.08)
    ax.set_title(title, fontsize="medium")
    return fig


def _score_table(scores) -> dict[str, np.ndarray]:
    """Condition name -> 1-D array of finite scores."""
    if isinstance(scores, pd.DataFrame):
        items = [(column, scores[column].dropna()) for column in scores.columns]
    elif isinstance(scores, pd.Series):
        items = list(scores.items())
    elif isinstance(scores, dict):
        items = list(scores.items())
    else:
        raise TypeError(
            f"scores must be a dict, pandas Series or DataFrame, got {type(scores).__name__}."
        )
    if not items:
        raise ValueError("scores is empty: give at least one condition.")
    table = {}
    for name, values in items:
        try:
            values = np.atleast_1d(np.asarray(values, dtype=float)).ravel()
        except (TypeError, ValueError) as exc:
            raise TypeError(f"scores[{name!r}] must be a number or numbers.") from exc
        if values.size == 0 or not np.all(np.isfinite(values)):
            raise ValueError(f"scores[{name!r}] must hold finite numbers, got {values}.")
        table[str(name)] = values
    return table


# --------------------------------------------------------------------------------------------
# Input helpers
# --------------------------------------------------------------------------------------------


def _as_text(texts):
    """Draw labels (site, feature and condition names) as written: a ``$`` in a name is a
    dollar sign, not the start of matplotlib mathtext."""
    for text in texts:
        text.set_parse_math(False)


def _as_matrix(data, name) -> tuple[list[str], np.ndarray]:
    """Feature names and a float (n_samples, n_features) array."""
    if isinstance(data, pd.DataFrame):
        names = [str(column) for column in data.columns]
        try:
            values = data.to_numpy(dtype=float)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must hold numbers only (feature columns).") from exc
    else:
        try:
            values = np.asarray(data, dtype=float)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must be a 2-D array of numbers or a DataFrame.") from exc
        names = [f"feature {j}" for j in range(values.shape[1])] if values.ndim == 2 else []
    if values.ndim != 2 or min(values.shape) == 0:
        raise ValueError(f"{name} must be 2-D (n_samples, n_features), got shape {values.shape}.")
    return names, values


def _as_labels(labels, n_samples, name) -> np.ndarray:
    labels = np.asarray(labels, dtype=object)
    if labels.ndim != 1 or labels.size != n_samples:
        raise ValueError(f"{name} must have one label per row ({n_samples}), got {labels.shape}.")
    return labels.astype(str)


def _feature_positions(features, names) -> list[int]:
    if isinstance(features, (str, Integral)):
        features = [features]
    positions = []
    for feature in features:
        if isinstance(feature, Integral) and not isinstance(feature, bool):
            if not -len(names) <= feature < len(names):
                raise ValueError(f"features: position {feature} is out of range ({len(names)}).")
            positions.append(int(feature) % len(names))
        elif str(feature) in names:
            positions.append(names.index(str(feature)))
        else:
            raise ValueError(f"features: unknown feature {feature!r}.")
    if not positions:
        raise ValueError("features is empty: give at least one feature or None.")
    return positions


def _site_f_statistic(values, groups) -> np.ndarray:
    """One-way ANOVA F statistic of the sites per column (NaN filled with the column mean)."""
    if groups.max() < 1:
        return np.zeros(values.shape[1])
    filled = np.where(np.isfinite(values), values, np.nanmean(values, axis=0))
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", UserWarning)  # constant features: F is NaN, then 0
        f_statistic, _ = f_classif(filled, groups)
    return np.nan_to_num(f_statistic)


def _site_colors(plt, n_sites):
    cmap = plt.get_cmap("tab10" if n_sites <= 10 else "tab20")
    return [cmap(k % cmap.N) for k in range(n_sites)]
