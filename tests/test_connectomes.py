"""ConnectomeExtractor (issue 16 item 2): numbers against nilearn's MultiNiftiLabelsMasker +
ConnectivityMeasure, the tangent reference fitted on training rows only, leave-site-out
cross-validation through ComBat with a named scorer, the cache across folds and grid
candidates, and bad input naming the run."""

import pickle
import shutil
import warnings

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nilearn.connectome import ConnectivityMeasure, sym_matrix_to_vec
from nilearn.interfaces.fmriprep import load_confounds
from nilearn.maskers import MultiNiftiLabelsMasker
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, LeaveOneGroupOut, cross_validate
from sklearn.pipeline import make_pipeline

from kwneuro_sk import CombatHarmonizer, ConnectomeExtractor, LabelsMasker
from kwneuro_sk.datasets import make_fmri_cohort

STRATEGY = {"strategy": ["motion", "wm_csf"], "motion": "basic"}
SCRUB = {"strategy": ["motion", "high_pass", "scrub"], "motion": "basic", "fd_threshold": 0.3}
KINDS = ["correlation", "partial correlation", "tangent", "covariance", "precision"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_fmri_cohort(
        n_subjects=12, n_sites=3, n_volumes=40, data_dir=tmp_path_factory.mktemp("fmri")
    )


@pytest.fixture(scope="module")
def table(cohort):
    return cohort.participants[["image", "confounds", "site", "age", "sex"]]


def _masker(cohort, **params):
    return LabelsMasker(cohort.atlas, labels=cohort.labels, standardize="zscore_sample", **params)


def _nilearn_series(cohort, images, confounds=None, sample_mask=None):
    masker = MultiNiftiLabelsMasker(cohort.atlas, standardize="zscore_sample")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masker.fit()
        return masker.transform_imgs(images, confounds=confounds, sample_mask=sample_mask)


def _strategy_inputs(images, strategy):
    tables, masks = zip(*(load_confounds(img, **strategy) for img in images))
    return list(tables), list(masks)


@pytest.fixture(scope="module")
def scrubbed(table):
    """Each run's confounds and sample mask from the SCRUB strategy, read once."""
    return _strategy_inputs(table["image"].tolist(), SCRUB)


@pytest.fixture(scope="module")
def nilearn_scrubbed_series(cohort, table, scrubbed):
    return _nilearn_series(cohort, table["image"].tolist(), *scrubbed)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_equals_nilearn_with_each_runs_confounds_and_mask(
    cohort, table, scrubbed, nilearn_scrubbed_series, kind
):
    confounds, masks = scrubbed
    assert any(m is not None and len(m) < 40 for m in masks)  # some volumes are scrubbed
    extractor = ConnectomeExtractor(
        _masker(cohort), kind=kind, confounds_col="conf", sample_mask_col="scrub"
    )
    ours = extractor.fit_transform(table.assign(conf=confounds, scrub=masks))
    series = nilearn_scrubbed_series
    assert [s.shape[0] for s in series] == [40 if m is None else len(m) for m in masks]
    reference = ConnectivityMeasure(kind=kind, vectorize=True, discard_diagonal=True)
    expected = reference.fit_transform(series)
    assert ours.shape == (12, 66) and ours.dtype == np.float64
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)  # float32 series in nilearn


def test_columns_of_a_dataframe_equal_the_strategy(cohort, table, scrubbed):
    """confounds_col / sample_mask_col with the same tables and masks give the same numbers."""
    confounds, masks = scrubbed
    by_columns = table.assign(conf=confounds, scrub=masks)
    ours = ConnectomeExtractor(
        _masker(cohort), confounds_col="conf", sample_mask_col="scrub"
    ).fit_transform(by_columns)
    by_strategy = ConnectomeExtractor(_masker(cohort), confounds_strategy=SCRUB).fit_transform(
        table
    )
    np.testing.assert_array_equal(ours, by_strategy)


