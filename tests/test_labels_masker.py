"""Tests of kwneuro_sk.maskers.LabelsMasker."""

import doctest
import os
import pickle
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
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline

import kwneuro_sk.maskers.labels as labels_module
from kwneuro_sk import LabelsMasker
from kwneuro_sk import images as _images

STRATEGIES = ["mean", "median", "sum", "minimum", "maximum", "variance", "standard_deviation"]
SHAPE = (10, 12, 9)
AFFINE = np.array(
    [[2.0, 0, 0, -10], [0, 2.0, 0, -12], [0, 0, 2.0, -8], [0, 0, 0, 1]]
)
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
def img_paths(imgs, tmp_path):
    paths = []
    for i, img in enumerate(imgs):
        path = tmp_path / f"sub-{i}.nii.gz"
        img.to_filename(path)
        paths.append(str(path))
    return paths


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
    np.testing.assert_array_equal(masker.region_ids_, [2, 3, 4])
    assert list(masker.get_feature_names_out()) == ["2", "3", "4"]
    ref = _nilearn_signals(imgs, labels_img=atlas_img, background_label=1)
    np.testing.assert_allclose(masker.transform(imgs), ref, rtol=1e-6)


# ----------------------------------------------------------------- NaN semantics
@pytest.fixture
def tiny():
    """A 1x1x6 atlas: region 1 on voxels 0-2, region 2 on voxels 3-4, background voxel 5."""
    atlas = nib.Nifti1Image(np.array([1, 1, 1, 2, 2, 0], dtype=np.int16).reshape(1, 1, 6),
                            np.eye(4))
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
    atlas = nib.Nifti1Image(np.array([1, 1, 2, 2, 3, 0]).reshape(1, 1, 6).astype(np.int16),
                            np.eye(4))
    mask = nib.Nifti1Image(np.array([1, 0, 1, 1, 0, 1]).reshape(1, 1, 6).astype(np.uint8),
                           np.eye(4))
    img = nib.Nifti1Image(np.arange(6.0).reshape(1, 1, 6), np.eye(4))
    with pytest.warns(UserWarning, match="removes 1 regions"):
        masker = LabelsMasker(atlas, mask_img=mask).fit()
    np.testing.assert_array_equal(masker.region_ids_, [1, 2])
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
    np.testing.assert_array_equal(masker.region_ids_, np.arange(1, 7))
    np.testing.assert_array_equal(masker.region_names_, names)


def test_names_from_list_lut_and_tsv(atlas_img, tmp_path):
    names = [f"r{i}" for i in range(1, 7)]
    assert list(LabelsMasker(atlas_img, labels=names).fit().get_feature_names_out()) == names
    with_bg = ["Background", *names]
    assert list(LabelsMasker(atlas_img, labels=with_bg).fit().region_names_) == names
    lut = pd.DataFrame({"index": [0, *range(1, 7)], "name": ["bg", *"abcdef"]})
    assert list(LabelsMasker(atlas_img, labels=lut).fit().region_names_) == list("abcdef")
    tsv = tmp_path / "atlas.tsv"
    lut.to_csv(tsv, sep="\t", index=False)
    assert list(LabelsMasker(atlas_img, labels=str(tsv)).fit().region_names_) == list("abcdef")


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
    with pytest.raises(TypeError, match="path, os.PathLike, nibabel image or kwneuro volume resource"):
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
    assert masker.region_ids_.size == 6


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_transform_reads_each_file_once(atlas_img, imgs, tmp_path, monkeypatch, suffix):
    paths = []
    for i, img in enumerate(imgs):
        paths.append(str(tmp_path / f"sub-{i}{suffix}"))
        img.to_filename(paths[-1])
    loads, reads = [], []
    real_load, real_array = _images.load_image, ArrayProxy.__array__

    def counting_load(source, **kwargs):
        loads.append(source)
        return real_load(source, **kwargs)

    def counting_array(self, *args, **kwargs):
        reads.append(self.file_like)
        return real_array(self, *args, **kwargs)

    monkeypatch.setattr(_images, "load_image", counting_load)
    monkeypatch.setattr(ArrayProxy, "__array__", counting_array)
    masker = LabelsMasker(atlas_img).fit(paths)
    assert loads == [atlas_img] and reads == []
    signals = masker.transform(paths)
    assert loads[1:] == paths  # each image loaded once, in order
    assert len(reads) == len(paths)  # and its data read once
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
    frame = pd.DataFrame({"img": img_paths, "age": [20.0, 30.0, 40.0, 50.0]},
                         index=list("wxyz"))
    ct = ColumnTransformer(
        [("regions", LabelsMasker(atlas_img), "img"), ("age", "passthrough", ["age"])]
    ).set_output(transform="pandas")
    out = ct.fit_transform(frame)
    assert list(out.columns) == [f"regions__{i}" for i in range(1, 7)] + ["age__age"]
    assert list(out.index) == list("wxyz")
    expected = LabelsMasker(atlas_img).fit_transform(img_paths)
    np.testing.assert_allclose(out.iloc[:, :6].to_numpy(), expected)


