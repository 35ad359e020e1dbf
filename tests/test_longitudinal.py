"""Longitudinal ComBat (subject_col): parity with the authors' R longCombat (lme4 REML fits),
new subjects, grouped cross-validation, model files and bad input."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import Ridge
from sklearn.model_selection import GridSearchCV, GroupKFold
from sklearn.pipeline import make_pipeline

from kwneuro_sk import CombatEstimates, CombatHarmonizer

DATA = Path(__file__).parent / "data" / "longcombat"
FEATURES = [f"f{i}" for i in range(8)]
COVARIATES = dict(categorical_cols=["sex"], continuous_cols=["age", "dx", "time", "dx_time"])


def make_longitudinal(seed=18, n_subjects=48, n_features=8):
    """The cohort of tests/data/longcombat/input.csv (see tests/data/README.md)."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_subjects):
        k = int(rng.integers(2, 5))
        site0 = int(rng.integers(3))
        age0, sex, dx = rng.uniform(60, 80), rng.choice(["F", "M"]), int(rng.integers(2))
        for v in range(k):
            site = site0 if rng.random() < 0.75 else int(rng.integers(3))
            t = v + rng.uniform(-0.2, 0.2)
            rows.append(
                dict(subject=f"s{s:02d}", site=f"site{site}", time=t, age=age0 + t, sex=sex, dx=dx)
            )
            if s < 2 and v == 0:  # travelling subjects: the same visit at a second site
                rows.append(
                    dict(
                        subject=f"s{s:02d}",
                        site=f"site{(site + 1) % 3}",
                        time=t,
                        age=age0 + t,
                        sex=sex,
                        dx=dx,
                    )
                )
    d = pd.DataFrame(rows)
    n = len(d)
    subj = pd.factorize(d.subject)[0]
    site = pd.factorize(d.site, sort=True)[0]
    sd_subject = [1.0, 0.5, 2.0, 0.0, 1.0, 0.3, 1.5, 0.8]
    for f in range(n_features):
        u = rng.normal(0, sd_subject[f % 8], n_subjects)[subj]
        w = rng.normal(0, 0.4, n_subjects)[subj]
        gamma = rng.normal(0, 1, 3)[site]
        delta = rng.uniform(0.5, 2, 3)[site]
        y = (
            10
            + 0.05 * d.age
            + 0.5 * (d.sex == "M")
            + 0.3 * d.dx * d.time
            - 0.2 * d.time
            + u
            + w * d.time
            + gamma
            + rng.normal(0, 1, n) * delta
        )
        d[f"f{f}"] = (y * (f + 1)).round(6)
    d["dx_time"] = d.dx * d.time
    d["time"] = d.time.round(6)
    d["age"] = d.age.round(6)
    d["dx_time"] = d.dx_time.round(6)
    return d


@pytest.fixture(scope="module")
def cohort():
    """48 subjects with 2-4 visits at 3 sites (two travelling subjects scanned at two sites
    at the same visit); see tests/data/README.md."""
    return pd.read_csv(DATA / "input.csv")


def test_stored_input_is_the_simulated_cohort(cohort):
    pd.testing.assert_frame_equal(cohort, make_longitudinal(), check_exact=False, rtol=1e-12)


def reference(name):
    out = pd.read_csv(DATA / f"{name}.csv")
    return out[[f"{f}.combat" for f in FEATURES]].to_numpy()


def relative_error(result, expected, data):
    """Largest absolute difference per feature, in units of the feature's range."""
    return np.abs(result - expected).max(axis=0) / np.ptp(data[FEATURES].to_numpy(), axis=0)


def harmonizer(**params):
    return CombatHarmonizer(batch_col="site", subject_col="subject", **COVARIATES, **params)


