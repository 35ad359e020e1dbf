"""Streamed harmonize_volumes / apply_volumes (output_dir) and the statistics they fit from."""

import os
import tracemalloc

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from kwneuro_sk import CombatHarmonizer, harmonize_volumes
from kwneuro_sk.combat import model, statistics

SHAPE = (6, 5, 4)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
COMPARED = (
    "grand_mean",
    "beta",
    "var_pooled",
    "gamma_hat",
    "delta_hat",
    "gamma_star",
    "delta_star",
)


def _cohort(n=24, offset=50.0, sd=1.0, seed=0):
    rng = np.random.default_rng(seed)
    site = np.array(["siteA", "siteB", "siteC"])[np.arange(n) % 3]
    age = rng.uniform(20, 80, n).round()
    sex = rng.choice(["F", "M"], n)
    grid = np.indices(SHAPE).sum(axis=0)
    mask = grid >= 2
    site_offset = {s: rng.normal(scale=2.0 * sd, size=SHAPE) for s in ("siteA", "siteB", "siteC")}
    scale = {"siteA": 1.0, "siteB": 1.8, "siteC": 0.6}
    images = []
    for i in range(n):
        data = (
            offset
            + site_offset[site[i]]
            + 0.05 * sd * age[i]
            + 0.8 * sd * (sex[i] == "M")
            + sd * scale[site[i]] * rng.normal(size=SHAPE)
        )
        data[~mask] = 7.0 + i
        images.append(nib.Nifti1Image(data.astype(np.float32), AFFINE))
    covars = pd.DataFrame({"site": site, "age": age, "sex": sex})
    return images, covars, nib.Nifti1Image(mask.astype(np.uint8), AFFINE), mask


@pytest.fixture(scope="module")
def cohort():
    return _cohort()


def _assert_estimates_equal(expected, actual, rtol=1e-10, skip_site=None):
    """Arrays equal to ``rtol`` of their largest magnitude (values near 0 included)."""
    for name in COMPARED + ("gamma_bar", "t2", "a_prior", "b_prior"):
        want = np.asarray(expected.estimates[name], dtype=float)
        got = np.asarray(actual.estimates[name], dtype=float)
        if skip_site is not None and name in ("gamma_bar", "t2", "a_prior", "b_prior"):
            # the reference site's priors are of a constant delta_hat: rounding noise
            want, got = np.delete(want, skip_site), np.delete(got, skip_site)
        assert want.shape == got.shape, name
        np.testing.assert_array_equal(np.isnan(want), np.isnan(got), err_msg=name)
        if np.isfinite(want).any():
            scale = np.nanmax(np.abs(want))
            np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale, err_msg=name)


OPTIONS = [
    {},
    {"categorical_cols": ["sex"], "continuous_cols": ["age"]},
    {"continuous_cols": ["age"], "ref_batch": "siteB"},
    {"mean_only": True, "categorical_cols": "sex"},
    {"eb": False, "continuous_cols": "age"},
    {"parametric": False, "continuous_cols": "age"},
]


@pytest.mark.parametrize("options", OPTIONS)
def test_streamed_equals_in_memory(cohort, options, tmp_path):
    images, covars, mask_img, mask = cohort
    expected_imgs, expected = harmonize_volumes(images, covars, "site", mask_img, **options)
    paths, estimates = harmonize_volumes(
        images, covars, "site", mask_img, output_dir=tmp_path, chunk_size=5, **options
    )
    skip = 1 if options.get("ref_batch") else None
    _assert_estimates_equal(expected.estimates and expected, estimates, skip_site=skip)
    assert len(paths) == len(images)
    for want, path in zip(expected_imgs, paths):
        got = nib.load(path)
        assert got.get_data_dtype() == np.float32
        np.testing.assert_allclose(
            np.asarray(got.dataobj), np.asarray(want.dataobj), rtol=2e-7, atol=0
        )
        np.testing.assert_array_equal(got.affine, want.affine)
    np.testing.assert_array_equal(estimates.info["volumes"]["mask"], mask)


