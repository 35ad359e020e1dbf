"""LabelsMasker on 4D runs: per-run confounds and sample masks, nilearn's attributes, and the
look-up-table rules (issue 16 and issue 19), checked against nilearn's MultiNiftiLabelsMasker."""

import warnings

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nilearn.maskers import MultiNiftiLabelsMasker

from kwneuro_sk import LabelsMasker

SHAPE = (6, 7, 5)
AFFINE = np.diag([3.0, 3.0, 3.0, 1.0])
N_SCANS = (30, 24, 27)


def _nilearn(atlas_img, **params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MultiNiftiLabelsMasker(atlas_img, **params).fit()


def _nilearn_transform(masker, runs, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return masker.transform_imgs(runs, **kwargs)


@pytest.fixture(scope="module")
def atlas_img():
    rng = np.random.default_rng(1)
    return nib.Nifti1Image(rng.integers(0, 5, SHAPE).astype(np.int16), AFFINE)


@pytest.fixture(scope="module")
def runs(make_runs):
    return make_runs(2, N_SCANS, SHAPE, AFFINE)


@pytest.fixture(scope="module")
def confounds():
    rng = np.random.default_rng(3)
    return [rng.normal(size=(n, 3)) for n in N_SCANS]


@pytest.fixture(scope="module")
def run_paths(runs, tmp_path_factory, save_images):
    return save_images(runs, tmp_path_factory.mktemp("runs"), "_bold.nii.gz")


# ------------------------------------------------------------- per-run inputs vs nilearn
def test_per_run_sample_masks_and_confounds_match_nilearn(atlas_img, runs, confounds):
    masks = [np.arange(0, 30, 2), np.r_[0:10, 15:24], np.ones(27, dtype=bool)]
    masks[2][[3, 4]] = False
    params = dict(detrend=True, standardize="zscore_sample", low_pass=0.2, t_r=1.0)
    ours = LabelsMasker(atlas_img, **params).fit()
    got = ours.transform_imgs(runs, confounds, sample_mask=masks)
    expected = _nilearn_transform(
        _nilearn(atlas_img, **params), runs, confounds=confounds, sample_mask=masks
    )
    assert [g.shape[0] for g in got] == [15, 19, 25]  # each run keeps its own volumes
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-4)  # nilearn cleans in float32


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"detrend": True},
        {"standardize": "zscore_sample"},
        {"high_pass": 0.05, "t_r": 1.0, "clean_args": {"filter": "cosine"}},
        {"low_pass": 0.2, "t_r": 1.0},
    ],
)
def test_a_mask_keeping_few_volumes_matches_nilearn_or_names_the_run(atlas_img, runs, params):
    """One kept volume is enough unless Butterworth filtering fills the removed volumes with a
    spline through the kept ones (scipy's '`x` must contain at least 2 elements' before)."""
    butterworth = "low_pass" in params
    ours = LabelsMasker(atlas_img, **params).fit()
    theirs = _nilearn(atlas_img, **params)
    for kept in ([7], [7, 8], [3, 20]):
        masks = [None, np.array(kept), None]
        if butterworth and len(kept) == 1:
            message = (
                r"run 1 \(.*\): 1 volume\(s\) left after the sample mask; Butterworth "
                r"filtering \(low_pass=0.2\) needs at least 2 \(it fills the removed volumes"
            )
            with pytest.raises(ValueError, match=message):
                ours.transform_imgs(runs, sample_mask=masks)
            continue
        got = ours.transform_imgs(runs, sample_mask=masks)
        expected = _nilearn_transform(theirs, runs, sample_mask=masks)
        assert got[1].shape == (len(kept), 4)
        for g, e in zip(got, expected):
            # nilearn cleans in float32: standardizing two volumes magnifies its rounding
            np.testing.assert_allclose(g, e, rtol=0, atol=1e-3)


def test_one_run_takes_its_mask_and_confounds_alone(atlas_img, runs, confounds):
    masker = LabelsMasker(atlas_img, detrend=True).fit()
    mask = np.arange(5, 30)
    (alone,) = masker.transform_imgs(runs[0], confounds[0], sample_mask=mask)
    (listed,) = masker.transform_imgs([runs[0]], [confounds[0]], sample_mask=[mask])
    np.testing.assert_array_equal(alone, listed)
    assert alone.shape == (25, 4)


def test_confounds_from_a_tsv_path_equal_the_array(atlas_img, runs, confounds, tmp_path):
    tsv = tmp_path / "sub-0_desc-confounds_timeseries.tsv"
    pd.DataFrame(confounds[0], columns=["a", "b", "c"]).to_csv(tsv, sep="\t", index=False)
    masker = LabelsMasker(atlas_img, detrend=True).fit()
    from_path = masker.transform_imgs([runs[0]], [str(tsv)])[0]
    from_array = masker.transform_imgs([runs[0]], [confounds[0]])[0]
    np.testing.assert_allclose(from_path, from_array, rtol=1e-12)


