"""The rest of MultiNiftiLabelsMasker's surface on LabelsMasker (issue 16, item 1), each item
checked against nilearn 0.14's numbers on tiny 4D runs: high-variance confounds, dtype, the
cleaning options with confounds and a mask, the content-keyed cache of 4D runs, reports,
fit(imgs=...), the clean__ spelling, lut, transform_single_imgs."""

import pickle
import warnings

import joblib
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nilearn.image import high_variance_confounds
from nilearn.maskers import MultiNiftiLabelsMasker
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from kwneuro_sk import LabelsMasker
from kwneuro_sk import images as _images

SHAPE = (6, 7, 5)
AFFINE = np.diag([3.0, 3.0, 3.0, 1.0])
N_SCANS = (30, 24)


def _nilearn_runs(atlas_img, runs, *, fit_params=None, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masker = MultiNiftiLabelsMasker(atlas_img, **(fit_params or {})).fit()
        return masker.transform_imgs(runs, **kwargs)


def _assert_runs_close(ours, theirs, atol=1e-4):
    """nilearn extracts and cleans float32 images in float32: agreement to float32 rounding."""
    assert len(ours) == len(theirs)
    for o, t in zip(ours, theirs):
        assert o.shape == t.shape
        np.testing.assert_allclose(o, t, rtol=1e-5, atol=atol)


@pytest.fixture(scope="module")
def atlas_img():
    rng = np.random.default_rng(11)
    return nib.Nifti1Image(rng.integers(0, 5, SHAPE).astype(np.int16), AFFINE)


@pytest.fixture(scope="module")
def runs(make_runs):
    return make_runs(12, N_SCANS, SHAPE, AFFINE)


@pytest.fixture
def run_paths(runs, tmp_path, save_images):
    return save_images(runs, tmp_path, "_bold.nii.gz")


# ------------------------------------------------------------------ high-variance confounds
def test_high_variance_confounds_match_nilearn(atlas_img, runs):
    params = dict(high_variance_confounds=True, detrend=True, standardize="zscore_sample")
    ours = LabelsMasker(atlas_img, **params).fit().transform_imgs(runs)
    theirs = _nilearn_runs(atlas_img, runs, fit_params=params)
    _assert_runs_close(ours, theirs)
    # and they do something: without them the series differ
    plain = LabelsMasker(atlas_img, detrend=True, standardize="zscore_sample").fit()
    assert np.abs(plain.transform_imgs(runs)[0] - ours[0]).max() > 0.1


def test_high_variance_confounds_options_by_nilearn_names(atlas_img, runs):
    options = {"n_confounds": 2, "percentile": 10.0, "detrend": False}
    masker = LabelsMasker(atlas_img, high_variance_confounds=options).fit()
    extra = [np.ones((n, 1)) * np.arange(n)[:, None] for n in N_SCANS]  # plus user confounds
    ours = masker.transform_imgs(runs, confounds=extra)
    reference_confounds = [
        np.hstack([c, high_variance_confounds(r, **options)]) for c, r in zip(extra, runs)
    ]
    _assert_runs_close(ours, _nilearn_runs(atlas_img, runs, confounds=reference_confounds))


@pytest.mark.parametrize(
    ("option", "match"),
    [
        ({"n_components": 3}, r"unknown option\(s\) \['n_components'\].*n_confounds"),
        ({"n_confounds": 0}, r"'n_confounds'\] must be a positive integer"),
        ({"percentile": 0.0}, r"'percentile'\] must be in \(0, 100\]"),
    ],
)
def test_bad_high_variance_options_are_named(atlas_img, option, match):
    with pytest.raises(ValueError, match=match):
        LabelsMasker(atlas_img, high_variance_confounds=option).fit()


def test_high_variance_detrend_must_be_a_bool_at_fit(atlas_img):
    # nilearn refuses it too, but only once a run is read, and without the option's name
    with pytest.raises(TypeError, match=r"high_variance_confounds\['detrend'\] must be True"):
        LabelsMasker(atlas_img, high_variance_confounds={"detrend": "yes"}).fit()


def test_high_variance_confounds_refused_for_3d_transform(atlas_img, runs):
    masker = LabelsMasker(atlas_img, high_variance_confounds=True).fit()
    first_volume = nib.Nifti1Image(runs[0].get_fdata()[..., 0], AFFINE)
    with pytest.raises(ValueError, match="high_variance_confounds=True cleans the time series"):
        masker.transform([first_volume])


# ------------------------------------------------------------------------------------ dtype
@pytest.mark.parametrize("dtype", ["auto", np.float32, "float64", np.int32])
def test_dtype_matches_nilearn(atlas_img, runs, dtype):
    ours = LabelsMasker(atlas_img, dtype=dtype).fit().transform_imgs(runs)
    theirs = _nilearn_runs(atlas_img, runs, fit_params={"dtype": dtype})
    assert [o.dtype for o in ours] == [t.dtype for t in theirs]
    _assert_runs_close(ours, theirs, atol=1e-4 if np.dtype(ours[0].dtype).kind == "f" else 1)


def test_dtype_auto_on_an_integer_image_gives_int32_as_nilearn(atlas_img):
    rng = np.random.default_rng(3)
    run = nib.Nifti1Image(rng.integers(0, 1000, (*SHAPE, 12)).astype(np.int16), AFFINE)
    (ours,) = LabelsMasker(atlas_img, dtype="auto").fit().transform_imgs([run])
    (theirs,) = _nilearn_runs(atlas_img, [run], fit_params={"dtype": "auto"})
    assert ours.dtype == theirs.dtype == np.int32
    np.testing.assert_array_equal(ours, theirs)
    # 3D transform follows the same rule
    rows = (
        LabelsMasker(atlas_img, dtype="auto")
        .fit()
        .transform([nib.Nifti1Image(run.get_fdata()[..., 0].astype(np.int16), AFFINE)])
    )
    assert rows.dtype == np.int32


def test_dtype_none_keeps_float64(atlas_img, runs):
    # documented difference: nilearn returns float32 for float32 images; float64 here
    (ours, _) = LabelsMasker(atlas_img).fit().transform_imgs(runs)
    assert ours.dtype == np.float64


@pytest.mark.parametrize(
    ("dtype", "match"), [(bool, "dtype cannot be bool"), ("text", "dtype must be None, 'auto'")]
)
def test_bad_dtype_is_refused_at_fit(atlas_img, runs, dtype, match):
    with pytest.raises(TypeError, match=match):
        LabelsMasker(atlas_img, dtype=dtype).fit()
    # and when set on a fitted masker (read at each call, as the cleaning options)
    fitted = LabelsMasker(atlas_img).fit().set_params(dtype=dtype)
    with pytest.raises(TypeError, match=match):
        fitted.transform_imgs(runs)
    with pytest.raises(TypeError, match=match):
        fitted.transform([nib.Nifti1Image(runs[0].get_fdata()[..., 0], AFFINE)])


def test_an_integer_dtype_that_cannot_hold_a_signal_is_refused(atlas_img, runs):
    """nilearn casts with NumPy, which wraps a signal round (uint8: -62 -> 194) and makes NaN
    an arbitrary integer; here the signal and the type are named."""
    scaled = nib.Nifti1Image(runs[0].get_fdata() * 300 - 150, AFFINE)
    with pytest.raises(
        ValueError, match=r"run 0 .*region '\d+' has signal .*dtype=uint8 cannot hold"
    ):
        LabelsMasker(atlas_img, dtype=np.uint8).fit().transform_imgs([scaled])
    with pytest.raises(ValueError, match=r"whole numbers from -128 to 127"):
        LabelsMasker(atlas_img, dtype="int8").fit().transform_imgs([scaled])
    # the same values in a type that holds them are nilearn's
    (ours,) = LabelsMasker(atlas_img, dtype=np.int32).fit().transform_imgs([scaled])
    (theirs,) = _nilearn_runs(atlas_img, [scaled], fit_params={"dtype": np.int32})
    np.testing.assert_allclose(ours, theirs, atol=1)
    # 3D: a region without a finite voxel in one image is NaN, which no integer holds
    values = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)
    holed = np.where(atlas_img.get_fdata() == 3, np.nan, values).astype(np.float32)
    images = [nib.Nifti1Image(values, AFFINE), nib.Nifti1Image(holed, AFFINE)]
    masker = LabelsMasker(atlas_img, dtype=np.int32).fit()
    with pytest.raises(ValueError, match=r"image 1 .*region '3' has signal nan, which dtype=int32"):
        masker.transform(images)
    assert masker.transform(images[:1]).dtype == np.int32