def test_streamed_float64_preserve_out_of_mask_and_paths(cohort, tmp_path):
    images, covars, mask_img, mask = cohort
    inputs = []
    for i, img in enumerate(images):
        inputs.append(str(tmp_path / f"in-{i}.nii.gz"))
        nib.save(img, inputs[-1])
    before = [open(p, "rb").read() for p in inputs]
    expected, _ = harmonize_volumes(
        inputs,
        covars,
        "site",
        mask_img,
        dtype=np.float64,
        preserve_out_of_mask=True,
        continuous_cols="age",
    )
    paths, _ = harmonize_volumes(
        inputs,
        covars,
        "site",
        mask_img,
        dtype=np.float64,
        preserve_out_of_mask=True,
        continuous_cols="age",
        output_dir=tmp_path / "out",
        chunk_size=4,
    )
    assert [os.path.basename(p) for p in paths[:2]] == [
        "in-0_harmonized.nii.gz",
        "in-1_harmonized.nii.gz",
    ]
    for want, path in zip(expected, paths):
        got = np.asarray(nib.load(path).dataobj)
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, want.get_fdata(), rtol=1e-12)
        np.testing.assert_array_equal(got[~mask], want.get_fdata()[~mask])  # kept as is
    assert [open(p, "rb").read() for p in inputs] == before  # inputs untouched
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.path.basename(p) for p in paths)


def test_apply_volumes_streamed_equals_in_memory(cohort, tmp_path):
    images, covars, mask_img, _ = cohort
    _, estimates = harmonize_volumes(
        images[:18], covars[:18], "site", mask_img, continuous_cols="age"
    )
    expected = estimates.apply_volumes(images[18:], covars[18:])
    paths = estimates.apply_volumes(images[18:], covars[18:], output_dir=tmp_path, chunk_size=4)
    assert [os.path.basename(p) for p in paths] == [f"sub-{i}_harmonized.nii.gz" for i in range(6)]
    for want, path in zip(expected, paths):
        np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj), np.asarray(want.dataobj))
    new_site = covars[18:].assign(site="siteZ")
    with pytest.raises(ValueError, match=r"\['siteZ'\] were not seen.*output_dir=None"):
        estimates.apply_volumes(images[18:], new_site, output_dir=tmp_path, unseen_batch="adapt")
    with pytest.raises(ValueError, match="siteZ"):
        estimates.apply_volumes(images[18:], new_site, output_dir=tmp_path)


def test_parallel_chunks_give_the_same_files(cohort, tmp_path):
    images, covars, mask_img, _ = cohort
    one, est_one = harmonize_volumes(
        images, covars, "site", mask_img, output_dir=tmp_path / "1", chunk_size=3, n_jobs=1
    )
    two, est_two = harmonize_volumes(
        images, covars, "site", mask_img, output_dir=tmp_path / "2", chunk_size=3, n_jobs=2
    )
    _assert_estimates_equal(est_one, est_two, rtol=0)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(nib.load(a).get_fdata(), nib.load(b).get_fdata())


def test_verbose_reports_both_passes(cohort, tmp_path, capsys):
    images, covars, mask_img, _ = cohort
    harmonize_volumes(
        images, covars, "site", mask_img, output_dir=tmp_path, chunk_size=8, verbose=1
    )
    err = capsys.readouterr().err
    assert "[harmonize_volumes] fit: 24/24 volumes" in err
    assert "[harmonize_volumes] harmonize: 24/24 volumes" in err
    harmonize_volumes(images, covars, "site", mask_img, output_dir=tmp_path, chunk_size=8)
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------------------------
# naming, collisions, errors
# --------------------------------------------------------------------------------------------


