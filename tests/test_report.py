"""The HTML harmonization report: produced, self-contained, holds the numbers it computes."""

import re
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from kwneuro_sk import CombatHarmonizer, CovBatHarmonizer
from kwneuro_sk.cli import main
from kwneuro_sk.datasets import make_site_features
from kwneuro_sk.plotting import plot_combat_estimates, plot_site_distributions
from kwneuro_sk.report import (
    covariance_distance,
    harmonization_report,
    site_predictability,
    site_variance_explained,
)

matplotlib.use("Agg")
sys.path.insert(0, str(Path(__file__).parent))
from test_covbat import simulate_site_covariance  # noqa: E402

NETWORK_REFERENCE = re.compile(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", re.IGNORECASE)


@pytest.fixture(scope="module")
def data():
    return make_site_features(n_subjects=90, n_features=8, random_state=0).drop(columns="subject")


def _assert_self_contained(page):
    assert page.startswith("<!DOCTYPE html>")
    assert NETWORK_REFERENCE.search(page) is None
    assert "http://" not in page and "https://" not in page
    images = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert images and all(src.startswith("data:image/png;base64,") for src in images)
    return images


def test_combat_report_is_self_contained_and_holds_its_numbers(data, tmp_path):
    combat = CombatHarmonizer("site", ["sex", "diagnosis"], ["age"]).fit(data)
    report = harmonization_report(combat, data)
    images = _assert_self_contained(report.html)
    assert len(images) == 5  # distributions, estimates, variance, predictability, covariates
    m = report.metrics
    for key in (
        "site_r2_median_before",
        "site_r2_median_after",
        "site_accuracy_linear_before",
        "site_accuracy_linear_after",
        "site_accuracy_quadratic_after",
    ):
        assert f"{m[key]:.3f}" in report.html, key
    assert m["site_r2_median_after"] < 0.01 < m["site_r2_median_before"]
    assert m["site_accuracy_linear_after"] < m["site_accuracy_linear_before"]
    # ComBat keeps the covariate effects: coefficients re-estimated on the harmonized data
    # follow the fitted ones (not exactly: the per-site scaling changes within-site slopes)
    assert len(combat.covariate_names_) == 3
    for name in combat.covariate_names_:
        assert m[f"covariate_effect_correlation_{name}"] > 0.95
        r = m[f"covariate_effect_correlation_{name}"]
        assert f"<th>{name}</th><td>r = {r:.3f}</td>" in report.html
    assert "covariance_distance_covbat" not in m
    path = report.save(tmp_path / "report.html")
    assert path.read_text(encoding="utf-8") == report.html


def test_report_numbers_equal_the_measures_on_arrays(data):
    combat = CombatHarmonizer("site", ["sex", "diagnosis"], ["age"]).fit(data)
    after = combat.transform(data)
    report = harmonization_report(combat, data, after)
    before = data[combat.get_feature_names_out()].to_numpy()
    Z = np.column_stack(
        [
            data["sex"].eq("M"),
            data["diagnosis"].ne(sorted(data["diagnosis"].unique())[0]),
            data["age"],
        ]
    ).astype(float)
    r2 = site_variance_explained(before, data["site"], Z)
    assert report.metrics["site_r2_median_before"] == pytest.approx(np.median(r2))
    accuracy = site_predictability(before, data["site"]).mean()
    assert report.metrics["site_accuracy_linear_before"] == pytest.approx(accuracy)
    # "after" is scikit-learn's cross-validation of the pipeline harmonizer -> classifier:
    # the harmonizer refitted on each fold's training rows, the held-out rows transformed
    reference = cross_val_score(
        make_pipeline(clone(combat), StandardScaler(), LogisticRegression(max_iter=2000)),
        data,
        data["site"],
        cv=StratifiedKFold(5, shuffle=True, random_state=0),
        scoring="balanced_accuracy",
    )
    assert report.metrics["site_accuracy_linear_after"] == pytest.approx(reference.mean())
    assert "refitted on the training rows only" in report.html


def _noise(seed=0, n_per_site=30, n_features=10):
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        rng.normal(size=(3 * n_per_site, n_features)),
        columns=[f"f{j}" for j in range(n_features)],
    )
    frame["site"] = np.repeat(["a", "b", "c"], n_per_site)
    return frame


def test_site_prediction_after_has_no_leakage(seed=0):
    # no site effect: harmonizing all rows with a model fitted on them and then
    # cross-validating a site classifier scored 0.07-0.2 (chance 0.33), the signature of
    # leakage; with the harmonizer refitted on each fold's training rows it is at chance
    frame = _noise(seed)
    report = harmonization_report(CombatHarmonizer("site", eb=False).fit(frame), frame)
    m = report.metrics
    assert m["chance"] == pytest.approx(1 / 3)
    assert m["site_accuracy_linear_after"] == pytest.approx(1 / 3, abs=0.05)
    assert m["site_accuracy_quadratic_after"] > 1 / 3 - 0.1
    # with empirical Bayes the held-out rows are moved by the part of each training site's
    # sample mean that EB removes, the rest stays in the training rows: somewhat below
    # chance (documented), but above the in-sample measure
    combat = CombatHarmonizer("site").fit(frame)
    in_sample = site_predictability(combat.transform(frame), frame["site"]).mean()
    after = harmonization_report(combat, frame).metrics["site_accuracy_linear_after"]
    assert in_sample < after < 1 / 3