# ------------------------------------------------------- cleaning, confounds and mask vs nilearn
def test_cleaning_with_confounds_and_mask_match_nilearn(atlas_img, runs):
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[1:5, 1:6, 1:4] = 1
    mask_img = nib.Nifti1Image(mask, AFFINE)
    rng = np.random.default_rng(5)
    confounds = [rng.normal(size=(n, 2)) for n in N_SCANS]
    params = dict(
        mask_img=mask_img,
        detrend=True,
        standardize="zscore_sample",
        standardize_confounds=True,
        high_pass=0.01,
        low_pass=0.2,
        t_r=2.0,
        clean_args={"filter": "butterworth", "butterworth__padlen": 10},
    )
    ours = LabelsMasker(atlas_img, **params).fit().transform_imgs(runs, confounds=confounds)
    theirs = _nilearn_runs(atlas_img, runs, fit_params=params, confounds=confounds)
    _assert_runs_close(ours, theirs)


def test_transform_single_imgs_matches_nilearn(atlas_img, runs):
    mask = np.arange(3, 24)
    conf = np.random.default_rng(6).normal(size=(24, 2))
    ours = LabelsMasker(atlas_img, detrend=True).fit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = MultiNiftiLabelsMasker(atlas_img, detrend=True).fit()
        expected = theirs.transform_single_imgs(runs[1], confounds=conf, sample_mask=mask)
    got = ours.transform_single_imgs(runs[1], confounds=conf, sample_mask=mask)
    assert got.shape == (21, 4)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