@pytest.mark.parametrize("sigma_method", ["reml", "msr"])
def test_random_intercept_equals_r_longcombat(cohort, sigma_method):
    # The interaction dx*time of the R formula is given as the column dx_time.
    combat = harmonizer(sigma_method=sigma_method)
    result = combat.fit_transform(cohort)
    expected = reference(f"{sigma_method}_intercept")
    assert relative_error(result, expected, cohort).max() < 1e-6
    # lme4's singular fit of f3 (no subject effect) is the boundary psi = 0 here
    fits = pd.read_csv(DATA / "lme4_fits.csv")
    singular = fits[fits.model == "intercept"].singular.to_numpy()
    np.testing.assert_array_equal(combat.singular_fit_, singular)
    theta = fits[fits.model == "intercept"].theta.astype(float).to_numpy()
    regular = ~singular
    np.testing.assert_allclose(
        np.sqrt(combat.random_effects_cov_[0, 0, regular]), theta[regular], rtol=1e-5
    )
    if sigma_method == "reml":
        sigma = fits[fits.model == "intercept"].sigma.astype(float).to_numpy()
        np.testing.assert_allclose(np.sqrt(combat.var_pooled_), sigma, rtol=1e-7)


def test_travelling_subjects_are_rows_of_one_subject(cohort):
    # Documented behaviour: a subject scanned at two sites at the same visit is two rows
    # sharing one random effect (what a travelling-subject design needs); the parity above
    # includes two such subjects.
    visits = cohort.groupby(["subject", "time"]).site.nunique()
    assert (visits > 1).sum() == 2


def test_keyword_route_equals_columns_route(cohort):
    columns = harmonizer().fit_transform(cohort)
    keyword = CombatHarmonizer(subject_col="subject", **COVARIATES)
    result = keyword.fit_transform(
        cohort[FEATURES], batch=cohort.site, covariates=cohort, subjects=cohort.subject
    )
    np.testing.assert_array_equal(result, columns)
    np.testing.assert_array_equal(
        keyword.transform(
            cohort[FEATURES], batch=cohort.site, covariates=cohort, subjects=cohort.subject
        ),
        columns,
    )
    assert keyword.get_feature_names_out().tolist() == FEATURES


def test_feature_names_exclude_subject_column(cohort):
    combat = harmonizer().fit(cohort)
    assert combat.get_feature_names_out().tolist() == FEATURES


def test_float32_input_gives_float32(cohort):
    data = cohort.astype({f: np.float32 for f in FEATURES})
    result = harmonizer().fit_transform(data)
    assert result.dtype == np.float32
    expected = reference("reml_intercept")
    assert relative_error(result, expected, cohort).max() < 1e-5