def test_one_row_site_with_mean_only():
    # a site with a single row (allowed with mean_only=True) gave NaN fold scores and a
    # ValueError; it is now in every refit but not scored, and the report says so
    frame = _noise(n_features=6)
    frame.loc[0, "site"] = "solo"
    combat = CombatHarmonizer("site", mean_only=True).fit(frame)
    report = harmonization_report(combat, frame)
    assert all(np.isfinite(v) for v in report.metrics.values())
    assert report.metrics["chance"] == pytest.approx(1 / 3)  # the 3 scored sites
    assert "Sites with fewer than 4 rows are not scored" in report.html
    assert "solo" in report.html
    covbat = CovBatHarmonizer("site", mean_only=True).fit(frame)
    covbat_report = harmonization_report(covbat, frame)
    assert np.isfinite(covbat_report.metrics["covariance_distance_covbat"])
    assert "Sites with a single row have no covariance: solo" in covbat_report.html
    with pytest.raises(ValueError, match="needs at least 2 sites with 4 rows or more"):
        site_predictability(frame[["f0", "f1"]].iloc[:5], frame["site"].iloc[:5])


def test_fold_that_cannot_be_refitted_is_said_not_raised():
    # a categorical level on one row: the fold holding it out cannot harmonize it. The report
    # (which the command line draws before writing -o) says so instead of failing
    frame = _noise(n_features=4)
    frame["scanner"] = ["old"] * 89 + ["rare"]
    report = harmonization_report(CombatHarmonizer("site", "scanner").fit(frame), frame)
    assert "site_accuracy_linear_after" not in report.metrics
    assert (
        "Site predictability is not shown: the harmonizer refitted on the training rows of "
        in report.html
    )
    assert "level(s) [&#x27;rare&#x27;] not seen in fit" in report.html
    assert report.metrics["site_r2_median_after"] < report.metrics["site_r2_median_before"]


def test_missing_covariate_column_is_named(data):
    combat = CombatHarmonizer("site", ["sex", "diagnosis"], ["age"]).fit(data)
    with pytest.raises(ValueError, match=r"covariate column\(s\) \['age'\] .* not in X"):
        harmonization_report(combat, data.drop(columns="age"))
    features = data.filter(like="feature")
    keyword = CombatHarmonizer(categorical_cols=["sex"], continuous_cols=["age"]).fit(
        features, batch=data["site"], covariates=data[["sex", "age"]]
    )
    with pytest.raises(ValueError, match=r"\['age'\] .* not in covariates="):
        harmonization_report(keyword, features, batch=data["site"], covariates=data[["sex"]])
    with pytest.raises(ValueError, match=r"covariates= is needed.*\['sex', 'age'\]"):
        harmonization_report(keyword, features, batch=data["site"])


def test_dollar_signs_in_names_are_text():
    # matplotlib reads "$...$" as mathtext: "x$^$" failed to draw, "A$B$" drew an italic B
    frame = _noise(n_features=4).rename(columns={"f0": "cost$_$"})
    frame["site"] = frame["site"].map({"a": "A$B$", "b": "x$^$", "c": "c"})
    combat = CombatHarmonizer("site").fit(frame)
    report = harmonization_report(combat, frame, max_features=4)
    _assert_self_contained(report.html)
    assert "A$B$" in report.html
    fig = plot_combat_estimates(combat)
    labels = fig.axes[0].get_xticklabels()
    assert [t.get_text() for t in labels] == ["A$B$", "c", "x$^$"]
    assert not any(t.get_parse_math() for t in labels)
    after = combat.transform(frame)
    fig = plot_site_distributions(frame[combat.get_feature_names_out()], after, frame["site"])
    legend = fig.axes[1].get_legend().get_texts()
    assert sorted(t.get_text() for t in legend) == ["A$B$", "c", "x$^$"]
    assert not any(t.get_parse_math() for t in legend)
    assert not any(ax.title.get_parse_math() for ax in fig.axes)


def test_site_variance_explained_by_hand():
    # two sites, one feature: site means 0.1 and 1.1 around a grand mean 0.6 -> SSB = 4 * 0.25
    x = np.array([[0.0], [0.2], [1.0], [1.2]])
    tss = ((x - x.mean()) ** 2).sum()
    assert site_variance_explained(x, ["a", "a", "b", "b"])[0] == pytest.approx(1.0 / tss)
    # a covariate that is the site itself leaves nothing to site
    z = np.array([[0.0], [0.0], [1.0], [1.0]])
    assert site_variance_explained(x, ["a", "a", "b", "b"], z)[0] == pytest.approx(0.0)


