"""Tests of kwneuro_sk.datasets: the simulated tabular data and the demo imaging cohort."""

import os
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nilearn.datasets import load_mni152_template

from kwneuro_sk.datasets import (
    DATA_DIR_ENV,
    DemoCohort,
    SimulatedEffects,
    get_data_dir,
    make_demo_cohort,
    make_site_features,
)

N_SMALL = 12


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("kwneuro_data")


@pytest.fixture(scope="module")
def cohort(cohort_dir):
    return make_demo_cohort(n_subjects=N_SMALL, data_dir=cohort_dir, random_state=0)


def region_means(cohort):
    atlas = np.asarray(nib.load(cohort.atlas).dataobj).astype(int).ravel()
    counts = np.bincount(atlas)
    rows = [
        np.bincount(atlas, weights=np.asarray(nib.load(path).dataobj).ravel())[1:] / counts[1:]
        for path in cohort.images
    ]
    return np.vstack(rows)


# --------------------------------------------------------------------------------------------
# make_site_features
# --------------------------------------------------------------------------------------------


def test_site_features_table():
    data, effects = make_site_features(60, 8, 3, random_state=1, return_effects=True)
    assert isinstance(effects, SimulatedEffects)
    features = [f"feature_{j:02d}" for j in range(8)]
    assert list(data.columns) == ["subject", "site", "age", "sex", "diagnosis", *features]
    assert data.shape == (60, 13)
    assert data["subject"].is_unique
    assert sorted(data["site"].unique()) == ["site1", "site2", "site3"]
    assert data["site"].value_counts().tolist() == [20, 20, 20]
    assert set(data["sex"]) == {"F", "M"}
    assert set(data["diagnosis"]) == {"control", "patient"}
    assert data["age"].dtype == np.float64
    assert data["age"].between(18, 90).all()
    # ages are float32-representable (neuroCombat casts covariates to float32)
    np.testing.assert_array_equal(data["age"], data["age"].astype(np.float32).astype(float))
    assert all(data[f].dtype == np.float64 for f in features)
    assert effects.feature_names == features
    assert effects.site_offset.shape == effects.site_scale.shape == (3, 8)
    assert (effects.site_scale > 0).all().all()
    assert len(effects.diagnosis_features) == 2
    # the affected features form network1; the others are dealt out over network2..4
    assert effects.network[effects.diagnosis_features].tolist() == ["network1", "network1"]
    assert effects.network.value_counts().sort_index().tolist() == [2, 2, 2, 2]
    assert effects.site_network_offset.shape == (3, 4)
    assert list(effects.site_network_offset.columns) == [f"network{k}" for k in range(1, 5)]
    assert 0 <= effects.residual_network_correlation < 1
    assert isinstance(make_site_features(10, 2, 2), pd.DataFrame)


def test_site_features_reproducible():
    a = make_site_features(30, 4, random_state=3)
    b = make_site_features(30, 4, random_state=3)
    c = make_site_features(30, 4, random_state=4)
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a.filter(like="feature").to_numpy(), c.filter(like="feature").to_numpy())


def test_site_features_carry_the_configured_effects():
    data, effects = make_site_features(3000, 5, 3, random_state=0, return_effects=True)
    features = effects.feature_names
    residual = data[features] - effects.biological_mean(data)
    sd = effects.residual_sd
    for site, rows in residual.groupby(data["site"]):
        n = len(rows)
        np.testing.assert_allclose(
            rows.mean(), effects.site_offset.loc[site], atol=5 * 1.5 * sd / np.sqrt(n)
        )
        np.testing.assert_allclose(rows.std() / sd, effects.site_scale.loc[site], rtol=0.12)


def test_site_offsets_have_a_network_part():
    # site_offset = whole-brain + network + feature parts: removing the network part leaves,
    # within a site, the same mean in every network (up to the feature part, sd 0.015)
    _, effects = make_site_features(40, 400, 4, random_state=0, return_effects=True)
    network_part = effects.site_network_offset.loc[:, effects.network].to_numpy()
    rest = pd.DataFrame(
        effects.site_offset.to_numpy() - network_part, columns=effects.feature_names
    )
    per_network = rest.T.groupby(effects.network.to_numpy()).mean().T  # (sites, networks)
    spread = per_network.sub(per_network.mean(axis=1), axis=0).abs().to_numpy().max()
    assert spread < 5 * 0.015 / np.sqrt(100)
    assert rest.std(axis=1).between(0.01, 0.02).all()  # the feature part
    # the network part is as large as the diagnosis effect, not a rounding error
    assert effects.site_network_offset.abs().to_numpy().max() > 0.03