def test_output_names_and_collisions(cohort, tmp_path):
    images, covars, mask_img, _ = cohort
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    nii = str(tmp_path / "a" / "s0.nii")
    nib.save(images[0], nii)
    same_a, same_b = str(tmp_path / "a" / "s1.nii.gz"), str(tmp_path / "b" / "s1.nii.gz")
    nib.save(images[1], same_a)
    nib.save(images[2], same_b)
    sources = [nii, same_a, *images[2:]]
    paths, _ = harmonize_volumes(sources, covars, "site", mask_img, output_dir=tmp_path / "o")
    assert os.path.basename(paths[0]) == "s0_harmonized.nii"
    assert os.path.basename(paths[1]) == "s1_harmonized.nii.gz"
    assert os.path.basename(paths[2]) == "sub-02_harmonized.nii.gz"
    with pytest.raises(
        ValueError,
        match=r"volumes 1 and 2 would both be written to .*"
        r"s1_harmonized\.nii\.gz",
    ):
        harmonize_volumes(
            [nii, same_a, same_b, *images[3:]], covars, "site", mask_img, output_dir=tmp_path / "o"
        )
    # an input whose name is an output name in its own directory is never overwritten
    trap = str(tmp_path / "a" / "s0_harmonized.nii")
    nib.save(images[1], trap)
    before = open(trap, "rb").read()
    with pytest.raises(
        ValueError, match="volume 0 would be written to .* which is the input volume 1"
    ):
        harmonize_volumes(
            [nii, trap, *images[2:]], covars, "site", mask_img, output_dir=tmp_path / "a"
        )
    assert open(trap, "rb").read() == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="cannot create output_dir .* is a file"):
        harmonize_volumes(images, covars, "site", mask_img, output_dir=tmp_path / "file")


