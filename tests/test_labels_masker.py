"""Tests of kwneuro_sk.maskers.LabelsMasker."""

import os
import pickle
import shutil
import warnings
from pathlib import Path

import joblib
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nibabel.arrayproxy import ArrayProxy
from nilearn.maskers import MultiNiftiLabelsMasker, NiftiLabelsMasker
from sklearn.base import clone
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import Ridge
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline

import kwneuro_sk.maskers.labels as labels_module
from kwneuro_sk import LabelsMasker
from kwneuro_sk import images as _images

STRATEGIES = ["mean", "median", "sum", "minimum", "maximum", "variance", "standard_deviation"]
SHAPE = (10, 12, 9)
AFFINE = np.array([[2.0, 0, 0, -10], [0, 2.0, 0, -12], [0, 0, 2.0, -8], [0, 0, 0, 1]])
# A coarser grid covering about the same field of view.
OTHER_SHAPE = (7, 8, 6)
OTHER_AFFINE = np.array([[3.0, 0, 0, -9], [0, 3.0, 0, -12], [0, 0, 3.0, -6], [0, 0, 0, 1]])


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def atlas_img(rng):
    atlas = rng.integers(0, 7, SHAPE).astype(np.int16)  # background 0, regions 1..6
    return nib.Nifti1Image(atlas, AFFINE)


def _random_img(rng, shape=SHAPE, affine=AFFINE):
    data = (rng.normal(size=shape) * 10 + 5).astype(np.float32)
    return nib.Nifti1Image(data, affine)


@pytest.fixture
def imgs(rng):
    return [_random_img(rng) for _ in range(4)]


@pytest.fixture
def img_paths(imgs, tmp_path, save_images):
    return save_images(imgs, tmp_path)


