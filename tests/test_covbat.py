"""CovBatHarmonizer: numbers against the authors' R code, new rows, site prediction, search."""

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.linalg import hadamard
from sklearn.base import clone
from sklearn.compose import ColumnTransformer
from sklearn.discriminant_analysis import QuadraticDiscriminantAnalysis
from sklearn.exceptions import NotFittedError
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import (
    GridSearchCV,
    LeaveOneGroupOut,
    StratifiedKFold,
    cross_val_predict,
    cross_val_score,
)
from sklearn.pipeline import make_pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks
from test_estimator_checks import _row_sites

from kwneuro_sk import CombatHarmonizer, CovBatHarmonizer
from kwneuro_sk.combat.covbat import n_components_for_variance, residual_pca

REFERENCE = Path(__file__).parent / "data" / "covbat_reference.npz"


@pytest.fixture(scope="module")
def reference():
    ref = np.load(REFERENCE)
    frame = pd.DataFrame(ref["X"], columns=[f"f{j}" for j in range(ref["X"].shape[1])])
    frame["site"], frame["age"], frame["sex"] = ref["site"], ref["age"], ref["sex"]
    return ref, frame


def _relative_error(actual, expected):
    return np.max(np.abs(actual - expected)) / np.max(np.abs(expected))


# --------------------------------------------------------------------------------------------
# The numbers of ComBatFamily::covfam (R), stored in tests/data (see its README)
# --------------------------------------------------------------------------------------------


def test_equals_r_covfam_with_covariates_and_eb(reference):
    ref, frame = reference
    covbat = CovBatHarmonizer("site", ["sex"], ["age"]).fit(frame)
    assert covbat.n_components_ == int(ref["npc1"]) == 12
    assert _relative_error(covbat.transform(frame), ref["covbat1"]) < 1e-8
    # the ComBat step alone equals comfam too
    combat = CombatHarmonizer("site", ["sex"], ["age"]).fit_transform(frame)
    assert _relative_error(combat, ref["combat1"]) < 1e-8
    # and CovBat changed something beyond ComBat
    assert _relative_error(ref["covbat1"], ref["combat1"]) > 1e-3


def test_equals_r_covfam_without_eb_fixed_n_pc_unscaled(reference):
    ref, _ = reference
    covbat = CovBatHarmonizer(eb=False, n_components=4, std_var=False)
    out = covbat.fit_transform(ref["X"], batch=ref["site"])
    assert covbat.n_components_ == int(ref["npc2"]) == 4
    assert _relative_error(out, ref["covbat2"]) < 1e-8


def test_equals_r_covfam_percent_var(reference):
    ref, frame = reference
    covbat = CovBatHarmonizer("site", ["sex"], ["age"], percent_var=0.8)
    out = covbat.fit_transform(frame)
    assert covbat.n_components_ == int(ref["npc3"]) == 7
    assert _relative_error(out, ref["covbat3"]) < 1e-8


