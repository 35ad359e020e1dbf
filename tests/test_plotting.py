"""Tests of kwneuro_sk.plotting: figures, their content, and the optional matplotlib import."""

import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from sklearn.feature_selection import f_classif

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from kwneuro_sk import CombatHarmonizer  # noqa: E402
from kwneuro_sk.combat.estimates import CombatEstimates  # noqa: E402
from kwneuro_sk.datasets import make_site_features  # noqa: E402
from kwneuro_sk.plotting import (  # noqa: E402
    plot_combat_estimates,
    plot_site_distributions,
    plot_site_predictability,
)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def fitted():
    data = make_site_features(90, 6, 3, random_state=0)
    harmonizer = CombatHarmonizer("site", ["sex", "diagnosis"], ["age"])
    after = harmonizer.fit_transform(data.drop(columns="subject"))
    before = data[harmonizer.get_feature_names_out()]
    return data, harmonizer, before, pd.DataFrame(after, columns=before.columns)


def step_patches(ax):
    return [p for p in ax.patches if p.get_label() and not p.get_label().startswith("_")]


# --------------------------------------------------------------------------------------------
# plot_site_distributions
# --------------------------------------------------------------------------------------------


def test_distributions_layout(fitted):
    data, _, before, after = fitted
    fig = plot_site_distributions(before, after, data["site"], max_features=3)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 6
    for k, ax in enumerate(fig.axes):
        stage = "before" if k % 2 == 0 else "after"
        assert ax.get_title().endswith(f"{stage} harmonization")
        assert len(step_patches(ax)) == 3  # one histogram per site
    legend = fig.axes[1].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["site1", "site2", "site3"]


def test_distributions_pick_the_most_site_affected_features(fitted):
    data, _, before, after = fitted
    shifted = before.copy()
    shifted["feature_03"] += np.where(data["site"] == "site2", 5.0, 0.0)
    fig = plot_site_distributions(shifted, after, data["site"], max_features=1)
    assert fig.axes[0].get_title().startswith("feature_03")
    # in general: the largest one-way ANOVA F of the sites, in decreasing order
    f_statistic, _ = f_classif(before, data["site"])
    expected = list(before.columns[np.argsort(-f_statistic)[:3]])
    fig = plot_site_distributions(before, after, data["site"], max_features=3)
    assert [ax.get_title().split(":")[0] for ax in fig.axes[::2]] == expected


def test_distributions_named_and_positional_features(fitted):
    data, _, before, after = fitted
    fig = plot_site_distributions(before, after, data["site"], features=["feature_05", 0])
    titles = [ax.get_title() for ax in fig.axes[::2]]
    assert titles[0].startswith("feature_05") and titles[1].startswith("feature_00")
    fig = plot_site_distributions(
        before.to_numpy(), after.to_numpy(), data["site"].to_numpy(), features=1
    )
    assert fig.axes[0].get_title().startswith("feature 1")


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"after": np.zeros((3, 3))}, ValueError, "same shape"),
        ({"sites": ["a", "b"]}, ValueError, "sites"),
        ({"features": ["nope"]}, ValueError, "features"),
        ({"features": [99]}, ValueError, "features"),
        ({"max_features": 0}, ValueError, "max_features"),
        ({"bins": "auto"}, TypeError, "bins"),
        ({"before": np.zeros(5)}, ValueError, "before"),
    ],
)
def test_distributions_bad_input(fitted, change, error, match):
    data, _, before, after = fitted
    kwargs = {"before": before, "after": after, "sites": data["site"], **change}
    with pytest.raises(error, match=match):
        plot_site_distributions(**kwargs)


# --------------------------------------------------------------------------------------------
# plot_combat_estimates
# --------------------------------------------------------------------------------------------


def test_estimates_from_harmonizer(fitted):
    _, harmonizer, _, _ = fitted
    fig = plot_combat_estimates(harmonizer)
    assert isinstance(fig, Figure)
    gamma_ax, delta_ax = fig.axes
    assert gamma_ax.get_ylabel() == "gamma (location)"
    assert delta_ax.get_ylabel() == "delta (scale)"
    for ax in fig.axes:
        assert [t.get_text() for t in ax.get_xticklabels()] == ["site1", "site2", "site3"]
        assert len(ax.collections) == 6  # hat and star per site
    # the filled points are gamma_star_, site by site
    star_points = gamma_ax.collections[1].get_offsets()
    np.testing.assert_allclose(star_points[:, 1], harmonizer.gamma_star_[0])
    assert gamma_ax.get_lines()[0].get_ydata()[0] == 0.0
    assert delta_ax.get_lines()[0].get_ydata()[0] == 1.0