def _nilearn_signals(imgs, **params):
    """Reference: nilearn's NiftiLabelsMasker, one image at a time, stacked."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masker = NiftiLabelsMasker(**params).fit(imgs)
        return np.vstack([np.atleast_2d(masker.transform(img)) for img in imgs])


# ----------------------------------------------------------------- numbers vs nilearn
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_matches_nilearn(strategy, atlas_img, img_paths):
    ours = LabelsMasker(atlas_img, strategy=strategy).fit_transform(img_paths)
    ref = _nilearn_signals(img_paths, labels_img=atlas_img, strategy=strategy)
    assert ours.shape == (4, 6)
    assert ours.dtype == np.float64
    np.testing.assert_allclose(ours, ref, rtol=1e-6)


@pytest.mark.parametrize("resampling_target", ["data", "labels"])
@pytest.mark.parametrize("strategy", ["mean", "median", "maximum"])
def test_resampling_and_mask_match_nilearn(resampling_target, strategy, rng, atlas_img):
    mask_img = nib.Nifti1Image((rng.random(SHAPE) > 0.3).astype(np.uint8), AFFINE)
    imgs = [_random_img(rng, OTHER_SHAPE, OTHER_AFFINE) for _ in range(3)]
    params = dict(mask_img=mask_img, resampling_target=resampling_target, strategy=strategy)
    ours = LabelsMasker(atlas_img, **params).fit_transform(imgs)
    ref = _nilearn_signals(imgs, labels_img=atlas_img, **params)
    np.testing.assert_allclose(ours, ref, rtol=1e-6)


def test_smoothing_matches_nilearn(atlas_img, imgs):
    ours = LabelsMasker(atlas_img, smoothing_fwhm=4.0).fit_transform(imgs)
    ref = _nilearn_signals(imgs, labels_img=atlas_img, smoothing_fwhm=4.0)
    np.testing.assert_allclose(ours, ref, rtol=1e-6)


def test_float_atlas_and_other_background(rng, imgs):
    atlas = rng.integers(1, 5, SHAPE).astype(np.float32)  # 1 is the background here
    atlas_img = nib.Nifti1Image(atlas, AFFINE)
    masker = LabelsMasker(atlas_img, background_label=1).fit()
    assert masker.region_ids_ == {"background": 1, 0: 2, 1: 3, 2: 4}
    assert list(masker.get_feature_names_out()) == ["2", "3", "4"]
    ref = _nilearn_signals(imgs, labels_img=atlas_img, background_label=1)
    np.testing.assert_allclose(masker.transform(imgs), ref, rtol=1e-6)


# ----------------------------------------------------------------- NaN semantics
@pytest.fixture
def tiny():
    """A 1x1x6 atlas: region 1 on voxels 0-2, region 2 on voxels 3-4, background voxel 5."""
    atlas = nib.Nifti1Image(
        np.array([1, 1, 1, 2, 2, 0], dtype=np.int16).reshape(1, 1, 6), np.eye(4)
    )
    data = np.array([1.0, np.nan, 4.0, np.nan, np.nan, 100.0]).reshape(1, 1, 6)
    return atlas, nib.Nifti1Image(data, np.eye(4))


@pytest.mark.parametrize(
    "strategy, expected",
    [
        ("mean", 2.5),
        ("median", 2.5),
        ("sum", 5.0),
        ("minimum", 1.0),
        ("maximum", 4.0),
        ("variance", 2.25),
        ("standard_deviation", 1.5),
    ],
)
def test_nan_voxels_are_ignored_and_all_nan_region_is_nan(tiny, strategy, expected):
    atlas, img = tiny
    before = np.asanyarray(img.dataobj).copy()
    signals = LabelsMasker(atlas, strategy=strategy).fit_transform([img])
    assert signals.shape == (1, 2)
    assert signals[0, 0] == pytest.approx(expected)
    assert np.isnan(signals[0, 1])  # region 2 has only NaN voxels
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), before)  # input not mutated


def test_region_lost_by_resampling_gives_nan_column(rng):
    atlas = np.ones(SHAPE, dtype=np.int16)
    atlas[0, 0, 0] = 2  # a one-voxel region that a coarser grid misses
    masker = LabelsMasker(nib.Nifti1Image(atlas, AFFINE)).fit()
    far = AFFINE.copy()
    far[:3, 3] += 1.0  # half-voxel shift: nearest neighbour never picks voxel (0, 0, 0)
    img = _random_img(rng, OTHER_SHAPE, far)
    signals = masker.transform([img, _random_img(rng)])
    assert signals.shape == (2, 2)
    assert np.isnan(signals[0, 1]) and np.isfinite(signals[0, 0])
    assert np.all(np.isfinite(signals[1]))


def test_mask_drops_regions_and_restricts_voxels():
    atlas = nib.Nifti1Image(
        np.array([1, 1, 2, 2, 3, 0]).reshape(1, 1, 6).astype(np.int16), np.eye(4)
    )
    mask = nib.Nifti1Image(
        np.array([1, 0, 1, 1, 0, 1]).reshape(1, 1, 6).astype(np.uint8), np.eye(4)
    )
    img = nib.Nifti1Image(np.arange(6.0).reshape(1, 1, 6), np.eye(4))
    with pytest.warns(UserWarning, match="removes 1 regions"):
        masker = LabelsMasker(atlas, mask_img=mask).fit()
    assert masker.region_ids_ == {"background": 0, 0: 1, 1: 2}
    np.testing.assert_allclose(masker.transform(img), [[0.0, 2.5]])


# ----------------------------------------------------------------- inputs and shapes
def test_accepted_containers_give_the_same_rows(atlas_img, img_paths, imgs):
    masker = LabelsMasker(atlas_img).fit()
    expected = masker.transform(img_paths)
    for X in (
        tuple(img_paths),
        np.array(img_paths, dtype=object),
        pd.Series(img_paths),
        [Path(p) for p in img_paths],
        imgs,
        pd.DataFrame({"img": img_paths}),
    ):
        np.testing.assert_allclose(masker.transform(X), expected)
    one = masker.transform(img_paths[0])
    assert one.shape == (1, 6)
    np.testing.assert_allclose(one[0], expected[0])


def test_single_volume_4d_is_3d_and_other_4d_points_to_transform_imgs(atlas_img, imgs):
    masker = LabelsMasker(atlas_img).fit()
    data = np.asanyarray(imgs[0].dataobj)
    img4d = nib.Nifti1Image(data[..., np.newaxis], AFFINE)
    np.testing.assert_allclose(masker.transform(img4d), masker.transform(imgs[0]))
    series = nib.Nifti1Image(np.stack([data, data], axis=-1), AFFINE)
    with pytest.raises(ValueError, match="transform_imgs"):
        masker.transform([series])


# ----------------------------------------------------------------- names and output
def test_default_names_are_label_values(atlas_img):
    masker = LabelsMasker(atlas_img).fit()
    names = masker.get_feature_names_out()
    assert isinstance(names, np.ndarray)
    assert list(names) == ["1", "2", "3", "4", "5", "6"]
    assert masker.region_ids_ == {"background": 0, **{i: i + 1 for i in range(6)}}
    assert masker.region_names_ == dict(enumerate(names))


def test_names_from_list_lut_and_tsv(atlas_img, tmp_path):
    names = [f"r{i}" for i in range(1, 7)]
    assert list(LabelsMasker(atlas_img, labels=names).fit().get_feature_names_out()) == names
    with_bg = ["Background", *names]
    assert list(LabelsMasker(atlas_img, labels=with_bg).fit().get_feature_names_out()) == names
    lut = pd.DataFrame({"index": [0, *range(1, 7)], "name": ["bg", *"abcdef"]})
    assert list(LabelsMasker(atlas_img, labels=lut).fit().get_feature_names_out()) == list("abcdef")
    tsv = tmp_path / "atlas.tsv"
    lut.to_csv(tsv, sep="\t", index=False)
    assert list(LabelsMasker(atlas_img, labels=str(tsv)).fit().get_feature_names_out()) == list(
        "abcdef"
    )


def test_duplicate_names_are_made_unique(atlas_img):
    masker = LabelsMasker(atlas_img, labels=["a", "a", "b", "c", "d", "d"]).fit()
    names = masker.get_feature_names_out()
    assert len(set(names)) == 6
    assert list(names) == ["a_1", "a_2", "b", "c", "d_5", "d_6"]


def test_set_output_pandas(atlas_img, img_paths):
    masker = LabelsMasker(atlas_img, labels=list("abcdef")).set_output(transform="pandas")
    out = masker.fit_transform(pd.Series(img_paths, index=[10, 11, 12, 13]))
    assert isinstance(out, pd.DataFrame)
    assert list(out.columns) == list("abcdef")
    assert list(out.index) == [10, 11, 12, 13]


# ----------------------------------------------------------------- bad input
def test_missing_file_names_the_path(atlas_img, tmp_path):
    missing = str(tmp_path / "nope.nii.gz")
    masker = LabelsMasker(atlas_img).fit()
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        masker.transform([missing])
    with pytest.raises(FileNotFoundError, match="labels_img.*nope.nii.gz"):
        LabelsMasker(missing).fit()


def test_not_an_image(atlas_img, tmp_path):
    text = tmp_path / "notes.nii"
    text.write_text("not an image")
    masker = LabelsMasker(atlas_img).fit()
    with pytest.raises(ValueError, match="notes.nii"):
        masker.transform([str(text)])
    fake_gz = tmp_path / "fake.nii.gz"
    fake_gz.write_text("not gzip either")
    with pytest.raises(ValueError, match="fake.nii.gz.*not a readable"):
        masker.transform([fake_gz])
    expected = "path, os.PathLike, nibabel image or kwneuro volume resource"
    with pytest.raises(TypeError, match=expected):
        masker.transform([42])
    with pytest.raises(TypeError, match="numeric array"):
        masker.transform(np.zeros(SHAPE))
    with pytest.raises(TypeError, match="must be an image or a list"):
        masker.transform(42)


def test_atlas_without_regions():
    empty = nib.Nifti1Image(np.zeros(SHAPE, dtype=np.int16), AFFINE)
    with pytest.raises(ValueError, match="labels_img has no region"):
        LabelsMasker(empty).fit()


def test_grid_mismatch_without_resampling(atlas_img, rng):
    masker = LabelsMasker(atlas_img, resampling_target=None).fit()
    with pytest.raises(ValueError, match="resampling_target=None.*same grid"):
        masker.transform([_random_img(rng, OTHER_SHAPE, OTHER_AFFINE)])


def test_labels_length_mismatch(atlas_img):
    with pytest.raises(ValueError, match="labels has 3 names but labels_img has 6 regions"):
        LabelsMasker(atlas_img, labels=["a", "b", "c"]).fit()


def test_unknown_strategy(atlas_img):
    with pytest.raises(ValueError, match="strategy"):
        LabelsMasker(atlas_img, strategy="mode").fit()


def test_inverse_transform_wrong_width(atlas_img):
    masker = LabelsMasker(atlas_img).fit()
    with pytest.raises(ValueError, match=r"shape \(n_images, 6\)"):
        masker.inverse_transform(np.zeros((2, 5)))


# ----------------------------------------------------------------- reading behaviour
def test_fit_never_reads_subject_images(atlas_img, tmp_path):
    missing = [str(tmp_path / f"missing-{i}.nii.gz") for i in range(3)]
    masker = LabelsMasker(atlas_img).fit(missing)
    assert masker.n_elements_ == 6


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_transform_reads_each_file_once(
    atlas_img, imgs, tmp_path, monkeypatch, suffix, save_images
):
    paths = save_images(imgs, tmp_path, suffix)
    loads, reads, unzips = [], [], []
    real_load, real_array, real_gunzip = _images.load_image, ArrayProxy.__array__, _images.gunzip

    def counting_gunzip(raw):
        unzips.append(len(raw))
        return real_gunzip(raw)

    def counting_load(source, **kwargs):
        loads.append(source)
        return real_load(source, **kwargs)

    def counting_array(self, *args, **kwargs):
        reads.append(self.file_like)
        return real_array(self, *args, **kwargs)

    monkeypatch.setattr(_images, "load_image", counting_load)
    monkeypatch.setattr(ArrayProxy, "__array__", counting_array)
    monkeypatch.setattr(_images, "gunzip", counting_gunzip)
    masker = LabelsMasker(atlas_img).fit(paths)
    assert loads == [atlas_img] and reads == [] and unzips == []
    signals = masker.transform(paths)
    assert loads[1:] == paths  # each image loaded once, in order
    # and its data read once: decompressed once and viewed (.nii.gz), or read by nibabel (.nii)
    assert len(unzips) == (len(paths) if suffix == ".nii.gz" else 0)
    assert len(reads) + len(unzips) == len(paths)
    np.testing.assert_allclose(signals, LabelsMasker(atlas_img).fit_transform(imgs))


def test_nifti2_and_uncompressed_files(atlas_img, imgs, tmp_path):
    data = np.asanyarray(imgs[0].dataobj)
    nifti2 = tmp_path / "n2.nii.gz"
    nib.Nifti2Image(data, AFFINE).to_filename(nifti2)
    plain = tmp_path / "n1.nii"
    imgs[0].to_filename(plain)
    masker = LabelsMasker(atlas_img).fit()
    expected = masker.transform(imgs[0])
    np.testing.assert_allclose(masker.transform([nifti2, plain]), np.vstack([expected] * 2))


# ----------------------------------------------------------------- scikit-learn integration
def test_column_transformer_with_pandas_output(atlas_img, img_paths):
    frame = pd.DataFrame({"img": img_paths, "age": [20.0, 30.0, 40.0, 50.0]}, index=list("wxyz"))
    ct = ColumnTransformer(
        [("regions", LabelsMasker(atlas_img), "img"), ("age", "passthrough", ["age"])]
    ).set_output(transform="pandas")
    out = ct.fit_transform(frame)
    assert list(out.columns) == [f"regions__{i}" for i in range(1, 7)] + ["age__age"]
    assert list(out.index) == list("wxyz")
    expected = LabelsMasker(atlas_img).fit_transform(img_paths)
    np.testing.assert_allclose(out.iloc[:, :6].to_numpy(), expected)


def test_grid_search_over_strategy(atlas_img, rng, tmp_path):
    # y is the sum of each image's region offsets; 10 % of the voxels are wild outliers, so the
    # region medians recover the offsets and the means do not: the search must pick "median".
    atlas = np.asanyarray(atlas_img.dataobj)
    paths, y = [], []
    for i in range(12):
        offsets = rng.normal(size=7)
        data = offsets[atlas] + rng.normal(scale=0.1, size=SHAPE)
        outliers = rng.random(SHAPE) < 0.1
        data[outliers] = rng.choice([-50.0, 50.0], size=outliers.sum())
        path = tmp_path / f"g{i}.nii.gz"
        nib.Nifti1Image(data.astype(np.float32), AFFINE).to_filename(path)
        paths.append(str(path))
        y.append(offsets[1:].sum())
    y = np.array(y)
    pipe = make_pipeline(LabelsMasker(atlas_img), Ridge(alpha=1e-3))
    search = GridSearchCV(pipe, {"labelsmasker__strategy": ["mean", "median"]}, cv=3)
    search.fit(paths, y)
    assert search.best_params_ == {"labelsmasker__strategy": "median"}
    for strategy, score in zip(["mean", "median"], search.cv_results_["mean_test_score"]):
        by_hand = cross_val_score(
            clone(pipe).set_params(labelsmasker__strategy=strategy), paths, y, cv=3
        )
        assert score == pytest.approx(by_hand.mean(), rel=1e-12)
    assert search.cv_results_["mean_test_score"][1] > 0.95
    np.testing.assert_allclose(search.predict(paths[:2]), y[:2], atol=0.2)


def test_clone_and_pickle(atlas_img, img_paths):
    masker = LabelsMasker(atlas_img, strategy="median")
    cloned = clone(masker)
    assert cloned.get_params()["strategy"] == "median"
    assert cloned.labels_img is not atlas_img  # clone deep-copies non-estimator params
    masker.fit()
    restored = pickle.loads(pickle.dumps(masker))
    np.testing.assert_array_equal(restored.transform(img_paths), masker.transform(img_paths))


def test_n_jobs_gives_the_same_rows(atlas_img, img_paths):
    serial = LabelsMasker(atlas_img).fit_transform(img_paths)
    parallel = LabelsMasker(atlas_img, n_jobs=2).fit_transform(img_paths)
    np.testing.assert_array_equal(parallel, serial)


class _CountingThreads(joblib._parallel_backends.ThreadingBackend):
    """Threading backend that counts the tasks submitted to it (test-only)."""

    submitted = 0

    def submit(self, func, callback=None):
        type(self).submitted += 1
        return super().submit(func, callback=callback)


def test_parallel_config_backend_and_n_jobs_are_used(atlas_img, img_paths):
    joblib.register_parallel_backend("kwneuro_sk_counting", _CountingThreads)
    expected = LabelsMasker(atlas_img).fit_transform(img_paths)
    _CountingThreads.submitted = 0
    with joblib.parallel_config(backend="kwneuro_sk_counting", n_jobs=2):
        out = LabelsMasker(atlas_img).fit_transform(img_paths)  # n_jobs=None: the context's
    np.testing.assert_array_equal(out, expected)
    assert _CountingThreads.submitted == 4  # 4 images, 4 * n_jobs chunks at most
    _CountingThreads.submitted = 0
    with joblib.parallel_config(backend="kwneuro_sk_counting", n_jobs=2):
        LabelsMasker(atlas_img, n_jobs=1).fit_transform(img_paths)  # explicit 1: serial
    assert _CountingThreads.submitted == 0


def test_plan_for_a_new_grid_is_built_once_by_concurrent_threads(atlas_img, rng, monkeypatch):
    import time

    builds = []
    real_build = labels_module.build_plan

    def slow_build(*args, **kwargs):
        builds.append(1)
        time.sleep(0.05)  # let the other threads arrive while the first one builds
        return real_build(*args, **kwargs)

    monkeypatch.setattr(labels_module, "build_plan", slow_build)
    masker = LabelsMasker(atlas_img, n_jobs=4).fit()
    builds.clear()
    other = [_random_img(rng, OTHER_SHAPE, OTHER_AFFINE) for _ in range(8)]
    out = masker.transform(other)
    assert len(builds) == 1
    np.testing.assert_array_equal(out, LabelsMasker(atlas_img).fit().transform(other))
    # the lock survives pickling: a restored masker builds plans for new grids too
    restored = pickle.loads(pickle.dumps(masker))
    third = [_random_img(rng, (5, 6, 5), np.diag([4.0, 4.0, 4.0, 1.0]))]
    np.testing.assert_array_equal(
        restored.transform(third), LabelsMasker(atlas_img).fit().transform(third)
    )


def test_verbose_reports_progress(atlas_img, img_paths, capsys):
    LabelsMasker(atlas_img, verbose=2).fit_transform(img_paths)
    assert "[LabelsMasker] 4/4 images" in capsys.readouterr().err


# ----------------------------------------------------------------- memory cache
def test_memory_cache_hits_and_invalidates_on_file_change(atlas_img, rng, tmp_path, monkeypatch):
    path = tmp_path / "sub.nii.gz"
    _random_img(rng).to_filename(path)
    masker = LabelsMasker(atlas_img, memory=joblib.Memory(tmp_path / "cache", verbose=0)).fit()
    first = masker.transform([str(path)])

    loads, reads = [], []
    real_decode, real_read = _images.image_from_bytes, _images.read_file_bytes
    monkeypatch.setattr(
        _images,
        "image_from_bytes",
        lambda raw, source, **kw: loads.append(source) or real_decode(raw, source, **kw),
    )
    monkeypatch.setattr(
        _images,
        "read_file_bytes",
        lambda source, **kw: reads.append(source) or real_read(source, **kw),
    )
    np.testing.assert_array_equal(masker.transform([str(path)]), first)
    assert loads == []  # served from the cache, neither decoded
    assert reads == []  # nor read: the digest of the unchanged file is remembered

    new_img = _random_img(rng)
    new_img.to_filename(path)
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = masker.transform([str(path)])
    assert loads == [str(path)]  # decoded from the one read, not read again
    assert reads == [str(path)]
    np.testing.assert_allclose(second, LabelsMasker(atlas_img).fit_transform([new_img]))
    assert not np.allclose(second, first)

    other = clone(masker).set_params(strategy="maximum").fit()
    np.testing.assert_allclose(
        other.transform([str(path)]),
        LabelsMasker(atlas_img, strategy="maximum").fit_transform([new_img]),
    )


# ----------------------------------------------------------------- inverse_transform
def test_inverse_transform_shapes_and_round_trip(atlas_img):
    masker = LabelsMasker(atlas_img).fit()
    signals = np.arange(12.0).reshape(2, 6)
    img4d = masker.inverse_transform(signals)
    assert img4d.shape == SHAPE + (2,)
    np.testing.assert_array_equal(img4d.affine, AFFINE)
    img3d = masker.inverse_transform(signals[0])
    assert img3d.shape == SHAPE
    atlas = np.asanyarray(atlas_img.dataobj)
    np.testing.assert_array_equal(np.asanyarray(img3d.dataobj)[atlas == 3], 2.0)
    np.testing.assert_array_equal(np.asanyarray(img3d.dataobj)[atlas == 0], 0.0)
    np.testing.assert_allclose(masker.transform(masker.inverse_transform(signals[1:])), signals[1:])


# ----------------------------------------------------------------- 4D time series
CLEANING = [
    dict(detrend=True, standardize="zscore_sample", low_pass=0.1, t_r=2.0),
    dict(standardize="psc", high_pass=0.02, t_r=2.0, clean_args={"filter": "cosine"}),
    dict(detrend=True, standardize_confounds=False),
]


def _runs(rng, n_runs=2, n_scans=20):
    # float64 data: nilearn keeps float32 signals in float32 through cleaning.
    runs = [
        nib.Nifti1Image(rng.normal(size=SHAPE + (n_scans,)) + 3 + 0.05 * np.arange(n_scans), AFFINE)
        for _ in range(n_runs)
    ]
    return runs, [rng.normal(size=(n_scans, 2)) for _ in range(n_runs)]


@pytest.mark.parametrize("cleaning", CLEANING, ids=["bandpass-zscore", "cosine-psc", "detrend"])
def test_transform_imgs_matches_nilearn_multi_masker(atlas_img, rng, cleaning):
    runs, confounds = _runs(rng)
    ours = LabelsMasker(atlas_img, **cleaning).fit().transform_imgs(runs, confounds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = (
            MultiNiftiLabelsMasker(atlas_img, **cleaning)
            .fit()
            .transform_imgs(runs, confounds=confounds)
        )
        raw = LabelsMasker(atlas_img).fit().transform_imgs(runs, confounds)
    assert [o.shape for o in ours] == [(20, 6), (20, 6)]
    for mine, theirs, uncleaned in zip(ours, ref, raw):
        np.testing.assert_allclose(mine, theirs, rtol=1e-6, atol=1e-9)
        assert not np.allclose(mine, uncleaned)  # the cleaning did something


def test_transform_imgs_without_cleaning_is_the_region_means_of_each_volume(atlas_img, rng):
    runs, _ = _runs(rng, n_runs=1, n_scans=5)
    masker = LabelsMasker(atlas_img).fit()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even nilearn's deprecation of standardize=False
        (series,) = masker.transform_imgs(runs)
    np.testing.assert_allclose(series, masker.transform(nib.four_to_three(runs[0])), rtol=1e-12)


def test_transform_imgs_keywords_still_work_with_a_future_warning(atlas_img, rng):
    runs, confounds = _runs(rng)
    cleaning = CLEANING[0]
    expected = LabelsMasker(atlas_img, **cleaning).fit().transform_imgs(runs, confounds)
    masker = LabelsMasker(atlas_img).fit()
    with pytest.warns(
        FutureWarning, match="detrend, standardize, low_pass, t_r to transform_imgs is deprecated"
    ):
        old_style = masker.transform_imgs(runs, confounds, **cleaning)
    for mine, theirs in zip(old_style, expected):
        np.testing.assert_array_equal(mine, theirs)
    assert masker.detrend is False  # the keyword did not change the masker
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="'low_pass'.*transform_imgs"):
        masker.transform_imgs(runs, confounds, low_pass=-1.0)


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("detrend", True),
        ("standardize", "zscore_sample"),
        ("low_pass", 0.1),
        ("high_pass", 0.01),
        ("clean_args", {"filter": "cosine"}),
    ],
)
def test_transform_refuses_to_clean_across_subjects(atlas_img, imgs, param, value):
    masker = LabelsMasker(atlas_img, t_r=2.0, **{param: value}).fit()
    with pytest.raises(ValueError, match=f"{param}=.*transform_imgs.*no time axis"):
        masker.transform(imgs)
    # t_r and standardize_confounds alone clean nothing
    np.testing.assert_array_equal(
        LabelsMasker(atlas_img, t_r=2.0, standardize_confounds=False).fit_transform(imgs),
        LabelsMasker(atlas_img).fit_transform(imgs),
    )


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("detrend", "yes"),
        ("standardize", "zscore"),
        ("low_pass", 0.0),
        ("high_pass", -0.1),
        ("t_r", 0),
        ("clean_args", [("filter", "cosine")]),
        ("standardize_confounds", None),
    ],
)
def test_cleaning_parameters_validated_at_fit(atlas_img, param, value):
    masker = LabelsMasker(atlas_img, **{param: value})
    assert getattr(masker, param) == value  # stored unchanged
    with pytest.raises(ValueError, match=f"'{param}' parameter of LabelsMasker"):
        masker.fit()


def test_cleaning_parameters_are_cloned_and_tuned_by_grid_search(atlas_img, rng):
    """GridSearchCV sets the cleaning parameters on clones and transform_imgs uses them."""
    runs, _ = _runs(rng, n_runs=4, n_scans=30)
    masker = LabelsMasker(atlas_img, t_r=2.0, clean_args={"filter": "butterworth"})
    cloned = clone(masker)
    assert cloned.get_params()["t_r"] == 2.0
    assert cloned.get_params()["clean_args"] == {"filter": "butterworth"}

    def smoothness(estimator, X, y=None):
        # minus the mean squared scan-to-scan change of the cleaned time series
        return -np.mean([np.mean(np.diff(ts, axis=0) ** 2) for ts in estimator.transform_imgs(X)])

    grid = {"low_pass": [None, 0.05], "detrend": [False, True]}
    search = GridSearchCV(masker, grid, scoring=smoothness, cv=2).fit(runs)
    folds = [(runs[2:], runs[:2]), (runs[:2], runs[2:])]  # KFold(2): (train, test)
    expected = [
        np.mean(
            [
                smoothness(clone(masker).set_params(**params).fit(train), test)
                for train, test in folds
            ]
        )
        for params in search.cv_results_["params"]
    ]
    np.testing.assert_allclose(search.cv_results_["mean_test_score"], expected, rtol=1e-12)
    assert search.best_params_ == search.cv_results_["params"][int(np.argmax(expected))]
    assert search.best_estimator_.low_pass == 0.05


def test_transform_imgs_confounds_length_checked(atlas_img, imgs):
    masker = LabelsMasker(atlas_img).fit()
    with pytest.raises(ValueError, match="confounds has 1 entries but imgs_list has 2"):
        masker.transform_imgs(imgs[:2], confounds=[None])


def _constant_img(value, shape=(5, 6, 4), affine=None):
    return nib.Nifti1Image(
        np.full(shape, value, dtype=np.float32), np.eye(4) if affine is None else affine
    )


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_memory_cache_not_fooled_by_same_size_and_restored_mtime(tmp_path, suffix):
    """A file rewritten in place with the same size and its time stamps put back gives the
    new values: the cache key is the content, not path/size/mtime."""
    atlas = np.zeros((5, 6, 4), dtype=np.int16)
    atlas[:2], atlas[3:] = 1, 2
    atlas_img = nib.Nifti1Image(atlas, np.eye(4))
    path = tmp_path / f"sub{suffix}"
    _constant_img(1.0).to_filename(path)
    stat = os.stat(path)
    masker = LabelsMasker(atlas_img, memory=tmp_path / "cache").fit()
    np.testing.assert_array_equal(masker.transform([str(path)]), [[1.0, 1.0]])
    _constant_img(2.0).to_filename(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    if suffix == ".nii":
        assert os.stat(path).st_size == stat.st_size
    assert os.stat(path).st_mtime_ns == stat.st_mtime_ns
    np.testing.assert_array_equal(masker.transform([str(path)]), [[2.0, 2.0]])


def test_memory_cache_follows_a_re_pointed_symlink(tmp_path):
    atlas = np.zeros((5, 6, 4), dtype=np.int16)
    atlas[:2], atlas[3:] = 1, 2
    masker = LabelsMasker(nib.Nifti1Image(atlas, np.eye(4)), memory=tmp_path / "cache").fit()
    for value in (1.0, 5.0):
        _constant_img(value).to_filename(tmp_path / f"v{int(value)}.nii")
    stat = os.stat(tmp_path / "v1.nii")
    os.utime(tmp_path / "v5.nii", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    link = tmp_path / "current.nii"
    link.symlink_to(tmp_path / "v1.nii")
    np.testing.assert_array_equal(masker.transform([str(link)]), [[1.0, 1.0]])
    link.unlink()
    link.symlink_to(tmp_path / "v5.nii")
    np.testing.assert_array_equal(masker.transform([str(link)]), [[5.0, 5.0]])
    # the content key also serves a copy under another name from the cache
    shutil.copy(tmp_path / "v5.nii", tmp_path / "copy.nii")
    np.testing.assert_array_equal(masker.transform([str(tmp_path / "copy.nii")]), [[5.0, 5.0]])


def test_memory_as_a_path(atlas_img, img_paths, tmp_path):
    masker = LabelsMasker(atlas_img, memory=tmp_path / "cache").fit()
    first = masker.transform(img_paths)
    np.testing.assert_array_equal(masker.transform(img_paths), first)
    assert any((tmp_path / "cache").rglob("output.pkl"))


def test_atlas_is_resampled_once_per_image_grid(atlas_img, rng, monkeypatch):
    calls = []
    real_resample = _images.resample_to_grid

    def counting_resample(img, grid, **kwargs):
        calls.append(grid[0])
        return real_resample(img, grid, **kwargs)

    monkeypatch.setattr(_images, "resample_to_grid", counting_resample)
    masker = LabelsMasker(atlas_img).fit()
    other = [_random_img(rng, OTHER_SHAPE, OTHER_AFFINE) for _ in range(3)]
    masker.transform(other + [_random_img(rng)])
    masker.transform(other)
    assert calls == [OTHER_SHAPE]


def test_memory_does_not_grow_with_the_number_of_images(tmp_path):
    import tracemalloc

    shape, rng = (40, 40, 40), np.random.default_rng(1)
    atlas = nib.Nifti1Image(rng.integers(0, 5, shape).astype(np.int16), np.eye(4))
    paths = []
    for i in range(10):
        path = tmp_path / f"big-{i}.nii.gz"
        nib.Nifti1Image(rng.normal(size=shape).astype(np.float32), np.eye(4)).to_filename(path)
        paths.append(str(path))
    masker = LabelsMasker(atlas).fit()
    masker.transform(paths[:1])  # warm up lazy imports and caches

    def peak_bytes(batch):
        tracemalloc.start()
        masker.transform(batch)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    image_bytes = np.prod(shape) * 4
    assert peak_bytes(paths) < peak_bytes(paths[:2]) + image_bytes / 2


def test_int64_atlas_and_int64_mask(atlas_img, imgs):
    atlas = np.asanyarray(atlas_img.dataobj).astype(np.int64)
    mask = np.ones(SHAPE, dtype=np.int64)
    masker = LabelsMasker(
        nib.Nifti1Image(atlas, AFFINE, dtype=np.int64),
        mask_img=nib.Nifti1Image(mask, AFFINE, dtype=np.int64),
    )
    np.testing.assert_allclose(
        masker.fit_transform(imgs), LabelsMasker(atlas_img).fit_transform(imgs)
    )
    assert masker.inverse_transform(np.ones(6)).shape == SHAPE