def test_feature_names_name_both_regions_in_nilearn_vector_order(cohort, table):
    extractor = ConnectomeExtractor(_masker(cohort), discard_diagonal=False).fit(table.head(3))
    names = extractor.get_feature_names_out()
    n = len(cohort.labels)
    # entry (i, j) of a symmetric matrix holds the code of its pair of regions
    rows, cols = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    codes = (100 * np.minimum(rows, cols) + np.maximum(rows, cols)).astype(float)
    vector = sym_matrix_to_vec(codes, discard_diagonal=True)
    expected = [f"{cohort.labels[int(c) // 100]}--{cohort.labels[int(c) % 100]}" for c in vector]
    off_diagonal = ConnectomeExtractor(_masker(cohort)).fit(table.head(3))
    assert off_diagonal.get_feature_names_out().tolist() == expected
    assert expected[:3] == ["default 1--default 2", "default 1--default 3", "default 2--default 3"]
    assert len(names) == n * (n + 1) // 2 and names[0] == "default 1--default 1"
    assert names[1:3].tolist() == ["default 1--default 2", "default 2--default 2"]
    assert list(off_diagonal.region_names_) == cohort.labels


def test_tangent_reference_is_fitted_on_the_training_rows_only(cohort, table):
    train, test = table.iloc[:8], table.iloc[8:]
    extractor = ConnectomeExtractor(_masker(cohort), kind="tangent", confounds_col="confounds")
    extractor.fit(train.assign(confounds=[load_confounds(i, **STRATEGY)[0] for i in train.image]))
    train_series = _nilearn_series(
        cohort, train["image"].tolist(), _strategy_inputs(train["image"].tolist(), STRATEGY)[0]
    )
    reference = ConnectivityMeasure(kind="tangent", vectorize=True, discard_diagonal=True)
    reference.fit(train_series)
    np.testing.assert_allclose(extractor.connectivity_measure_.mean_, reference.mean_, atol=1e-5)
    all_series = _nilearn_series(
        cohort, table["image"].tolist(), _strategy_inputs(table["image"].tolist(), STRATEGY)[0]
    )
    everyone = ConnectivityMeasure(kind="tangent").fit(all_series).mean_
    assert np.abs(everyone - reference.mean_).max() > 1e-3  # the test rows would change it
    test_in = test.assign(confounds=[load_confounds(i, **STRATEGY)[0] for i in test.image])
    np.testing.assert_allclose(
        extractor.transform(test_in),
        reference.transform(all_series[8:]),
        rtol=1e-4,
        atol=1e-5,
    )


def test_passthrough_combat_and_leave_site_out_with_a_named_scorer(cohort, table):
    """The issue's pipeline, with no glue: the site column rides beside the connectomes."""
    X = table.drop(columns="confounds")
    y = (cohort.participants["diagnosis"] == "patient").astype(int)
    extractor = ConnectomeExtractor(
        _masker(cohort), kind="tangent", confounds_strategy=STRATEGY, remainder="passthrough"
    )
    out = clone(extractor).fit_transform(X)
    assert isinstance(out, pd.DataFrame)
    assert list(out.columns[-3:]) == ["site", "age", "sex"]
    assert out.index.equals(X.index) and out["site"].tolist() == X["site"].tolist()
    pipeline = make_pipeline(
        extractor,
        CombatHarmonizer(
            batch_col="site",
            categorical_cols=["sex"],
            continuous_cols=["age"],
            unseen_batch="adapt",
        ),
        LogisticRegression(max_iter=500),
    )
    scores = cross_validate(
        pipeline,
        X,
        y,
        groups=X["site"],
        cv=LeaveOneGroupOut(),
        scoring="roc_auc",
        error_score="raise",
    )
    assert scores["test_score"].shape == (3,)
    assert np.all((scores["test_score"] >= 0) & (scores["test_score"] <= 1))
    # a fold's ComBat saw only the training sites
    fitted = clone(pipeline).fit(X[X.site != "site1"], y[X.site != "site1"])
    assert list(fitted[1].batches_) == ["site2", "site3"]