def test_estimates_from_combat_estimates_and_plain_object(fitted):
    _, harmonizer, _, _ = fitted
    fig = plot_combat_estimates(harmonizer.estimates_, show_hat=False)
    assert all(len(ax.collections) == 3 for ax in fig.axes)
    plain = SimpleNamespace(
        batches_=np.array(["a", "b"]),
        gamma_star_=np.zeros((2, 4)),
        delta_star_=np.ones((2, 4)),
    )
    fig = plot_combat_estimates(plain)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["a", "b"]
    assert len(fig.axes[0].collections) == 2  # no hat estimates to draw


def test_estimates_draw_a_fixed_subset_of_many_features():
    rng = np.random.default_rng(1)
    many = SimpleNamespace(
        batches_=np.array(["a", "b"]),
        gamma_star_=rng.normal(size=(2, 50_000)),
        delta_star_=rng.uniform(0.5, 2, size=(2, 50_000)),
    )
    fig = plot_combat_estimates(many, max_features=300)
    points = fig.axes[0].collections[0].get_offsets()[:, 1]
    assert len(points) == 300
    assert np.isin(points, many.gamma_star_[0]).all()
    # the same features at every site
    shown = np.flatnonzero(np.isin(many.gamma_star_[0], points))
    np.testing.assert_array_equal(
        fig.axes[0].collections[1].get_offsets()[:, 1], many.gamma_star_[1, shown]
    )
    assert "300 of 50000 features" in fig._suptitle.get_text()
    with pytest.raises(ValueError, match="max_features"):
        plot_combat_estimates(many, max_features=0)


def test_estimates_bad_input():
    with pytest.raises(TypeError, match="fitted CombatHarmonizer"):
        plot_combat_estimates(CombatHarmonizer())
    with pytest.raises(ValueError, match="gamma_star"):
        plot_combat_estimates(CombatEstimates(estimates={}, info={}))
    bad = SimpleNamespace(batches_=["a"], gamma_star_=np.zeros((2, 3)), delta_star_=np.ones((2, 3)))
    with pytest.raises(ValueError, match="n_sites=1"):
        plot_combat_estimates(bad)
    with pytest.raises(TypeError, match="show_hat"):
        plot_combat_estimates(bad, show_hat="yes")


# --------------------------------------------------------------------------------------------
# plot_site_predictability
# --------------------------------------------------------------------------------------------


def test_predictability_bars_and_chance():
    scores = {"raw": [0.9, 1.0, 0.95], "ComBat": [0.3, 0.4, 0.35]}
    fig = plot_site_predictability(scores, chance=1 / 3)
    (ax,) = fig.axes
    heights = [bar.get_height() for bar in ax.patches]
    np.testing.assert_allclose(heights, [0.95, 0.35])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["raw", "ComBat"]
    chance_lines = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(chance_lines) == 1 and chance_lines[0].get_ydata()[0] == pytest.approx(1 / 3)
    assert ax.get_legend().get_texts()[0].get_text() == "chance (0.33)"
    assert ax.get_ylabel() == "accuracy"


def test_predictability_dataframe_series_and_existing_axes():
    folds = pd.DataFrame({"raw": [0.8, 0.9], "harmonized": [0.4, 0.5], "adapted": [0.3, 0.4]})
    fig = plot_site_predictability(folds, metric="balanced accuracy")
    assert len(fig.axes[0].patches) == 3 and fig.axes[0].get_legend() is None
    fig, ax = plt.subplots()
    returned = plot_site_predictability(pd.Series({"raw": 0.9, "ComBat": 0.3}), ax=ax)
    assert returned is fig
    np.testing.assert_allclose([bar.get_height() for bar in ax.patches], [0.9, 0.3])


@pytest.mark.parametrize(
    ("scores", "kwargs", "error", "match"),
    [
        ([0.9, 0.3], {}, TypeError, "scores"),
        ({}, {}, ValueError, "scores"),
        ({"raw": [np.nan]}, {}, ValueError, "raw"),
        ({"raw": "high"}, {}, TypeError, "raw"),
        ({"raw": 0.9}, {"chance": "1/3"}, TypeError, "chance"),
        ({"raw": 0.9}, {"chance": np.inf}, ValueError, "chance"),
    ],
)
def test_predictability_bad_input(scores, kwargs, error, match):
    with pytest.raises(error, match=match):
        plot_site_predictability(scores, **kwargs)


# --------------------------------------------------------------------------------------------
# matplotlib is optional
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("function", "args"),
    [
        (plot_site_distributions, (np.zeros((4, 2)), np.zeros((4, 2)), ["a", "a", "b", "b"])),
        (plot_combat_estimates, (SimpleNamespace(),)),
        (plot_site_predictability, ({"raw": 0.9},)),
    ],
)
def test_clear_error_without_matplotlib(monkeypatch, function, args):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r'pip install "kwneuro_sk\[plotting\]"'):
        function(*args)


def test_module_imports_without_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    monkeypatch.delitem(sys.modules, "kwneuro_sk.plotting")
    import kwneuro_sk.plotting  # noqa: F401