# ------------------------------------------------------------------ clean__ spelling, lut, fit
def test_clean_keywords_are_clean_args(atlas_img, runs):
    with pytest.warns(FutureWarning, match=r"clean__filter.*clean_args=\{'filter': \.\.\.\}"):
        old = LabelsMasker(atlas_img, detrend=True, high_pass=0.05, t_r=2.0, clean__filter="cosine")
    assert old.clean_args == {"filter": "cosine"}
    assert clone(old).clean_args == {"filter": "cosine"}  # clone-safe: it is a parameter
    new = LabelsMasker(
        atlas_img, detrend=True, high_pass=0.05, t_r=2.0, clean_args={"filter": "cosine"}
    )
    params = dict(detrend=True, high_pass=0.05, t_r=2.0, clean_args={"filter": "cosine"})
    expected = _nilearn_runs(atlas_img, runs, fit_params=params)
    _assert_runs_close(old.fit().transform_imgs(runs), expected)
    _assert_runs_close(new.fit().transform_imgs(runs), expected)
    # set_params takes the same spelling (so a grid can search masker__clean__filter)
    with pytest.warns(FutureWarning):
        new.set_params(clean__filter="butterworth")
    assert new.clean_args == {"filter": "butterworth"}


def test_clean_keywords_conflicts_and_typos_are_named(atlas_img):
    with pytest.raises(ValueError, match=r"clean__filter and clean_args\['filter'\] both set"):
        LabelsMasker(atlas_img, clean_args={"filter": "cosine"}, clean__filter="butterworth")
    with pytest.raises(TypeError, match="unexpected keyword argument 'stratgy'"):
        LabelsMasker(atlas_img, stratgy="mean")