def test_masker_is_cloned_and_its_parameters_are_searchable(cohort, table):
    masker = _masker(cohort, t_r=cohort.t_r)
    extractor = ConnectomeExtractor(masker, confounds_col="confounds")
    assert extractor.get_params()["masker__low_pass"] is None
    X = table.assign(confounds=[load_confounds(i, **STRATEGY)[0] for i in table.image])
    plain = extractor.fit_transform(X)
    assert extractor.masker_ is not masker and not hasattr(masker, "labels_img_")
    filtered = clone(extractor).set_params(masker__low_pass=0.1).fit_transform(X)
    assert np.abs(filtered - plain).max() > 0.05
    assert extractor.fit(X).masker_.low_pass is None


def test_list_of_runs_and_set_output(cohort, table):
    images = table["image"].tolist()
    extractor = ConnectomeExtractor(_masker(cohort)).fit(images)
    assert extractor.n_features_in_ == 1 and not hasattr(extractor, "feature_names_in_")
    expected = ConnectivityMeasure(kind="correlation", vectorize=True, discard_diagonal=True)
    np.testing.assert_allclose(
        extractor.transform(images),
        expected.fit_transform(_nilearn_series(cohort, images)),
        rtol=1e-4,
        atol=1e-5,
    )
    frame = clone(extractor).set_output(transform="pandas").fit_transform(table[["image"]])
    assert list(frame.columns) == extractor.get_feature_names_out().tolist()
    restored = pickle.loads(pickle.dumps(extractor))
    np.testing.assert_array_equal(restored.transform(images[:2]), extractor.transform(images[:2]))


def _count_runs(monkeypatch):
    """Count the runs LabelsMasker.transform_imgs extracts (patched on the class: clones too)."""
    counts = []
    original = LabelsMasker.transform_imgs

    def counting(self, imgs_list, *args, **kwargs):
        counts.extend(str(i) for i in imgs_list)
        return original(self, imgs_list, *args, **kwargs)

    monkeypatch.setattr(LabelsMasker, "transform_imgs", counting)
    return counts


def test_grid_search_extracts_each_run_once_per_strategy_with_memory(
    cohort, table, tmp_path, monkeypatch
):
    X = table.drop(columns="confounds")
    y = (cohort.participants["diagnosis"] == "patient").astype(int)
    strategies = [STRATEGY, SCRUB]
    grid = {"connectomeextractor__confounds_strategy": strategies}

    def search(memory):
        pipeline = make_pipeline(
            ConnectomeExtractor(_masker(cohort), confounds_strategy=STRATEGY, memory=memory),
            LogisticRegression(max_iter=200),
        )
        return GridSearchCV(pipeline, grid, cv=LeaveOneGroupOut()).fit(X, y, groups=X["site"])

    counts = _count_runs(monkeypatch)
    cached = search(tmp_path / "cache")
    per_run = pd.Series(counts).value_counts()
    assert set(per_run.index) == set(X["image"])
    assert (per_run == len(strategies)).all()  # 3 folds + the refit: read once per strategy
    counts.clear()
    uncached = search(None)
    assert (pd.Series(counts).value_counts() > 2 * len(strategies)).all()
    assert cached.best_params_ == uncached.best_params_
    np.testing.assert_array_equal(cached.predict_proba(X), uncached.predict_proba(X))


def test_memory_caches_the_fitted_measure_on_the_training_runs(
    cohort, table, tmp_path, monkeypatch
):
    """With memory, a refit on the same runs computes neither series nor the tangent
    reference; other training rows or another kind refit; numbers equal an uncached fit."""
    X = table.drop(columns="confounds")
    fits = []
    original = ConnectivityMeasure.fit_transform

    def counting(self, *args, **kwargs):
        fits.append(self.kind)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ConnectivityMeasure, "fit_transform", counting)

    def extractor(**params):
        options = {"kind": "tangent", "confounds_strategy": STRATEGY, **params}
        return ConnectomeExtractor(_masker(cohort), memory=tmp_path / "cache", **options)

    first = extractor().fit_transform(X)
    counts = _count_runs(monkeypatch)
    again = extractor().fit(X)
    assert fits == ["tangent"] and counts == []  # nothing extracted or fitted again
    np.testing.assert_allclose(again.transform(X), first, rtol=1e-10, atol=1e-12)
    reference = ConnectomeExtractor(_masker(cohort), kind="tangent", confounds_strategy=STRATEGY)
    np.testing.assert_allclose(
        again.connectivity_measure_.mean_, reference.fit(X).connectivity_measure_.mean_
    )
    extractor().fit(X.iloc[:-1])
    extractor(kind="correlation").fit(X)
    assert fits == ["tangent", "tangent", "tangent", "correlation"]  # reference, rows, kind