def test_grid_search_over_strategy(atlas_img, rng, tmp_path):
    paths = []
    for i in range(6):
        path = tmp_path / f"g{i}.nii.gz"
        _random_img(rng).to_filename(path)
        paths.append(str(path))
    y = rng.normal(size=6)
    pipe = make_pipeline(LabelsMasker(atlas_img), Ridge())
    search = GridSearchCV(pipe, {"labelsmasker__strategy": ["mean", "median"]}, cv=2)
    search.fit(paths, y)
    assert search.best_params_["labelsmasker__strategy"] in {"mean", "median"}
    assert search.predict(paths[:2]).shape == (2,)


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


def test_verbose_reports_progress(atlas_img, img_paths, capsys):
    LabelsMasker(atlas_img, verbose=2).fit_transform(img_paths)
    assert "[LabelsMasker] 4/4 images" in capsys.readouterr().err


# ----------------------------------------------------------------- memory cache
def test_memory_cache_hits_and_invalidates_on_file_change(atlas_img, rng, tmp_path,
                                                           monkeypatch):
    path = tmp_path / "sub.nii.gz"
    _random_img(rng).to_filename(path)
    masker = LabelsMasker(atlas_img, memory=joblib.Memory(tmp_path / "cache", verbose=0)).fit()
    first = masker.transform([str(path)])

    loads = []
    real_load = _images.load_image
    monkeypatch.setattr(_images, "load_image",
                        lambda source, **kw: loads.append(source) or real_load(source, **kw))
    np.testing.assert_array_equal(masker.transform([str(path)]), first)
    assert loads == []  # served from the cache

    new_img = _random_img(rng)
    new_img.to_filename(path)
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = masker.transform([str(path)])
    assert loads == [str(path)]
    np.testing.assert_allclose(second, LabelsMasker(atlas_img).fit_transform([new_img]))
    assert not np.allclose(second, first)

    other = clone(masker).set_params(strategy="maximum").fit()
    np.testing.assert_allclose(other.transform([str(path)]),
                               LabelsMasker(atlas_img, strategy="maximum").fit_transform([new_img]))


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
    np.testing.assert_allclose(masker.transform(masker.inverse_transform(signals[1:])),
                               signals[1:])


# ----------------------------------------------------------------- 4D time series
def test_transform_imgs_matches_nilearn_multi_masker(atlas_img, rng):
    # float64 data: nilearn keeps float32 signals in float32 through cleaning.
    runs = [nib.Nifti1Image(rng.normal(size=SHAPE + (20,)) + 3, AFFINE) for _ in range(2)]
    confounds = [rng.normal(size=(20, 2)) for _ in range(2)]
    clean = dict(detrend=True, standardize="zscore_sample", low_pass=0.1, t_r=2.0)
    ours = LabelsMasker(atlas_img).fit().transform_imgs(runs, confounds, **clean)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = MultiNiftiLabelsMasker(atlas_img, **clean).fit().transform_imgs(
            runs, confounds=confounds
        )
    assert [o.shape for o in ours] == [(20, 6), (20, 6)]
    for mine, theirs in zip(ours, ref):
        np.testing.assert_allclose(mine, theirs, rtol=1e-6, atol=1e-9)


def test_transform_imgs_confounds_length_checked(atlas_img, imgs):
    masker = LabelsMasker(atlas_img).fit()
    with pytest.raises(ValueError, match="confounds has 1 entries but imgs_list has 2"):
        masker.transform_imgs(imgs[:2], confounds=[None])


def test_docstring_example_runs():
    result = doctest.testmod(labels_module, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0


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
    np.testing.assert_allclose(masker.fit_transform(imgs), LabelsMasker(atlas_img).fit_transform(imgs))
    assert masker.inverse_transform(np.ones(6)).shape == SHAPE