def test_residuals_are_correlated_within_networks():
    data, effects = make_site_features(4000, 12, 1, random_state=0, return_effects=True)
    residual = (data[effects.feature_names] - effects.biological_mean(data)).to_numpy()
    corr = np.corrcoef(residual.T)
    same = effects.network.to_numpy()[:, None] == effects.network.to_numpy()[None, :]
    off_diagonal = ~np.eye(len(corr), dtype=bool)
    rho = effects.residual_network_correlation
    np.testing.assert_allclose(corr[same & off_diagonal], rho, atol=0.05)
    np.testing.assert_allclose(corr[~same], 0.0, atol=0.05)


def test_combat_removes_the_network_offsets():
    # Per site and network, the mean of data minus biology is the site's whole-brain plus
    # network offset before ComBat; after ComBat every site has the same network means.
    from kwneuro_sk import CombatHarmonizer

    data, effects = make_site_features(900, 40, 3, random_state=0, return_effects=True)
    features = effects.feature_names
    harmonized = (
        CombatHarmonizer("site", ["sex"], ["age"])
        .set_output(transform="pandas")
        .fit_transform(data.drop(columns=["subject", "diagnosis"]))
    )

    def site_network_means(values):
        left = values[features] - effects.biological_mean(data)
        per_site = left.groupby(data["site"]).mean()  # (sites, features)
        return per_site.T.groupby(effects.network.to_numpy()).mean().T  # (sites, networks)

    before = site_network_means(data)
    expected = effects.site_offset.T.groupby(effects.network.to_numpy()).mean().T
    np.testing.assert_allclose(before, expected, atol=0.006)
    assert np.ptp(before.to_numpy(), axis=0).min() > 0.03  # sites differ in every network
    after = site_network_means(harmonized)
    # what is left is sampling error of ComBat's estimates and the part of the diagnosis
    # effect that ComBat attributes to sites with more patients
    assert np.ptp(after.to_numpy(), axis=0).max() < 0.01


def test_sites_are_confounded_with_age_and_diagnosis():
    data = make_site_features(900, 2, 3, random_state=0)
    by_site = data.groupby("site")
    assert by_site["age"].mean().is_monotonic_increasing
    assert (by_site["diagnosis"].apply(lambda d: (d == "patient").mean())).is_monotonic_increasing


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n_subjects": 3, "n_sites": 2}, ValueError, "n_subjects"),
        ({"n_subjects": 10.0}, TypeError, "n_subjects"),
        ({"n_sites": 0}, ValueError, "n_sites"),
        ({"n_features": 0}, ValueError, "n_features"),
        ({"n_features": "3"}, TypeError, "n_features"),
        ({"random_state": "seed"}, TypeError, "random_state"),
        ({"return_effects": 1}, TypeError, "return_effects"),
    ],
)
def test_site_features_bad_parameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        make_site_features(**kwargs)


def test_effects_round_trip_and_column_check():
    _, effects = make_site_features(12, 3, random_state=0, return_effects=True)
    again = SimulatedEffects.from_dict(effects.to_dict())
    pd.testing.assert_frame_equal(again.site_offset, effects.site_offset)
    pd.testing.assert_series_equal(again.age_effect, effects.age_effect)
    with pytest.raises(ValueError, match="covariates"):
        effects.biological_mean(pd.DataFrame({"age": [50.0]}))


# --------------------------------------------------------------------------------------------
# get_data_dir
# --------------------------------------------------------------------------------------------