def test_cache_misses_when_a_confounds_file_is_rewritten(cohort, tmp_path, monkeypatch):
    folder = tmp_path / "func"
    shutil.copytree(cohort.path + "/sub-001/func", folder)
    image = str(next(folder.glob("*_bold.nii.gz")))
    tsv = next(folder.glob("*_timeseries.tsv"))
    extractor = ConnectomeExtractor(
        _masker(cohort), confounds_strategy=STRATEGY, memory=tmp_path / "cache"
    )
    counts = _count_runs(monkeypatch)
    first = clone(extractor).fit_transform([image])
    again = clone(extractor).fit_transform([image])
    assert len(counts) == 1 and np.array_equal(first, again)
    confounds = pd.read_csv(tsv, sep="\t")
    confounds["white_matter"] = confounds["white_matter"][::-1].to_numpy()
    confounds.to_csv(tsv, sep="\t", index=False, na_rep="n/a")
    rewritten = clone(extractor).fit_transform([image])
    assert len(counts) == 2 and not np.allclose(first, rewritten)


# ------------------------------------------------------------------------------ bad input


@pytest.fixture(params=[None, "memory"])
def memory(request, tmp_path):
    return None if request.param is None else tmp_path / "cache"


def test_confounds_of_the_wrong_length_name_the_run(cohort, table, memory):
    X = table.assign(confounds=[np.zeros((40, 2))] * 11 + [np.ones((39, 2))])
    extractor = ConnectomeExtractor(_masker(cohort), confounds_col="confounds", memory=memory)
    with pytest.raises(ValueError, match=r"sub-012_task-rest.*39 rows but the run has 40"):
        extractor.fit(X)


@pytest.mark.parametrize(
    "mask, message",
    [
        (np.arange(35, 41), r"volume index 40 but the run has 40 volumes"),
        (np.ones(41, dtype=bool), r"boolean mask of 41 entries but the run has 40 volumes"),
    ],
)
def test_sample_masks_beyond_the_run_name_it(cohort, table, memory, mask, message):
    X = table.assign(scrub=[None] * 5 + [mask] + [None] * 6)
    extractor = ConnectomeExtractor(_masker(cohort), sample_mask_col="scrub", memory=memory)
    with pytest.raises(ValueError, match=r"sub-006_task-rest.*" + message):
        extractor.fit(X)


def test_a_run_left_with_one_volume_is_refused_naming_it(cohort, table, memory):
    """The correlation of one time point is undefined: nilearn's measure gives the run's
    connections as NaN; the extractor names the run, at fit and at transform."""
    X = table.assign(scrub=[None] * 3 + [np.array([7])] + [None] * 8)
    extractor = ConnectomeExtractor(_masker(cohort), sample_mask_col="scrub", memory=memory)
    message = r"sub-004_task-rest.*1 volume\(s\) left after the sample mask.*at least 2"
    with pytest.raises(ValueError, match=message):
        extractor.fit(X)
    extractor.fit(X.assign(scrub=None))
    with pytest.raises(ValueError, match=message):
        extractor.transform(X)
    two = extractor.transform(X.assign(scrub=[None] * 3 + [np.array([7, 9])] + [None] * 8))
    assert np.isfinite(two).all()


def test_missing_confounds_files_name_the_run(cohort, table, tmp_path, memory):
    paths = []
    for i, image in enumerate(table["image"]):
        paths.append(tmp_path / f"sub-{i + 1:03d}_confounds.tsv")
        load_confounds(image, **STRATEGY)[0].to_csv(paths[-1], sep="\t", index=False)
    paths[2].unlink()
    X = table.assign(confounds=[str(p) for p in paths])
    extractor = ConnectomeExtractor(_masker(cohort), confounds_col="confounds", memory=memory)
    with pytest.raises(
        FileNotFoundError,
        match=r"confounds file of row 2 \('.*sub-003_task-rest.* not found: '.*sub-003_conf",
    ):
        extractor.fit(X)
    alone = tmp_path / "sub-001_task-rest_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz"
    shutil.copy(table["image"][0], alone)
    extractor = ConnectomeExtractor(_masker(cohort), confounds_strategy=STRATEGY, memory=memory)
    with pytest.raises(FileNotFoundError, match=r"no fMRIPrep confounds file .* beside row 1 "):
        extractor.fit([table["image"][1], str(alone)])