def test_streamed_errors_name_the_volume(cohort, tmp_path):
    images, covars, mask_img, _ = cohort
    bad = list(images)
    data = images[5].get_fdata()
    data[3, 3, 3] = np.nan
    bad[5] = nib.Nifti1Image(data.astype(np.float32), AFFINE)
    with pytest.raises(ValueError, match="volume 5 has 1 NaN or infinite voxel"):
        harmonize_volumes(bad, covars, "site", mask_img, output_dir=tmp_path)
    shifted = list(images)
    moved = AFFINE.copy()
    moved[0, 3] = 5.0
    shifted[4] = nib.Nifti1Image(images[4].get_fdata().astype(np.float32), moved)
    with pytest.raises(ValueError, match="volume 4"):
        harmonize_volumes(shifted, covars, "site", mask_img, output_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        harmonize_volumes(
            [*images[:-1], str(tmp_path / "nope.nii.gz")],
            covars,
            "site",
            mask_img,
            output_dir=tmp_path / "o",
        )
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        harmonize_volumes(images, covars, "site", mask_img, output_dir=tmp_path, chunk_size=0)
    with pytest.raises(ValueError, match="single row.*mean_only=True"):
        harmonize_volumes(images[:4], covars[:4], "site", mask_img, output_dir=tmp_path)


# --------------------------------------------------------------------------------------------
# memory and numerics
# --------------------------------------------------------------------------------------------


def _peak_bytes(paths, covars, mask_img, out):
    tracemalloc.start()
    harmonize_volumes(
        paths, covars, "site", mask_img, output_dir=out, chunk_size=10, continuous_cols="age"
    )
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_memory_does_not_grow_with_subjects(tmp_path):
    shape = (20, 20, 20)
    rng = np.random.default_rng(3)
    mask_img = nib.Nifti1Image(np.ones(shape, dtype=np.uint8), AFFINE)
    paths = []
    for i in range(200):
        paths.append(str(tmp_path / f"v{i:03d}.nii"))
        nib.save(
            nib.Nifti1Image(rng.normal(size=shape).astype(np.float32) + i % 3, AFFINE), paths[-1]
        )
    covars = pd.DataFrame({"site": np.arange(200) % 3, "age": rng.uniform(20, 80, 200)})
    # best of two: one-off interpreter allocations (the interned-strings table growing by
    # 4 MB) must not count as the run's memory
    small = min(
        _peak_bytes(paths[:50], covars[:50], mask_img, tmp_path / f"o50-{i}") for i in range(2)
    )
    large = min(_peak_bytes(paths, covars, mask_img, tmp_path / f"o200-{i}") for i in range(2))
    matrix = 200 * 8000 * 4  # the float32 in-mask matrix the in-memory path holds
    assert large < 1.15 * small
    assert large < 0.75 * matrix


@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_large_offset_statistics_stay_accurate(offset):
    """T1-like data (offset 1e4, sd 10): merging many small chunks gives the fit of the
    exactly shifted data (the offset removed before anything is summed) to 1e-10."""
    rng = np.random.default_rng(7)
    n, n_features, n_batches = 300, 40, 3
    batch_idx = np.arange(n) % n_batches
    Z = np.column_stack([rng.uniform(20, 80, n), rng.integers(0, 2, n)])
    noise = 10.0 * rng.normal(size=(n, n_features)) + 0.3 * Z[:, :1] + batch_idx[:, None]
    X = offset + noise
    shifted = X - offset  # exact (Sterbenz): the reference has no offset to lose digits to
    reference, ref_mean, ref_ss = model.fit_location_scale(shifted, batch_idx, n_batches, Z)
    keys = [("value", "age"), ("value", "group")]

    def part(rows):
        return statistics.SiteStatistics.of_rows(X[rows], batch_idx[rows], keys, Z[rows])

    total = None
    for start in range(0, n, 7):
        chunk = part(slice(start, start + 7))
        total = chunk if total is None else total.add(chunk)
    fitted, mean, ss = statistics.fit_from_moments(total.moments)
    np.testing.assert_allclose(fitted.var_pooled, reference.var_pooled, rtol=1e-10)
    beta_scale = np.abs(reference.beta).max(axis=1, keepdims=True)  # each covariate's
    assert np.all(np.abs(fitted.beta - reference.beta) <= 1e-10 * beta_scale)
    np.testing.assert_allclose(
        fitted.grand_mean - offset,
        reference.grand_mean,
        rtol=0,
        atol=1e-10 * np.sqrt(reference.var_pooled).max(),
    )
    np.testing.assert_allclose(ss, ref_ss, rtol=1e-10)
    np.testing.assert_allclose(mean, ref_mean, rtol=0, atol=1e-10)
    # merged in another grouping (dask's tree), to the same numbers
    merged = statistics.merge_all([part(slice(s, s + 11)) for s in range(0, n, 11)])
    _, _, tree_ss = statistics.fit_from_moments(merged.moments)
    np.testing.assert_allclose(tree_ss, ref_ss, rtol=1e-10)
    # rows added in place, 5 at a time (partial_fit's route), to the same numbers
    running = part(slice(0, 5))
    for start in range(5, n, 5):
        rows = slice(start, start + 5)
        running = running.add_rows(X[rows], batch_idx[rows], keys, Z[rows])
    fitted, mean, ss = statistics.fit_from_moments(running.moments)
    np.testing.assert_allclose(ss, ref_ss, rtol=1e-10)
    np.testing.assert_allclose(fitted.var_pooled, reference.var_pooled, rtol=1e-10)
    assert np.all(np.abs(fitted.beta - reference.beta) <= 1e-10 * beta_scale)


def test_merge_of_sites_absent_from_a_chunk():
    rng = np.random.default_rng(1)
    X, Z = rng.normal(size=(10, 4)), rng.normal(size=(10, 1))
    sites = np.array(["a", "a", "a", "b", "b", "b", "b", "c", "c", "c"])
    keys = [("value", "z")]
    whole = statistics.SiteStatistics.of_rows(X, sites, keys, Z)
    parts = [
        statistics.SiteStatistics.of_rows(X[r], sites[r], keys, Z[r])
        for r in (slice(0, 3), slice(3, 7), slice(7, 10))
    ]
    assert [p.sites for p in parts] == [["a"], ["b"], ["c"]]
    for merged in (statistics.merge_all(parts), parts[2].merge(parts[0]).merge(parts[1])):
        assert merged.sites == ["a", "b", "c"]
        for name in ("n", "zbar", "xbar", "czz", "czx", "cxx"):
            np.testing.assert_allclose(
                getattr(merged.moments, name), getattr(whole.moments, name), atol=1e-12
            )
    with pytest.raises(ValueError, match="no statistics"):
        statistics.merge_all([])
    # added in place, chunks with other sites and other covariate columns (a level column
    # missing from a chunk is zero there): the same statistics as all rows at once
    levels = np.array(["u", "u", "v", "u", "v", "w", "u", "v", "v", "w"])
    keys = [("value", "z")] + [("level", "g", lv) for lv in "uvw"]
    onehot = (levels[:, None] == np.array(list("uvw"))).astype(float)
    Zg = np.column_stack([Z, onehot])
    whole = statistics.SiteStatistics.of_rows(X, sites, keys, Zg)
    running = statistics.SiteStatistics.of_rows(X[:2], sites[:2], keys[:2], Zg[:2, :2])
    for r in (slice(2, 3), slice(3, 6), slice(6, 10)):
        present = [0] + [1 + j for j in range(3) if onehot[r, j].any()]
        running = running.add_rows(X[r], sites[r], [keys[j] for j in present], Zg[r][:, present])
    assert running.sites == ["a", "b", "c"]
    order = [running.columns.index(k) for k in keys]
    for name in ("n", "xbar", "cxx", "magnitude"):
        np.testing.assert_allclose(
            getattr(running.moments, name), getattr(whole.moments, name), atol=1e-12
        )
    np.testing.assert_allclose(running.moments.zbar[:, order], whole.moments.zbar, atol=1e-12)
    np.testing.assert_allclose(running.moments.czx[:, order], whole.moments.czx, atol=1e-12)
    np.testing.assert_allclose(
        running.moments.czz[:, order][:, :, order], whole.moments.czz, atol=1e-12
    )


def test_harmonizer_fit_from_statistics_equals_fit():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(30, 6)) + np.repeat([0.0, 2.0, -1.0], 10)[:, None]
    site = np.repeat(["a", "b", "c"], 10)
    covars = pd.DataFrame({"age": rng.uniform(20, 80, 30), "sex": rng.integers(0, 2, 30)})
    options = dict(categorical_cols="sex", smooth_cols="age", smooth_knots=4)
    expected = CombatHarmonizer(continuous_cols=None, **options).fit(
        X, batch=site, covariates=covars
    )
    combat = CombatHarmonizer(**options)
    # quantile knots need all the rows' covariates: with_fixed_knots places them as fit does
    chunker = combat.with_fixed_knots(covars)
    assert combat.smooth_knots == 4 and list(chunker.smooth_knots) == ["age"]
    parts = [
        chunker.row_statistics(X[r], batch=site[r], covariates=covars.iloc[r])
        for r in np.array_split(np.arange(30), 7)
    ]
    combat.fit_from_statistics(statistics.merge_all(parts))
    assert combat.n_features_in_ == 6
    _assert_estimates_equal(expected.estimates_, combat.estimates_)
    np.testing.assert_allclose(
        combat.transform(X, batch=site, covariates=covars),
        expected.transform(X, batch=site, covariates=covars),
        rtol=1e-10,
        atol=1e-12,
    )
    with pytest.raises(TypeError, match="SiteStatistics of row_statistics"):
        combat.fit_from_statistics(parts[0].moments)
    # statistics made with other knots, or another number of them, are refused by name
    other = CombatHarmonizer(**{**options, "smooth_knots": 5}).with_fixed_knots(covars)
    with pytest.raises(ValueError, match="'age' were made with knots=.*4 knots"):
        combat.fit_from_statistics(other.row_statistics(X, batch=site, covariates=covars))
    with pytest.raises(ValueError, match="different B-spline settings for smooth covariate 'age'"):
        statistics.merge_all(
            [parts[0], other.row_statistics(X[:5], batch=site[:5], covariates=covars[:5])]
        )