def test_clean_args_nilearn_would_ignore_are_refused_by_name(atlas_img, runs):
    """nilearn.signal.clean drops a key it does not know without a word (a misspelt 'filter'
    would leave the default filter on); butterworth's own options are accepted."""
    message = r"clean_args has key\(s\) \['fitler'\] that nilearn.signal.clean does not take"
    with pytest.raises(ValueError, match=message + r".*it takes \['filter', "):
        LabelsMasker(atlas_img, clean_args={"fitler": "cosine"}).fit()
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match=message):
        LabelsMasker(atlas_img, clean__fitler="cosine").fit()
    masker = LabelsMasker(atlas_img, low_pass=0.1, t_r=2.0).fit()
    masker.set_params(clean_args={"butterworth__ordr": 3})
    with pytest.raises(ValueError, match=r"\['butterworth__ordr'\].*'butterworth__order'"):
        masker.transform_imgs(runs)  # was butterworth's TypeError, from inside nilearn
    order_3 = masker.set_params(clean_args={"butterworth__order": 3}).transform_imgs(runs)
    order_5 = masker.set_params(clean_args=None).transform_imgs(runs)
    assert 1e-6 < np.abs(order_3[0] - order_5[0]).max()


def test_sample_mask_in_clean_args_is_refused_not_applied_to_every_run(atlas_img, runs):
    # refused at fit (scikit-learn validates there) ...
    with pytest.raises(ValueError, match=r"clean_args\['sample_mask'\].*one entry per run"):
        LabelsMasker(atlas_img, clean_args={"sample_mask": np.arange(10)}).fit()
    with pytest.warns(FutureWarning, match="clean__confounds"):
        older_spelling = LabelsMasker(atlas_img, clean__confounds=np.ones((30, 1)))
    with pytest.raises(ValueError, match=r"clean_args\['confounds'\]"):
        older_spelling.fit()
    # ... and at transform_imgs when set on a fitted masker
    masker = LabelsMasker(atlas_img).fit()
    masker.set_params(clean_args={"sample_mask": np.arange(10)})
    with pytest.raises(ValueError, match=r"clean_args\['sample_mask'\].*one entry per run"):
        masker.transform_imgs(runs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sample_mask": [np.arange(31), None, None]}, ValueError, r"run 0 .*index 30.*30 volumes"),
        ({"sample_mask": [None, np.ones(25, bool), None]}, ValueError, r"run 1 .*25 entries.*24"),
        ({"sample_mask": [None, None, [-1, 2]]}, ValueError, r"run 2 .*index -1"),
        ({"sample_mask": [np.arange(3)]}, ValueError, "sample_mask has 1 entries.*3 runs"),
        ({"confounds": [None, np.ones((23, 2)), None]}, ValueError, r"run 1 .*23 rows.*24 volumes"),
        (
            {"confounds": [None, None, "/no/such/confounds.tsv"]},
            FileNotFoundError,
            r"run 2 .*no/such",
        ),
        ({"confounds": np.ones((30, 2))}, ValueError, "one entry per run"),
    ],
)
def test_bad_per_run_input_names_the_run(atlas_img, runs, kwargs, error, match):
    masker = LabelsMasker(atlas_img).fit()
    with pytest.raises(error, match=match):
        masker.transform_imgs(runs, **kwargs)


def test_nan_in_confounds_names_the_run_and_column(atlas_img, runs):
    table = pd.DataFrame(
        {"trans_x": np.ones(24), "trans_x_derivative1": np.r_[np.nan, np.ones(23)]}
    )
    with pytest.raises(ValueError, match=r"run 1 .*'trans_x_derivative1', row 0.*load_confounds"):
        LabelsMasker(atlas_img).fit().transform_imgs(runs, [None, table, None])


def test_empty_imgs_list_is_named(atlas_img):
    with pytest.raises(ValueError, match="imgs_list contains no images"):
        LabelsMasker(atlas_img).fit().transform_imgs([])


def test_nilearn_attributes_have_nilearn_meaning(atlas_img):
    names = ["Background", "a", "b", "c", "d"]
    ours = LabelsMasker(atlas_img, labels=names).fit()
    theirs = _nilearn(atlas_img, labels=names)
    assert ours.n_elements_ == theirs.n_elements_ == 4
    assert ours.labels_ == list(theirs.labels_)
    assert ours.region_ids_ == theirs.region_ids_
    assert ours.region_names_ == {0: "a", 1: "b", 2: "c", 3: "d"}
    assert isinstance(ours.labels_img_, nib.Nifti1Image)


# ------------------------------------------------------------------ look-up tables (issue 19)
def test_lut_with_an_id_listed_twice_is_refused(atlas_img):
    lut = pd.DataFrame({"index": [1, 2, 3, 3, 4], "name": ["a", "b", "c", "c2", "d"]})
    with pytest.raises(ValueError, match=r"label value 3 is listed 2 times.*rows \[2, 3\]"):
        LabelsMasker(atlas_img, labels=lut).fit()


def test_names_made_unique_never_collide(atlas_img):
    masker = LabelsMasker(atlas_img, labels=["left", "left", "left_2", "x"]).fit()
    names = list(masker.get_feature_names_out())
    assert len(set(names)) == 4
    assert names == ["left_1", "left_2_2", "left_2", "x"]


def test_empty_name_cell_uses_the_label_value(atlas_img, tmp_path):
    tsv = tmp_path / "lut.tsv"
    tsv.write_text("index\tname\n1\ta\n2\t\n3\tc\n4\td\n")
    with pytest.warns(UserWarning, match=r"no name .* label values \[2\]"):
        masker = LabelsMasker(atlas_img, labels=str(tsv)).fit()
    assert list(masker.get_feature_names_out()) == ["a", "2", "c", "d"]
    with pytest.warns(UserWarning, match=r"label values \[3\]"):
        masker = LabelsMasker(atlas_img, labels=["a", "b", None, "d"]).fit()
    assert list(masker.get_feature_names_out()) == ["a", "b", "3", "d"]