def test_covariance_distance_equals_explicit_matrices():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 7))
    X[:20, :3] += rng.normal(size=(20, 1)) * 2
    sites = np.array(["a"] * 20 + ["b"] * 15 + ["c"] * 15)
    scaled = X / X.std(axis=0)
    covs = [np.cov(scaled[sites == s].T) for s in "abc"]
    expected = np.mean([np.linalg.norm(covs[i] - covs[j]) for i in range(3) for j in range(i)])
    assert covariance_distance(X, sites) == pytest.approx(expected, rel=1e-10)


def test_covbat_report_has_covariance_section():
    frame = simulate_site_covariance()
    covbat = CovBatHarmonizer("site", continuous_cols="age").fit(frame)
    report = harmonization_report(covbat, frame)
    images = _assert_self_contained(report.html)
    assert len(images) == 6
    m = report.metrics
    assert "Between-site covariance (CovBat)" in report.html
    assert m["covariance_distance_covbat"] < 0.5 * m["covariance_distance_combat"]
    assert m["covariance_distance_combat"] < m["covariance_distance_before"]
    assert m["site_accuracy_quadratic_after"] < m["site_accuracy_quadratic_after_combat"]
    # the three distances are those of the data before, after ComBat alone, after CovBat
    sites = frame["site"]
    features = frame[[c for c in frame.columns if c.startswith("f")]].to_numpy()
    combat = CombatHarmonizer("site", continuous_cols="age").fit_transform(frame)
    expected = {
        "before": covariance_distance(features, sites),
        "combat": covariance_distance(combat, sites),
        "covbat": covariance_distance(covbat.transform(frame), sites),
    }
    for stage, value in expected.items():
        assert m[f"covariance_distance_{stage}"] == pytest.approx(value, rel=1e-10), stage
    for key in (
        "covariance_distance_before",
        "covariance_distance_combat",
        "covariance_distance_covbat",
    ):
        assert f"{m[key]:.3f}" in report.html


def test_keyword_route(data):
    features = data[[c for c in data.columns if c.startswith("feature")]]
    combat = CombatHarmonizer(categorical_cols=["sex"], continuous_cols=["age"])
    combat.fit(features, batch=data["site"], covariates=data[["sex", "age"]])
    report = harmonization_report(
        combat, features, batch=data["site"], covariates=data[["sex", "age"]]
    )
    _assert_self_contained(report.html)
    # the same numbers as the column route
    columns = data.drop(columns="diagnosis")
    by_columns = harmonization_report(
        CombatHarmonizer("site", ["sex"], ["age"]).fit(columns), columns
    ).metrics
    assert report.metrics.keys() == by_columns.keys()
    for key, value in by_columns.items():
        assert report.metrics[key] == pytest.approx(value, rel=1e-10), key
    with pytest.raises(ValueError, match="batch= is needed"):
        harmonization_report(combat, features)


def test_errors(data):
    with pytest.raises(NotFittedError):
        harmonization_report(CombatHarmonizer("site"), data)
    combat = CombatHarmonizer("site", ["sex", "diagnosis"], ["age"]).fit(data)
    with pytest.raises(ValueError, match="X_harmonized has shape"):
        harmonization_report(combat, data, np.zeros((3, 3)))


def test_cli_harmonize_report(tmp_path):
    data = make_site_features(n_subjects=60, n_features=6, random_state=1)
    path, out, page = tmp_path / "f.csv", tmp_path / "out.csv", tmp_path / "report.html"
    data.to_csv(path, index=False)
    assert (
        main(
            [
                "harmonize",
                str(path),
                "--batch-col",
                "site",
                "--categorical",
                "sex",
                "--continuous",
                "age",
                "--keep",
                "subject",
                "diagnosis",
                "-o",
                str(out),
                "--report",
                str(page),
            ]
        )
        == 0
    )
    html = page.read_text(encoding="utf-8")
    _assert_self_contained(html)
    written = pd.read_csv(out)
    assert written.shape == data.shape
    # the harmonized values and the report are those of the same model fitted in Python
    rows = data.drop(columns=["subject", "diagnosis"])
    combat = CombatHarmonizer("site", ["sex"], ["age"]).fit(rows)
    features = list(combat.get_feature_names_out())
    np.testing.assert_allclose(written[features], combat.transform(rows), rtol=1e-10)
    Z = np.column_stack([rows["sex"].eq("M"), rows["age"]]).astype(float)
    r2 = site_variance_explained(rows[features].to_numpy(), rows["site"], Z)
    assert f"{np.median(r2):.3f} / {np.max(r2):.3f}" in html  # before (median / max)