def test_fit_from_statistics_refuses_counts_names_and_covariates_it_cannot_use():
    """Column counts or names that disagree with the statistics, and covariates the
    statistics were made without, are refused by name (before: a later transform failed on a
    count, a wrong-length name list was kept, a continuous covariate gave "('value', 'age')
    is not in list" and a categorical one a model without it)."""
    rng = np.random.default_rng(5)
    X, site = rng.normal(size=(20, 3)), np.tile(["a", "b"], 10)
    stats = CombatHarmonizer().row_statistics(X, batch=site)
    frame = pd.DataFrame(X, columns=["f0", "f1", "f2"]).assign(site=site)
    by_column = CombatHarmonizer(batch_col="site").row_statistics(frame)
    refused = [
        (CombatHarmonizer(), stats, {"n_features_in": 5}, "statistics' 3 features; got 5"),
        (CombatHarmonizer(), stats, {"n_features_in": "3"}, "3 features; got '3'"),
        (
            CombatHarmonizer(batch_col="site"),
            by_column,
            {"n_features_in": 2},
            "3 features and the site and covariate columns; got 2",
        ),
        (CombatHarmonizer(), stats, {"feature_names_in": ["a"]}, "1 names for 3 input columns"),
        (CombatHarmonizer(), stats, {"columns_in": ["a"]}, "columns_in has 1 names for 3"),
        (CombatHarmonizer(), stats, {"feature_names_out": ["a"]}, "1 names for 3 features"),
        (
            CombatHarmonizer(categorical_cols="sex", continuous_cols="age"),
            stats,
            {},
            r"without covariate\(s\) \['sex', 'age'\]",
        ),
    ]
    for combat, given, options, message in refused:
        with pytest.raises(ValueError, match=message):
            combat.fit_from_statistics(given, **options)
        assert not hasattr(combat, "n_features_in_")
    fitted = CombatHarmonizer(batch_col="site").fit_from_statistics(by_column, n_features_in=4)
    np.testing.assert_allclose(
        fitted.transform(frame), CombatHarmonizer(batch_col="site").fit_transform(frame)
    )