@pytest.mark.parametrize("sigma_method", ["reml", "msr"])
@pytest.mark.parametrize("factor", [1e200, 1e-200])
def test_huge_and_tiny_features_scale_exactly(cohort, sigma_method, factor):
    # Squares of such features overflow (underflow) float64: the fit must not form them.
    result = harmonizer(sigma_method=sigma_method).fit_transform(cohort)
    scaled = cohort.assign(**{f: cohort[f] * factor for f in FEATURES})
    combat = harmonizer(sigma_method=sigma_method).fit(scaled)
    np.testing.assert_allclose(combat.transform(scaled) / factor, result, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------
# new rows
# ------------------------------------------------------------------------------------------


def test_seen_subjects_use_fitted_random_effects(cohort):
    combat = harmonizer().fit(cohort)
    np.testing.assert_array_equal(combat.transform(cohort), combat.fit_transform(cohort))
    # a new visit of a seen subject: its fitted random effect, not re-estimated
    visit = cohort[cohort.subject == "s05"].iloc[:1].copy()
    visit[FEATURES] += 100.0
    shifted = combat.transform(visit)
    plain = combat.transform(cohort[cohort.subject == "s05"].iloc[:1])
    np.testing.assert_allclose(
        (shifted - plain)[0],
        100.0 / np.sqrt(combat.delta_star_[combat.batches_.tolist().index(visit.site.iloc[0])]),
        rtol=1e-10,
    )


def new_subject_by_hand(combat, rows):
    """The BLUP of a new subject's random intercept, written out, and its harmonized rows."""
    site = combat.batches_.searchsorted(rows.site.to_numpy())
    Z = np.column_stack(
        [(rows.sex == "M").astype(float), rows.age, rows.dx, rows.time, rows.dx_time]
    )
    fixed = combat.grand_mean_ + combat.batch_effects_[site] + Z @ combat.beta_
    psi = combat.random_effects_cov_[0, 0]
    u = psi / (1 + len(rows) * psi) * (rows[FEATURES].to_numpy() - fixed).sum(axis=0)
    sigma = np.sqrt(combat.var_pooled_)
    location = combat.grand_mean_ + Z @ combat.beta_ + u
    standardized = (rows[FEATURES].to_numpy() - location) / sigma
    return (standardized - combat.gamma_star_[site]) / np.sqrt(combat.delta_star_[site]) * (
        sigma
    ) + location


def test_new_subjects_blup_from_their_own_visits(cohort):
    train = cohort[cohort.subject < "s40"]
    test = cohort[cohort.subject >= "s40"]
    combat = harmonizer().fit(train)
    assert not set(test.subject) & set(combat.subjects_)
    together = combat.transform(test)
    for subject, rows in test.groupby("subject"):
        alone = combat.transform(rows)
        np.testing.assert_allclose(
            alone, together[(test.subject == subject).to_numpy()], atol=1e-12
        )
        np.testing.assert_allclose(alone, new_subject_by_hand(combat, rows), rtol=1e-10)


def test_single_new_visit_alone(cohort):
    combat = harmonizer().fit(cohort[cohort.subject < "s40"])
    visit = cohort[cohort.subject == "s45"].iloc[[1]]
    result = combat.transform(visit)
    assert result.shape == (1, len(FEATURES))
    np.testing.assert_allclose(result, new_subject_by_hand(combat, visit), rtol=1e-10)


def test_grouped_cross_validation_has_no_leakage(cohort):
    groups = cohort.subject.to_numpy()
    for train, test in GroupKFold(n_splits=3).split(cohort, groups=groups):
        combat = harmonizer().fit(cohort.iloc[train])
        assert not set(groups[test]) & set(combat.subjects_)
        before = combat.transform(cohort.iloc[test])
        # the test rows take no part in the fit: changing them leaves the model alone
        changed = cohort.copy()
        changed.loc[changed.index[test], FEATURES] *= 3.0
        refit = harmonizer().fit(changed.iloc[train])
        np.testing.assert_array_equal(refit.gamma_star_, combat.gamma_star_)
        np.testing.assert_array_equal(refit.transform(cohort.iloc[test]), before)


def test_grid_search_over_sigma_method(cohort):
    X = cohort.drop(columns="f7")
    y = cohort.f7.to_numpy()
    pipe = make_pipeline(
        CombatHarmonizer(batch_col="site", subject_col="subject", **COVARIATES), Ridge()
    )
    search = GridSearchCV(
        pipe, {"combatharmonizer__sigma_method": ["reml", "msr"]}, cv=GroupKFold(n_splits=3)
    )
    search.fit(X, y, groups=cohort.subject)
    scores = search.cv_results_["mean_test_score"]
    assert np.isfinite(scores).all()
    # the parameter reaches the fit through the pipeline: the two scales score differently
    # (-0.280 and -0.287), and the search keeps the better one
    assert abs(scores[0] - scores[1]) > 1e-4
    best = ["reml", "msr"][int(np.argmax(scores))]
    assert search.best_params_["combatharmonizer__sigma_method"] == best


def test_inverse_transform_of_seen_subjects(cohort):
    combat = harmonizer().fit(cohort)
    harmonized = pd.DataFrame(combat.transform(cohort), columns=FEATURES)
    back = combat.inverse_transform(
        harmonized, batch=cohort.site, covariates=cohort, subjects=cohort.subject
    )
    np.testing.assert_allclose(back, cohort[FEATURES].to_numpy(), rtol=1e-12, atol=1e-10)
    with pytest.raises(
        ValueError, match=r"inverse_transform needs subjects seen in fit; new: \['x1'\]"
    ):
        combat.inverse_transform(
            harmonized.iloc[:2],
            batch=cohort.site.iloc[:2],
            covariates=cohort.iloc[:2],
            subjects=["x1", "x1"],
        )


def test_model_file_round_trip(cohort, tmp_path):
    combat = harmonizer(sigma_method="msr").fit(cohort[cohort.subject < "s40"])
    path = tmp_path / "longitudinal.npz"
    combat.estimates_.save(path)
    loaded = CombatHarmonizer.from_estimates(CombatEstimates.load(path))
    assert loaded.get_params()["subject_col"] == "subject"
    assert loaded.get_params()["sigma_method"] == "msr"
    np.testing.assert_array_equal(loaded.transform(cohort), combat.transform(cohort))


def test_model_file_with_bad_random_effects_is_refused(cohort):
    est = harmonizer().fit(cohort).estimates_
    est.estimates["random_effects"] = est.estimates["random_effects"][:3]
    with pytest.raises(
        ValueError, match=r"estimates\['random_effects'\] must be f of shape \(48, 1, 8\)"
    ):
        est.check()


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------


def test_missing_subject_is_refused(cohort):
    bad = cohort.copy()
    bad.loc[[3, 7], "subject"] = np.nan
    with pytest.raises(
        ValueError,
        match=r"subject labels \(subject column 'subject'\) are missing \(NaN/None\) "
        r"in row\(s\) \[3, 7\]",
    ):
        harmonizer().fit(bad)


def test_one_visit_per_subject_is_refused(cohort):
    single = cohort.drop_duplicates("subject")
    with pytest.raises(
        ValueError, match="every subject in 'subject' has a single row .48 subjects, 48 rows"
    ):
        harmonizer().fit(single)


def test_subject_column_missing_from_X(cohort):
    with pytest.raises(ValueError, match=r"column\(s\) \['subject'\] not found in X"):
        harmonizer().fit(cohort.drop(columns="subject"))


def test_keyword_route_needs_subjects(cohort):
    combat = CombatHarmonizer(subject_col="subject", **COVARIATES)
    with pytest.raises(ValueError, match="needs the subject of each row: pass subjects="):
        combat.fit(cohort[FEATURES], batch=cohort.site, covariates=cohort)
    with pytest.raises(ValueError, match="subjects= was given but subject_col is None"):
        CombatHarmonizer(**COVARIATES).fit(
            cohort[FEATURES], batch=cohort.site, covariates=cohort, subjects=cohort.subject
        )
    with pytest.raises(
        ValueError, match="subject column .subject. has 1 subject labels for 144 rows"
    ):
        combat.fit(cohort[FEATURES], batch=cohort.site, covariates=cohort, subjects=["a"])


def test_options_that_do_not_combine(cohort):
    with pytest.raises(ValueError, match="ref_batch is not supported with subject_col"):
        harmonizer(ref_batch="site0").fit(cohort)
    with pytest.raises(ValueError, match=r"random_slope='time' needs subject_col"):
        CombatHarmonizer(batch_col="site", random_slope="time", **COVARIATES).fit(
            cohort.drop(columns="subject")
        )
    with pytest.raises(ValueError, match=r"random_slope='sex' must be one of continuous_cols"):
        harmonizer(random_slope="sex").fit(cohort)
    with pytest.raises(ValueError, match="subject_col='site' is also batch_col"):
        CombatHarmonizer(batch_col="site", subject_col="site").fit(cohort)
    with pytest.raises(ValueError, match="sigma_method"):
        harmonizer(sigma_method="ols").fit(cohort)


@pytest.mark.parametrize("method", ["partial_fit", "site_summary", "row_statistics"])
def test_statistics_routes_refuse_subject_col(cohort, method):
    with pytest.raises(ValueError, match=f"{method} does not support subject_col"):
        getattr(harmonizer(), method)(cohort)


def test_new_subject_at_unseen_site_is_refused(cohort):
    combat = harmonizer(unseen_batch="adapt").fit(cohort)
    rows = cohort.iloc[:4].assign(site="site9", subject="newbie")
    with pytest.raises(
        ValueError, match=r"subject\(s\) \['newbie'\] are new and at site\(s\) not seen in fit"
    ):
        combat.transform(rows)


def test_plain_fit_after_longitudinal_fit_clears_its_state(cohort):
    combat = harmonizer().fit(cohort)
    combat.set_params(subject_col=None).fit(cohort.drop(columns="subject"))
    assert not hasattr(combat, "random_effects_")
    assert "random_effects" not in combat.estimates_.estimates


# ------------------------------------------------------------------------------------------
# random slope
# ------------------------------------------------------------------------------------------

SLOPE_FEATURES = ["f0", "f1", "f2", "f6"]  # the features lme4 fits away from the boundary


@pytest.mark.parametrize("sigma_method", ["reml", "msr"])
def test_random_slope_equals_r_longcombat(cohort, sigma_method):
    # R's reference holds only features whose lme4 fit is not singular: the empirical Bayes
    # priors couple the features, and lme4 stops at a boundary saddle for f7 (see below).
    data = cohort.drop(columns=[f for f in FEATURES if f not in SLOPE_FEATURES])
    combat = harmonizer(random_slope="time", sigma_method=sigma_method)
    result = combat.fit_transform(data)
    expected = pd.read_csv(DATA / f"{sigma_method}_slope.csv").to_numpy()
    error = np.abs(result - expected).max(axis=0) / np.ptp(cohort[SLOPE_FEATURES], axis=0)
    assert error.max() < 1e-6
    fits = pd.read_csv(DATA / "lme4_fits.csv").query("model == 'slope'").set_index("feature")
    for j, feature in enumerate(SLOPE_FEATURES):
        L = np.array([float(v) for v in fits.theta[feature].split()])
        lower = np.array([[L[0], 0.0], [L[1], L[2]]])
        np.testing.assert_allclose(
            combat.random_effects_cov_[:, :, j], lower @ lower.T, rtol=1e-5, atol=1e-7
        )


def test_random_slope_singular_fits_and_boundary_saddles(cohort):
    combat = harmonizer(random_slope="time").fit(cohort)
    fits = pd.read_csv(DATA / "lme4_fits.csv").query("model == 'slope'")
    np.testing.assert_array_equal(combat.singular_fit_, fits.singular.to_numpy())
    # Where lme4 is not singular, the REML sigma is lme4's; for f7 lme4 stops at theta11 = 0
    # (a saddle of the criterion), the fit here has a lower REML criterion and so another sigma.
    regular = ~fits.singular.to_numpy()
    np.testing.assert_allclose(
        np.sqrt(combat.var_pooled_[regular]), fits.sigma.to_numpy()[regular], rtol=1e-6
    )


def test_random_slope_new_subject_blup(cohort):
    combat = harmonizer(random_slope="time").fit(cohort[cohort.subject < "s40"])
    rows = cohort[cohort.subject == "s44"]
    site = combat.batches_.searchsorted(rows.site.to_numpy())
    Z = np.column_stack(
        [(rows.sex == "M").astype(float), rows.age, rows.dx, rows.time, rows.dx_time]
    )
    fixed = combat.grand_mean_ + combat.batch_effects_[site] + Z @ combat.beta_
    Zs = np.column_stack([np.ones(len(rows)), rows.time])
    offset = np.empty((len(rows), len(FEATURES)))
    for j in range(len(FEATURES)):
        psi = combat.random_effects_cov_[:, :, j]
        r = rows[FEATURES[j]].to_numpy() - fixed[:, j]
        u = psi @ Zs.T @ np.linalg.solve(np.eye(len(rows)) + Zs @ psi @ Zs.T, r)
        offset[:, j] = Zs @ u
    sigma = np.sqrt(combat.var_pooled_)
    location = combat.grand_mean_ + Z @ combat.beta_ + offset
    standardized = (rows[FEATURES].to_numpy() - location) / sigma
    expected = (standardized - combat.gamma_star_[site]) / np.sqrt(
        combat.delta_star_[site]
    ) * sigma + location
    np.testing.assert_allclose(combat.transform(rows), expected, rtol=1e-10)
    assert combat.transform(rows.iloc[[0]]).shape == (1, len(FEATURES))


def test_random_slope_needs_more_rows_than_random_effects(cohort):
    two_visits = cohort.groupby("subject").head(2)
    with pytest.raises(ValueError, match="a random slope needs more visits"):
        harmonizer(random_slope="time").fit(two_visits)


# ------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------


def test_cli_harmonize_and_apply_with_subject(cohort, tmp_path, capsys):
    from kwneuro_sk.cli import main

    table = tmp_path / "cohort.csv"
    cohort.to_csv(table, index=False)
    out, model = tmp_path / "out.csv", tmp_path / "model.npz"
    options = ["--batch-col", "site", "--categorical", "sex"]
    options += ["--continuous", "age", "dx", "time", "dx_time", "--subject", "subject"]
    status = main(
        ["harmonize", str(table), *options, "--sigma-method", "msr", "-o", str(out)]
        + ["--save-model", str(model)]
    )
    assert status == 0
    written = pd.read_csv(out)
    expected = reference("msr_intercept")
    assert relative_error(written[FEATURES].to_numpy(), expected, cohort).max() < 1e-6
    assert written.subject.tolist() == cohort.subject.tolist()
    # apply: seen subjects get their fitted random effects, new subjects their BLUP
    new = cohort[cohort.subject >= "s40"].assign(subject=lambda d: "new-" + d.subject)
    new_table, applied = tmp_path / "new.csv", tmp_path / "applied.csv"
    new.to_csv(new_table, index=False)
    assert main(["apply", str(model), str(new_table), "-o", str(applied)]) == 0
    python = harmonizer(sigma_method="msr").fit(cohort)
    np.testing.assert_allclose(
        pd.read_csv(applied)[FEATURES].to_numpy(), python.transform(new), rtol=1e-12
    )


def test_cli_random_slope_needs_a_continuous_column(cohort, tmp_path, capsys):
    from kwneuro_sk.cli import main

    table = tmp_path / "cohort.csv"
    cohort.to_csv(table, index=False)
    status = main(
        ["harmonize", str(table), "--batch-col", "site", "--categorical", "sex"]
        + ["--subject", "subject", "--random-slope", "time", "-o", str(tmp_path / "o.csv")]
    )
    assert status != 0
    err = capsys.readouterr().err
    assert "--random-slope='time' must be one of --continuous" in err
    assert not (tmp_path / "o.csv").exists()


def test_report_of_a_longitudinal_model(cohort):
    import matplotlib

    matplotlib.use("Agg")
    from kwneuro_sk.report import harmonization_report

    combat = CombatHarmonizer(subject_col="subject", **COVARIATES).fit(
        cohort[FEATURES], batch=cohort.site, covariates=cohort, subjects=cohort.subject
    )
    report = harmonization_report(
        combat,
        cohort[FEATURES],
        batch=cohort.site,
        covariates=cohort,
        subjects=cohort.subject,
        max_features=1,
        cv=3,
    )
    assert report.metrics["n_subjects_fitted"] == 48
    assert report.metrics["singular_fits"] == 1  # f3, as lme4
    assert "longitudinal ComBat" in report.html


# ------------------------------------------------------------------------------------------
# volumes
# ------------------------------------------------------------------------------------------


def test_harmonize_volumes_with_subjects_equals_the_estimator(cohort, tmp_path):
    import nibabel as nib

    from kwneuro_sk import harmonize_volumes

    # the 8 features as the voxels of 2 x 2 x 2 images, one image per visit
    values = cohort[FEATURES].to_numpy()
    imgs = [nib.Nifti1Image(v.reshape(2, 2, 2), np.eye(4)) for v in values]
    mask = nib.Nifti1Image(np.ones((2, 2, 2), dtype=np.uint8), np.eye(4))
    out, est = harmonize_volumes(
        imgs, cohort, "site", mask, subject_col="subject", dtype=np.float64, **COVARIATES
    )
    expected = harmonizer().fit_transform(cohort)
    result = np.stack([img.get_fdata().reshape(-1) for img in out])
    np.testing.assert_allclose(result, expected, rtol=1e-12)
    # a new subject's visits, with the saved model
    path = tmp_path / "model.npz"
    est.save(path)
    new = cohort.iloc[:3].assign(subject="new")
    again = est.load(path).apply_volumes(imgs[:3], new, dtype=np.float64)
    np.testing.assert_allclose(
        np.stack([img.get_fdata().reshape(-1) for img in again]),
        harmonizer().fit(cohort).transform(new),
        rtol=1e-12,
    )
    with pytest.raises(ValueError, match="covars needs its subject column 'subject'"):
        est.apply_volumes(imgs[:3], new.drop(columns="subject"))
    with pytest.raises(ValueError, match=r"output_dir=\.\.\.\) streams the volumes"):
        est.apply_volumes(imgs[:3], new, output_dir=tmp_path / "o")
    with pytest.raises(ValueError, match=r"do not support subject_col"):
        harmonize_volumes(
            imgs, cohort, "site", mask, subject_col="subject", output_dir=tmp_path / "s"
        )
    assert not (tmp_path / "s").exists() and not (tmp_path / "o").exists()