def test_bad_options_and_columns_are_refused(cohort, table):
    masker = _masker(cohort)
    with pytest.raises(ValueError, match="confounds_strategy and confounds_col='confounds'"):
        ConnectomeExtractor(masker, confounds_col="confounds", confounds_strategy=STRATEGY).fit(
            table
        )
    with pytest.raises(ValueError, match=r"key\(s\) \['stratgy'\]"):
        ConnectomeExtractor(masker, confounds_strategy={"stratgy": ["motion"]}).fit(table)
    with pytest.raises(ValueError, match=r"confounds_strategy on row 0 .*"):
        ConnectomeExtractor(masker, confounds_strategy={"strategy": ["compcor"]}).fit(table)
    with pytest.raises(ValueError, match="X has no column 'bold'"):
        ConnectomeExtractor(masker, image_col="bold").fit(table)
    with pytest.raises(
        ValueError, match="confounds_col='confounds' names a column, but X is a list"
    ):
        ConnectomeExtractor(masker, confounds_col="confounds").fit(table["image"].tolist())
    with pytest.raises(ValueError, match="not a file path"):
        ConnectomeExtractor(masker, confounds_strategy=STRATEGY).fit([nib.load(table["image"][0])])
    fitted = ConnectomeExtractor(masker, remainder="passthrough").fit(table.head(3))
    with pytest.raises(
        ValueError, match=r"other columns \['confounds', 'site', 'age'\] but the extractor"
    ):
        fitted.transform(table.head(3).drop(columns="sex"))
    with pytest.raises(ValueError, match="kind"):
        ConnectomeExtractor(masker, kind="coherence").fit(table)


def test_nilearn_masker_works_as_the_masker(cohort, table, scrubbed, tmp_path):
    """Any masker with nilearn's transform_imgs: MultiNiftiLabelsMasker gives our numbers."""
    confounds, masks = scrubbed
    X = table.assign(conf=confounds, scrub=masks)
    ours = ConnectomeExtractor(
        _masker(cohort), confounds_col="conf", sample_mask_col="scrub"
    ).fit_transform(X)
    nilearn_masker = MultiNiftiLabelsMasker(cohort.atlas, standardize="zscore_sample")
    for memory in [None, tmp_path / "cache"]:
        extractor = ConnectomeExtractor(
            nilearn_masker, confounds_col="conf", sample_mask_col="scrub", memory=memory
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = extractor.fit_transform(X)
        np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-5)
        assert extractor.get_feature_names_out().shape == (66,)


def test_empty_cells_mean_no_confounds_and_no_mask(cohort, table):
    X = table.head(3).drop(columns="confounds")
    plain = ConnectomeExtractor(_masker(cohort)).fit_transform(X)
    empty = X.assign(conf=[None, np.nan, pd.NA], scrub=[pd.NA, None, np.nan])
    extractor = ConnectomeExtractor(_masker(cohort), confounds_col="conf", sample_mask_col="scrub")
    np.testing.assert_array_equal(extractor.fit_transform(empty), plain)


def test_tangent_fit_on_one_run_is_refused_before_extraction():
    atlas = np.zeros((3, 2, 2), dtype=np.int16)
    atlas[0], atlas[1], atlas[2] = 1, 2, 3
    run = nib.Nifti1Image(np.random.default_rng(0).normal(size=(3, 2, 2, 20)), np.eye(4))
    extractor = ConnectomeExtractor(LabelsMasker(nib.Nifti1Image(atlas, np.eye(4))), kind="tangent")
    with pytest.raises(ValueError, match="at least 2 runs, got 1"):
        extractor.fit([run])