def test_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "from_env"))
    assert get_data_dir() == tmp_path / "from_env"
    assert get_data_dir(tmp_path / "given") == tmp_path / "given"
    monkeypatch.delenv(DATA_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert get_data_dir() == tmp_path / "xdg" / "kwneuro_sk"
    with pytest.raises(TypeError, match="data_dir"):
        get_data_dir(3)


def test_cohort_uses_env_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    cohort = make_demo_cohort(n_subjects=2, n_sites=1)
    assert cohort.path.startswith(str(tmp_path))


# --------------------------------------------------------------------------------------------
# make_demo_cohort
# --------------------------------------------------------------------------------------------


def test_cohort_files_and_grid(cohort):
    assert isinstance(cohort, DemoCohort)
    assert len(cohort.images) == N_SMALL
    template = load_mni152_template(resolution=2)
    for path in cohort.images[:3]:
        img = nib.load(path)
        assert path.endswith(".nii.gz") and os.path.isfile(path)
        assert img.shape == template.shape == (99, 117, 95)
        np.testing.assert_array_equal(img.affine, template.affine)
        assert img.get_data_dtype() == np.float32
        data = np.asarray(img.dataobj)
        assert np.isfinite(data).all()
        assert 0.2 < data[data != 0].mean() < 0.8  # grey-matter-like values
    atlas = nib.load(cohort.atlas)
    assert atlas.shape == template.shape
    np.testing.assert_array_equal(atlas.affine, template.affine)


def test_atlas_labels(cohort):
    atlas = np.asarray(nib.load(cohort.atlas).dataobj)
    values = np.unique(atlas)
    np.testing.assert_array_equal(values, np.arange(161))
    sizes = np.bincount(atlas.astype(int).ravel())[1:]
    # a 6 mm sphere holds 123 to 136 voxels of 2 mm (centre on or off the grid)
    assert sizes.min() >= 30 and sizes.max() <= 136
    assert len(cohort.labels) == 160 and len(set(cohort.labels)) == 160
    assert cohort.labels[0] == "vmPFC 1"
    table = pd.read_csv(cohort.labels_file, sep="\t")
    assert list(table.columns) == ["index", "name", "network", "x", "y", "z"]
    assert table["index"].tolist() == list(range(1, 161))
    assert table["name"].tolist() == cohort.labels
    assert table["network"].value_counts()["default"] == 34
    # the labels sit at their published coordinates: vmPFC 1 is centred at (6, 64, 3)
    ijk = np.argwhere(atlas == 1)
    xyz = nib.affines.apply_affine(nib.load(cohort.atlas).affine, ijk)
    np.testing.assert_allclose(xyz.mean(axis=0), [6, 64, 3], atol=2.5)


def test_cohort_covariates(cohort):
    cov = cohort.covariates
    assert list(cov.columns) == ["subject", "site", "age", "sex", "diagnosis", "image"]
    assert len(cov) == N_SMALL
    assert cov["age"].dtype == np.float64
    for column in ["subject", "site", "sex", "diagnosis", "image"]:
        assert pd.api.types.is_string_dtype(cov[column]), column
    assert cov["image"].tolist() == cohort.images
    assert cov["site"].value_counts().tolist() == [4, 4, 4]
    # every site has both diagnoses, even with 4 subjects per site
    assert (cov.groupby("site")["diagnosis"].nunique() == 2).all()
    effects = cohort.effects
    assert effects.site_offset.shape == (3, 160)
    assert effects.feature_names == cohort.labels
    table = pd.read_csv(cohort.labels_file, sep="\t")
    assert effects.diagnosis_features == table.loc[table["network"] == "default", "name"].tolist()


def test_region_means_follow_the_model(cohort):
    # Region means minus the biological model leave offset + scale * residual: check the
    # offsets per site within sampling error, and that residuals scale with the site scale.
    X = region_means(cohort)
    effects = cohort.effects
    residual = X - effects.biological_mean(cohort.covariates).to_numpy()
    sites = cohort.covariates["site"].to_numpy()
    for site in effects.site_offset.index:
        rows = residual[sites == site]
        offset = effects.site_offset.loc[site].to_numpy()
        scale = effects.site_scale.loc[site].to_numpy()
        standardized = (rows - offset) / scale  # should be N(0, ~0.04) around 0
        # the subject effect shared by a network's regions makes the mean of 4 subjects over
        # all regions vary by about 0.005
        assert abs(standardized.mean()) < 0.015
        assert 0.03 < standardized.std() < 0.05
        # the site's mean offset is recovered to well within the spread across sites (0.04)
        assert abs(rows.mean() - offset.mean()) < 0.015
    # residuals of regions of one network are correlated (a shared subject effect), those of
    # different networks are not
    table = pd.read_csv(cohort.labels_file, sep="\t")
    assert effects.network.tolist() == table["network"].tolist()
    standardized = (residual - effects.site_offset.loc[sites].to_numpy()) / effects.site_scale.loc[
        sites
    ].to_numpy()
    corr = np.corrcoef(standardized.T)
    network = table["network"].to_numpy()
    same = (network[:, None] == network[None, :]) & ~np.eye(len(network), dtype=bool)
    different = network[:, None] != network[None, :]
    assert corr[same].mean() > 0.2 and abs(corr[different].mean()) < 0.05


def test_site_is_predictable_and_diagnosis_present(demo_data_dir, demo_n_subjects):
    # the session's demo cohort (30 subjects, seed 0), shared with the demo and the examples
    cohort = make_demo_cohort(n_subjects=demo_n_subjects, data_dir=demo_data_dir, random_state=0)
    X = region_means(cohort)
    cov = cohort.covariates
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import NearestCentroid

    site_acc = cross_val_score(NearestCentroid(), X, cov["site"], cv=3).mean()
    assert site_acc >= 0.85  # chance is 1/3
    # default-mode regions are lower in patients once age, sex and site are accounted for
    effects = cohort.effects
    bio = (
        effects.biological_mean(cov).to_numpy()
        - (cov["diagnosis"] == "patient").to_numpy()[:, None] * effects.diagnosis_effect.to_numpy()
    )
    site_part = effects.site_offset.loc[cov["site"]].to_numpy()
    left = X - bio - site_part
    dmn = effects.diagnosis_effect.to_numpy() != 0
    patient = (cov["diagnosis"] == "patient").to_numpy()
    dmn_mean = left[:, dmn].mean(axis=1)  # one value per subject
    gap = dmn_mean[patient].mean() - dmn_mean[~patient].mean()
    standard_error = np.sqrt(
        dmn_mean[patient].var(ddof=1) / patient.sum()
        + dmn_mean[~patient].var(ddof=1) / (~patient).sum()
    )
    assert standard_error < 0.015
    assert gap == pytest.approx(effects.diagnosis_effect[dmn].mean(), abs=3 * standard_error)
    assert gap < 0  # and the sign is visible at 30 subjects


def test_reproducible_and_seed_dependent(cohort, tmp_path):
    again = make_demo_cohort(n_subjects=N_SMALL, data_dir=tmp_path, random_state=0)
    assert again.path != cohort.path
    for a, b in zip(cohort.images[:2], again.images[:2]):
        np.testing.assert_array_equal(nib.load(a).get_fdata(), nib.load(b).get_fdata())
    pd.testing.assert_frame_equal(
        cohort.covariates.drop(columns="image"), again.covariates.drop(columns="image")
    )
    pd.testing.assert_frame_equal(cohort.effects.site_offset, again.effects.site_offset)
    other = make_demo_cohort(n_subjects=N_SMALL, data_dir=tmp_path, random_state=1)
    assert other.path != again.path
    assert not np.array_equal(
        nib.load(other.images[0]).get_fdata(), nib.load(again.images[0]).get_fdata()
    )


def test_cache_is_reused(cohort, cohort_dir):
    mtimes = {path: os.stat(path).st_mtime_ns for path in [*cohort.images, cohort.atlas]}
    again = make_demo_cohort(n_subjects=N_SMALL, data_dir=cohort_dir, random_state=0)
    assert again.path == cohort.path
    assert {path: os.stat(path).st_mtime_ns for path in mtimes} == mtimes
    pd.testing.assert_frame_equal(again.covariates, cohort.covariates)
    # only one cohort folder, no leftovers of the temporary build folder
    assert len(os.listdir(os.path.join(cohort_dir, "demo_cohort"))) == 1


def test_incomplete_cache_is_rebuilt(tmp_path):
    cohort = make_demo_cohort(n_subjects=2, n_sites=1, data_dir=tmp_path)
    reference = nib.load(cohort.images[1]).get_fdata()
    os.remove(cohort.images[1])
    again = make_demo_cohort(n_subjects=2, n_sites=1, data_dir=tmp_path)
    np.testing.assert_array_equal(nib.load(again.images[1]).get_fdata(), reference)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n_subjects": 5, "n_sites": 3}, ValueError, "n_subjects"),
        ({"n_sites": 2.5}, TypeError, "n_sites"),
        ({"random_state": None}, TypeError, "random_state"),
        ({"random_state": -1}, ValueError, "random_state"),
        ({"roi_radius": 1}, ValueError, "roi_radius"),
        ({"roi_radius": "6"}, TypeError, "roi_radius"),
        ({"data_dir": 5}, TypeError, "data_dir"),
    ],
)
def test_cohort_bad_parameters(kwargs, error, match, tmp_path):
    kwargs.setdefault("data_dir", tmp_path)
    with pytest.raises(error, match=match):
        make_demo_cohort(**kwargs)
    assert not (tmp_path / "demo_cohort").exists()