def test_lut_is_nilearn_look_up_table(atlas_img):
    lut = pd.DataFrame({"index": [0, 1, 2, 3, 4], "name": ["Background", "a", "b", "c", "d"]})
    ours = LabelsMasker(atlas_img, lut=lut).fit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = MultiNiftiLabelsMasker(atlas_img, lut=lut).fit()
    assert ours.region_names_ == theirs.region_names_ == {0: "a", 1: "b", 2: "c", 3: "d"}
    assert ours.region_ids_ == theirs.region_ids_
    pd.testing.assert_frame_equal(ours.lut_, theirs.lut_[["index", "name"]])
    assert ours.memory_.location is None
    with pytest.raises(ValueError, match="either labels or lut"):
        LabelsMasker(atlas_img, labels=["a", "b", "c", "d"], lut=lut).fit()


def test_fit_takes_nilearn_imgs_keyword(atlas_img, runs):
    by_keyword = LabelsMasker(atlas_img).fit(imgs=runs)
    assert by_keyword.n_elements_ == 4
    np.testing.assert_array_equal(
        by_keyword.transform_imgs(runs)[0],
        LabelsMasker(atlas_img).fit(runs).transform_imgs(runs)[0],
    )
    with pytest.raises(ValueError, match="both X and imgs"):
        LabelsMasker(atlas_img).fit(runs, imgs=runs)
    assert isinstance(by_keyword.clean_args_, dict)
    assert isinstance(by_keyword.labels_img_, nib.Nifti1Image)
    assert by_keyword.mask_img_ is None


# ------------------------------------------------------------------------ 4D cache (memory)
class _CountingGunzip:
    def __init__(self, monkeypatch):
        self.calls = 0
        self.real = _images.gunzip
        monkeypatch.setattr(_images, "gunzip", self)

    def __call__(self, raw):
        self.calls += 1
        return self.real(raw)


def test_cache_of_runs_skips_decompression_and_keeps_cleaning_live(
    atlas_img, runs, run_paths, tmp_path, monkeypatch
):
    memory = joblib.Memory(tmp_path / "cache", verbose=0)
    masker = LabelsMasker(atlas_img, memory=memory, detrend=True).fit()
    counter = _CountingGunzip(monkeypatch)
    first = masker.transform_imgs(run_paths)
    assert counter.calls == 2
    again = masker.transform_imgs(run_paths)
    assert counter.calls == 2  # served from the cache: no decompression
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    # other cleaning, confounds and mask: still no decompression, and nilearn's numbers
    masker.set_params(standardize="zscore_sample", low_pass=0.2, t_r=1.0)
    conf = [np.random.default_rng(7).normal(size=(n, 2)) for n in N_SCANS]
    masks = [np.arange(2, 30), None]
    cleaned = masker.transform_imgs(run_paths, confounds=conf, sample_mask=masks)
    assert counter.calls == 2
    expected = _nilearn_runs(
        atlas_img,
        runs,
        fit_params=dict(detrend=True, standardize="zscore_sample", low_pass=0.2, t_r=1.0),
        confounds=conf,
        sample_mask=masks,
    )
    _assert_runs_close(cleaned, expected)
    # high-variance confounds are part of the key: a miss, then a hit
    masker.set_params(high_variance_confounds=True)
    masker.transform_imgs(run_paths)
    assert counter.calls == 4
    masker.transform_imgs(run_paths)
    assert counter.calls == 4


def test_cached_runs_are_not_even_read_again_but_copies_are_found(
    atlas_img, run_paths, tmp_path, monkeypatch
):
    import shutil

    masker = LabelsMasker(atlas_img, memory=tmp_path / "cache").fit()
    first = masker.transform_imgs(run_paths)
    reads = []
    real_read = _images.read_file_bytes
    monkeypatch.setattr(
        _images, "read_file_bytes", lambda path, **kw: reads.append(path) or real_read(path, **kw)
    )
    counter = _CountingGunzip(monkeypatch)
    again = LabelsMasker(atlas_img, memory=tmp_path / "cache").fit().transform_imgs(run_paths)
    assert reads == [] and counter.calls == 0  # the file digest is remembered: no read at all
    np.testing.assert_array_equal(first[1], again[1])
    copy = tmp_path / "copy_bold.nii.gz"
    shutil.copy(run_paths[1], copy)
    (from_copy,) = masker.transform_imgs([str(copy)])
    assert reads == [str(copy)] and counter.calls == 0  # read and hashed, not decompressed
    np.testing.assert_array_equal(from_copy, first[1])