class StandInResource:
    """kwneuro's in-memory volume resource surface, without kwneuro."""

    def __init__(self, array, affine):
        self.array, self.affine = array, affine

    def get_array(self):
        return self.array

    def get_affine(self):
        return self.affine

    def get_metadata(self):
        return {}

    def load(self):
        return self


def test_streamed_volume_resources_are_written_as_files(cohort, tmp_path):
    images, covars, mask_img, mask = cohort
    resources = [StandInResource(np.asarray(img.dataobj), img.affine) for img in images]
    expected, _ = harmonize_volumes(images, covars, "site", mask_img)
    paths, _ = harmonize_volumes(
        resources,
        covars,
        "site",
        StandInResource(mask.astype(np.uint8), AFFINE),
        output_dir=tmp_path,
    )
    assert os.path.basename(paths[3]) == "sub-03_harmonized.nii.gz"
    for want, path in zip(expected, paths):
        np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj), np.asarray(want.dataobj))


@pytest.mark.parametrize("n_jobs", [0, "two", 1.5])
def test_n_jobs_checked_at_the_boundary(cohort, tmp_path, n_jobs):
    images, covars, mask_img, _ = cohort
    with pytest.raises(ValueError, match="'n_jobs' parameter of harmonize_volumes"):
        harmonize_volumes(images, covars, "site", mask_img, output_dir=tmp_path, n_jobs=n_jobs)
    assert not any(tmp_path.iterdir())  # nothing written