def test_keyword_route_equals_column_route(reference):
    ref, frame = reference
    by_columns = CovBatHarmonizer("site", ["sex"], ["age"]).fit_transform(frame)
    by_keywords = CovBatHarmonizer(categorical_cols=["sex"], continuous_cols=["age"])
    out = by_keywords.fit_transform(ref["X"], batch=ref["site"], covariates=frame[["sex", "age"]])
    np.testing.assert_allclose(out, by_columns, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# The math
# --------------------------------------------------------------------------------------------


def test_n_components_rule_is_strictly_above():
    # shares 0.5, 0.8, 0.95, 1.0: "more than 0.8" needs 3 components, as R's which(... > p)
    variance = np.array([50.0, 30.0, 15.0, 5.0])
    assert n_components_for_variance(variance, 0.8) == 3
    assert n_components_for_variance(variance, 0.79) == 2
    assert n_components_for_variance(variance, 0.999) == 4


def test_residual_pca_reconstructs_and_orders():
    rng = np.random.default_rng(0)
    R = rng.normal(size=(30, 5)) * [5, 1, 2, 0.5, 3]
    pca = residual_pca(R, std_var=True)
    np.testing.assert_allclose(pca.scale, R.std(axis=0, ddof=1))
    scores = ((R - pca.center) / pca.scale) @ pca.components.T
    np.testing.assert_allclose(scores.var(axis=0, ddof=1), pca.explained_variance)
    assert np.all(np.diff(pca.explained_variance) <= 0)
    np.testing.assert_allclose(scores @ pca.components * pca.scale + pca.center, R)


# --------------------------------------------------------------------------------------------
# New rows
# --------------------------------------------------------------------------------------------


def test_new_rows_alone_equal_rows_in_a_batch(reference):
    ref, frame = reference
    covbat = CovBatHarmonizer("site", ["sex"], ["age"]).fit(frame)
    everything = covbat.transform(frame)
    for row in (0, 41, 89):
        alone = covbat.transform(frame.iloc[[row]])
        np.testing.assert_allclose(alone[0], everything[row], rtol=1e-12, atol=1e-12)


def test_fit_on_training_rows_apply_to_test_rows(reference):
    ref, frame = reference
    train = np.arange(len(frame)) % 3 != 0
    covbat = CovBatHarmonizer("site", ["sex"], ["age"]).fit(frame[train])
    out = covbat.transform(frame[~train])
    assert out.shape == ((~train).sum(), 20)
    # the training rows transformed equal fit_transform on them
    np.testing.assert_allclose(
        covbat.transform(frame[train]),
        CovBatHarmonizer("site", ["sex"], ["age"]).fit_transform(frame[train]),
        rtol=1e-12,
        atol=1e-12,
    )
    # transform never changes the fitted state, and the new rows do not move the fit
    before = covbat.components_.copy()
    covbat.transform(frame)
    np.testing.assert_array_equal(covbat.components_, before)
    refit_on_all = CovBatHarmonizer("site", ["sex"], ["age"]).fit(frame)
    assert not np.allclose(refit_on_all.transform(frame[~train]), out)


def test_unseen_site_error_and_adapt(reference):
    ref, frame = reference
    train = frame["site"] != "siteC"
    with pytest.raises(ValueError, match=r"\['siteC'\] were not seen in fit"):
        CovBatHarmonizer("site", ["sex"], ["age"]).fit(frame[train]).transform(frame)
    adapt = CovBatHarmonizer("site", ["sex"], ["age"], unseen_batch="adapt").fit(frame[train])
    out = adapt.transform(frame[~train])
    assert np.isfinite(out).all()
    # the new site's leading scores get its own location/scale removed: mean ~ pooled mean
    scores = (
        (
            out
            - adapt.grand_mean_
            - frame.loc[~train, ["age"]].to_numpy() @ adapt.beta_[1:]
            - frame.loc[~train, ["sex"]].eq("M").to_numpy() @ adapt.beta_[:1]
            - adapt.pca_center_
        )
        / adapt.pca_scale_
        @ adapt.components_.T
    )
    np.testing.assert_allclose(scores.mean(axis=0), adapt.score_grand_mean_, atol=1e-8)


def test_failed_refit_leaves_covbat_unfitted():
    """A refit refused after its sites were read left the earlier model's PCA and scores
    beside the new sites; it now leaves the estimator unfitted."""
    rng = np.random.default_rng(0)
    X, site = rng.normal(size=(60, 4)), np.repeat(["a", "b", "c"], 20)
    for refit in ("fit", "fit_transform"):
        covbat = CovBatHarmonizer().fit(X, batch=site)
        with pytest.raises(ValueError, match="at least two sites"):
            getattr(covbat, refit)(X[:20], batch=site[:20])
        with pytest.raises(NotFittedError):
            covbat.transform(X, batch=site)
        assert not hasattr(covbat, "components_")


def test_parameter_errors(reference):
    ref, frame = reference
    with pytest.raises(ValueError, match="percent_var"):
        CovBatHarmonizer("site", ["sex"], percent_var=1.0).fit(frame)
    with pytest.raises(ValueError, match="n_components=100 is more than the 20 principal"):
        CovBatHarmonizer("site", ["sex"], ["age"], n_components=100).fit(frame)
    with pytest.raises(NotImplementedError, match="no inverse_transform"):
        CovBatHarmonizer("site", ["sex"], ["age"]).fit(frame).inverse_transform(frame)


def test_clone_pickle_names_and_pandas_output(reference):
    ref, frame = reference
    covbat = CovBatHarmonizer("site", ["sex"], ["age"], percent_var=0.8)
    assert clone(covbat).get_params() == covbat.get_params()
    covbat.set_output(transform="pandas").fit(frame)
    out = covbat.transform(frame)
    assert isinstance(out, pd.DataFrame)
    assert list(out.columns) == [f"f{j}" for j in range(20)]
    again = pickle.loads(pickle.dumps(covbat))
    pd.testing.assert_frame_equal(again.transform(frame), out)
    assert _relative_error(out.to_numpy(), ref["covbat3"]) < 1e-8


def test_float32_input_gives_float32(reference):
    ref, _ = reference
    X32 = ref["X"].astype(np.float32)
    out = CovBatHarmonizer().fit_transform(X32, batch=ref["site"])
    assert out.dtype == np.float32
    in_float64 = CovBatHarmonizer().fit_transform(X32.astype(np.float64), batch=ref["site"])
    assert _relative_error(out, in_float64) < 1e-5


# --------------------------------------------------------------------------------------------
# Site-specific covariance: site stays predictable after ComBat, not after CovBat
# --------------------------------------------------------------------------------------------


def simulate_site_covariance(seed=0, n_per_site=60, n_features=16):
    """Three sites that add variance along three shared directions, with site-specific
    strengths (a different covariance per site). Every loading has the same magnitude on every
    feature, so a site changes all feature variances alike and ComBat's per-feature scaling
    cannot undo the difference in covariance."""
    rng = np.random.default_rng(seed)
    sites = ["a", "b", "c"]
    site = np.repeat(sites, n_per_site)
    age = rng.uniform(20, 80, len(site)).round()
    X = rng.normal(size=(len(site), n_features)) + 0.02 * age[:, None]
    directions = hadamard(n_features)[1:4] / np.sqrt(n_features)
    strengths = np.array([[6.0, 1.0, 0.5], [1.0, 4.0, 0.5], [2.0, 1.0, 2.5]])
    for name, strength in zip(sites, strengths):
        rows = site == name
        X[rows] += (rng.normal(size=(rows.sum(), 3)) * strength) @ directions
        X[rows] += rng.normal(0, 0.5, n_features)  # and a location effect
    frame = pd.DataFrame(X, columns=[f"f{j}" for j in range(n_features)])
    frame["site"], frame["age"] = site, age
    return frame


def _site_accuracy(step, frame):
    pipe = make_pipeline(step, QuadraticDiscriminantAnalysis(reg_param=0.1))
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    return cross_val_score(pipe, frame, frame["site"], cv=cv, scoring="balanced_accuracy").mean()


def test_site_prediction_falls_to_chance_with_covbat_not_combat():
    frame = simulate_site_covariance()
    raw = _site_accuracy(
        ColumnTransformer([("meta", "drop", ["site", "age"])], remainder="passthrough"), frame
    )
    combat = _site_accuracy(CombatHarmonizer("site", continuous_cols="age"), frame)
    covbat = _site_accuracy(CovBatHarmonizer("site", continuous_cols="age"), frame)
    # chance is 1/3: measured 0.79 raw, 0.65 ComBat, 0.31 CovBat
    assert raw > 0.7 and combat > 0.58
    assert covbat < 0.42


def _held_out_site_auc(harmonizer, frame):
    """Leave one site out: fit on the other sites, harmonize all rows, and measure how well a
    classifier tells the held-out site's rows from the others (ROC AUC, cross-validated)."""
    features = [c for c in frame.columns if c.startswith("f")]
    aucs = []
    for train, test in LeaveOneGroupOut().split(frame, groups=frame["site"]):
        fitted = clone(harmonizer).fit(frame.iloc[train])
        harmonized = np.vstack(
            [fitted.transform(frame.iloc[train]), fitted.transform(frame.iloc[test])]
        )
        held_out = np.r_[np.zeros(len(train)), np.ones(len(test))]
        proba = cross_val_predict(
            QuadraticDiscriminantAnalysis(reg_param=0.1),
            harmonized,
            held_out,
            cv=StratifiedKFold(5, shuffle=True, random_state=0),
            method="predict_proba",
        )[:, 1]
        aucs.append(roc_auc_score(held_out, proba))
        assert harmonized.shape[1] == len(features)
    return float(np.mean(aucs))


def test_leave_one_site_out_new_site_is_told_apart_after_combat_not_covbat():
    frame = simulate_site_covariance()
    combat = _held_out_site_auc(
        CombatHarmonizer("site", continuous_cols="age", unseen_batch="adapt"), frame
    )
    covbat = _held_out_site_auc(
        CovBatHarmonizer("site", continuous_cols="age", unseen_batch="adapt"), frame
    )
    # measured 0.84 ComBat, 0.58 CovBat (chance 0.5)
    assert combat > 0.75
    assert covbat < 0.68


def test_pipeline_leave_one_group_out_cross_val_score():
    # a harmonizer + classifier pipeline scored across sites: CovBat is fitted on the training
    # sites and adapts to the held-out one inside each split
    frame = simulate_site_covariance()
    rng = np.random.default_rng(1)
    label = (frame["f0"] - frame["f0"].mean() + rng.normal(0, 0.5, len(frame)) > 0).astype(int)
    pipe = make_pipeline(
        CovBatHarmonizer("site", continuous_cols="age", unseen_batch="adapt"),
        QuadraticDiscriminantAnalysis(reg_param=0.1),
    )
    scores = cross_val_score(
        pipe, frame, label, groups=frame["site"], cv=LeaveOneGroupOut(), scoring="roc_auc"
    )
    assert scores.shape == (3,) and np.all(scores > 0.55) and scores.mean() > 0.7
    # each split's harmonizer saw the training sites only: the same as fitting it by hand
    train, test = next(LeaveOneGroupOut().split(frame, groups=frame["site"]))
    by_hand = make_pipeline(
        CovBatHarmonizer("site", continuous_cols="age", unseen_batch="adapt"),
        QuadraticDiscriminantAnalysis(reg_param=0.1),
    )
    by_hand.fit(frame.iloc[train], label.iloc[train])
    proba = by_hand.predict_proba(frame.iloc[test])[:, 1]
    assert roc_auc_score(label.iloc[test], proba) == pytest.approx(scores[0])


def test_grid_search_over_percent_var():
    frame = simulate_site_covariance(n_per_site=40)
    rng = np.random.default_rng(2)
    label = (frame["f1"] + rng.normal(0, 0.5, len(frame)) > frame["f1"].mean()).astype(int)
    pipe = make_pipeline(
        CovBatHarmonizer("site", continuous_cols="age"),
        QuadraticDiscriminantAnalysis(reg_param=0.1),
    )
    search = GridSearchCV(
        pipe,
        {"covbatharmonizer__percent_var": [0.5, 0.8, 0.95]},
        cv=StratifiedKFold(3, shuffle=True, random_state=0),
        scoring="roc_auc",
    ).fit(frame, label)
    # each candidate's score is the cross-validated score of that pipeline fitted fold by fold
    # (the harmonizer refitted on each training fold), and the best is the highest of them
    cv = StratifiedKFold(3, shuffle=True, random_state=0)
    by_hand = [
        cross_val_score(
            clone(pipe).set_params(covbatharmonizer__percent_var=p),
            frame,
            label,
            cv=cv,
            scoring="roc_auc",
        ).mean()
        for p in (0.5, 0.8, 0.95)
    ]
    np.testing.assert_allclose(search.cv_results_["mean_test_score"], by_hand, rtol=1e-12)
    best = (0.5, 0.8, 0.95)[int(np.argmax(by_hand))]
    assert search.best_params_ == {"covbatharmonizer__percent_var": best}
    assert search.best_score_ > 0.6  # the label is learnable after harmonization
    n_components = {
        p: CovBatHarmonizer("site", continuous_cols="age", percent_var=p).fit(frame).n_components_
        for p in (0.5, 0.8, 0.95)
    }
    assert n_components[0.5] < n_components[0.8] < n_components[0.95]


# --------------------------------------------------------------------------------------------
# scikit-learn's estimator checks, with sites derived from each row (as for ComBat)
# --------------------------------------------------------------------------------------------


class _RowSiteCovBat(CovBatHarmonizer):
    """CovBatHarmonizer whose sites are computed from X (test-only, for the checks)."""

    def fit(self, X, y=None):
        return super().fit(X, y, batch=_row_sites(X))

    def fit_transform(self, X, y=None):
        return super().fit_transform(X, y, batch=_row_sites(X))

    def transform(self, X):
        return super().transform(X, batch=_row_sites(X))


@parametrize_with_checks([_RowSiteCovBat(), _RowSiteCovBat(n_components=1, eb=False)])
def test_estimator_checks_with_sites(estimator, check):
    check(estimator)