def test_cache_of_runs_is_invalidated_by_a_rewritten_file(
    atlas_img, runs, run_paths, tmp_path, monkeypatch
):
    masker = LabelsMasker(atlas_img, memory=tmp_path / "cache").fit()
    before = masker.transform_imgs(run_paths)
    # rewrite run 0 in place: same name, same size, same time stamps, other values
    stat = __import__("os").stat(run_paths[0])
    changed = nib.Nifti1Image(runs[0].get_fdata().astype(np.float32) * 2, AFFINE)
    changed.to_filename(run_paths[0])
    __import__("os").utime(run_paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    counter = _CountingGunzip(monkeypatch)
    after = masker.transform_imgs(run_paths)
    assert counter.calls == 1  # only the rewritten run is read again
    np.testing.assert_allclose(after[0], 2 * before[0], rtol=1e-6)
    np.testing.assert_array_equal(after[1], before[1])


def test_nilearn_cache_serves_a_rewritten_file_stale_ours_does_not(atlas_img, runs, tmp_path):
    # the difference the docs table states: nilearn 0.14 keys a path by its name
    path = str(tmp_path / "run_bold.nii.gz")
    runs[1].to_filename(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = MultiNiftiLabelsMasker(atlas_img, memory=str(tmp_path / "nilearn")).fit()
        (theirs_before,) = theirs.transform_imgs([path])
    ours = LabelsMasker(atlas_img, memory=tmp_path / "ours").fit()
    (ours_before,) = ours.transform_imgs([path])
    nib.Nifti1Image(runs[1].get_fdata().astype(np.float32) + 10, AFFINE).to_filename(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (theirs_after,) = theirs.transform_imgs([path])
    (ours_after,) = ours.transform_imgs([path])
    np.testing.assert_array_equal(theirs_after, theirs_before)  # stale
    np.testing.assert_allclose(ours_after, ours_before + 10, rtol=1e-6)


def test_cache_with_threads_equals_one_job(atlas_img, run_paths, tmp_path):
    one = LabelsMasker(atlas_img, detrend=True).fit().transform_imgs(run_paths)
    masker = LabelsMasker(atlas_img, detrend=True, memory=tmp_path / "cache").fit()
    for _ in range(2):  # a miss, then a hit, both with two threads
        threads = masker.transform_imgs(run_paths, n_jobs=2)
        for a, b in zip(one, threads):
            np.testing.assert_array_equal(a, b)


def test_memory_level_zero_disables_the_cache(atlas_img, run_paths, tmp_path, monkeypatch):
    masker = LabelsMasker(atlas_img, memory=tmp_path / "cache", memory_level=0).fit()
    counter = _CountingGunzip(monkeypatch)
    masker.transform_imgs(run_paths)
    masker.transform_imgs(run_paths)
    assert counter.calls == 4
    assert not list((tmp_path / "cache").rglob("*cached_signals*"))


# ---------------------------------------------------------------------------------- reports
def test_report_shows_atlas_sizes_names_and_lost_regions(atlas_img, runs, tmp_path):
    mask = np.ones(SHAPE, dtype=np.uint8)
    atlas = atlas_img.get_fdata().astype(np.int16)
    mask[atlas == 4] = 0  # region 4 lies outside the mask
    lut = pd.DataFrame({"index": [1, 2, 3, 4], "name": ["alpha", "beta", "gamma", "delta"]})
    with pytest.warns(UserWarning, match="removes 1 regions"):
        masker = LabelsMasker(atlas_img, lut=lut, mask_img=nib.Nifti1Image(mask, AFFINE))
        masker.fit(imgs=runs)
    # a coarse grid on which a small region disappears
    coarse = nib.Nifti1Image(
        np.random.default_rng(0).normal(size=(2, 2, 2, 5)).astype(np.float32),
        np.diag([9.0, 9.0, 9.0, 1.0]),
    )
    masker.transform_imgs([coarse])
    report = masker.generate_report(title="My atlas")
    text = str(report)
    assert "<h1>My atlas</h1>" in text
    assert "data:image/png;base64," in text
    # the atlas drawn over the mean image (a PNG is there without one too: "Atlas regions")
    assert "Atlas contours over the mean of the first image given to fit" in text
    for name in ("alpha", "beta", "gamma", "delta"):
        assert name in text
    assert "removed by mask_img" in text
    table = masker._region_table()
    counts = np.bincount(np.where(mask.astype(bool), atlas, 0).ravel(), minlength=5)[1:4]
    assert table["voxels"].tolist()[:3] == counts.tolist()
    np.testing.assert_allclose(table["size (mm^3)"][:3], counts * 27.0)
    assert table["status"].iloc[3].startswith("removed by mask_img")
    lost = set(table["column"][table["status"].str.startswith("lost by resampling")].tolist())
    present = np.isfinite(masker.transform_imgs([coarse])[0][0])
    assert lost == set(np.flatnonzero(~present).tolist())
    path = tmp_path / "report.html"
    report.save_as_html(path)
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<iframe" not in page


def test_report_without_images_or_with_reports_off(atlas_img, runs):
    alone = str(LabelsMasker(atlas_img).fit().generate_report())
    assert "No image was given to fit" in alone
    assert "<figcaption>Atlas regions." in alone and "over the mean" not in alone
    off = LabelsMasker(atlas_img, reports=False).fit(runs)
    assert "reports=False at fit" in str(off.generate_report())
    with pytest.raises(ValueError, match="engine='brainsprite' is not supported"):
        off.generate_report(engine="brainsprite")
    with pytest.raises(NotFittedError):
        LabelsMasker(atlas_img).generate_report()


def test_report_source_pickles_as_its_mean_image(atlas_img, runs):
    masker = LabelsMasker(atlas_img).fit(runs)
    restored = pickle.loads(pickle.dumps(masker))
    assert restored._report_source.shape == SHAPE  # the mean, not the 4D run
    np.testing.assert_allclose(
        restored._report_source.get_fdata(), runs[0].get_fdata().mean(axis=3), rtol=1e-5
    )
    assert "Atlas contours over the mean of the first image" in str(restored.generate_report())


def test_report_background_from_a_volume_resource_or_a_missing_file(atlas_img, runs, tmp_path):
    from types import SimpleNamespace

    data = runs[0].get_fdata()  # a kwneuro volume resource: fit takes it, nilearn's plots not
    resource = SimpleNamespace(get_array=lambda: data, get_affine=lambda: AFFINE)
    masker = LabelsMasker(atlas_img).fit([resource])
    assert "Atlas contours over the mean" in str(masker.generate_report())
    restored = pickle.loads(pickle.dumps(masker))
    np.testing.assert_allclose(restored._report_source.get_fdata(), data.mean(axis=3))
    missing = str(tmp_path / "gone_bold.nii.gz")  # fit does not read it; the report does
    with pytest.raises(FileNotFoundError, match=r"report background .* not found: '.*gone_bold"):
        LabelsMasker(atlas_img).fit([missing]).generate_report()


# ------------------------------------------------------------------------- reading .nii.gz
def test_decompression_without_isal_gives_the_same_voxels(run_paths, monkeypatch):
    fast = np.asanyarray(_images.load_image(run_paths[0], writable=False).dataobj)
    monkeypatch.setattr(_images, "_igzip", None)
    plain = _images.load_image(run_paths[0])
    np.testing.assert_array_equal(fast, np.asanyarray(plain.dataobj))
    assert not fast.flags.writeable and np.asanyarray(plain.dataobj).flags.writeable
