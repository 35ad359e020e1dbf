"""fmriprep_cohort on fMRIPrep-shaped folders made here (issue 16 item 3), and the simulated
multi-site fMRI cohort of kwneuro_sk.datasets (item 4)."""

import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from nilearn.interfaces.fmriprep import load_confounds

from kwneuro_sk import fmriprep_cohort
from kwneuro_sk.datasets import make_fmri_cohort

MNI = "MNI152NLin2009cAsym"


def _touch_run(func, stem, spaces=(MNI,), confounds=True, n_scans=5):
    func.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.zeros((2, 2, 2, n_scans), dtype=np.float32), np.eye(4))
    for space in spaces:
        img.to_filename(func / f"{stem}_space-{space}_desc-preproc_bold.nii.gz")
        # other fMRIPrep outputs of the run that are not the run
        img.to_filename(func / f"{stem}_space-{space}_desc-brain_mask.nii.gz")
    (func / f"{stem}_space-{spaces[0]}_boldref.nii.gz").write_bytes(b"")
    if confounds:
        table = pd.DataFrame({"trans_x": np.arange(n_scans, dtype=float)})
        table.to_csv(func / f"{stem}_desc-confounds_timeseries.tsv", sep="\t", index=False)
        (func / f"{stem}_desc-confounds_timeseries.json").write_text("{}")


@pytest.fixture
def dataset(tmp_path):
    """<bids>/participants.tsv (ids without 'sub-') and <bids>/derivatives/fmriprep with
    sessions, two tasks, two runs of one task, two output spaces and a missing confounds file."""
    bids = tmp_path / "bids"
    fmriprep = bids / "derivatives" / "fmriprep"
    for sub in ["01", "02"]:
        for ses in ["a", "b"]:
            func = fmriprep / f"sub-{sub}" / f"ses-{ses}" / "func"
            for run in ["1", "2"]:
                _touch_run(func, f"sub-{sub}_ses-{ses}_task-rest_run-{run}", spaces=(MNI, "T1w"))
            _touch_run(
                func,
                f"sub-{sub}_ses-{ses}_task-nback",
                spaces=(MNI, "T1w"),
                confounds=not (sub == "02" and ses == "b"),
            )
    (fmriprep / "dataset_description.json").write_text(json.dumps({"DatasetType": "derivative"}))
    pd.DataFrame(
        {
            "participant_id": ["01", "02", "03"],
            "age": [31.5, 42.0, 50.0],
            "group": ["control", "patient", "n/a"],
        }
    ).to_csv(bids / "participants.tsv", sep="\t", index=False)
    return fmriprep


def test_runs_confounds_and_participants(dataset):
    table = fmriprep_cohort(dataset, task="rest", space=MNI)
    assert list(table.columns) == [
        "participant_id",
        "session",
        "task",
        "run",
        "space",
        "image",
        "confounds",
        "age",
        "group",
    ]
    assert len(table) == 8  # 2 subjects x 2 sessions x 2 runs; the participant without runs left
    assert table["participant_id"].tolist() == ["sub-01"] * 4 + ["sub-02"] * 4
    assert table["session"].tolist() == ["a", "a", "b", "b"] * 2
    assert table["run"].tolist() == ["1", "2"] * 4
    assert (table["space"] == MNI).all() and (table["task"] == "rest").all()
    for image, confounds in zip(table["image"], table["confounds"]):
        assert image.endswith(f"_space-{MNI}_desc-preproc_bold.nii.gz")
        assert confounds == image.replace(
            f"_space-{MNI}_desc-preproc_bold.nii.gz", "_desc-confounds_timeseries.tsv"
        )
    assert table["age"].tolist() == [31.5] * 4 + [42.0] * 4
    assert table["group"].tolist() == ["control"] * 4 + ["patient"] * 4


def test_several_spaces_need_space_and_a_missing_confounds_file_warns(dataset):
    with pytest.raises(
        ValueError,
        match=r"several preprocessed images, which differ in space .* space "
        r"\['MNI152NLin2009cAsym', 'T1w'\]\); pass space=\.\.\. to choose one\.$",
    ):
        fmriprep_cohort(dataset)
    with pytest.warns(
        UserWarning,
        match=r"1 run\(s\) have no fMRIPrep confounds file .*"
        r"sub-02_ses-b_task-nback",
    ):
        table = fmriprep_cohort(dataset, task="nback", space="T1w")
    assert table["confounds"].isna().tolist() == [False, False, False, True]
    assert "run" not in table.columns


def test_one_space_at_several_resolutions_needs_res(tmp_path):
    """fMRIPrep --output-spaces MNI152NLin2009cAsym:res-1 MNI152NLin2009cAsym:res-2 (and T1w):
    res= chooses like space=, and the error names the entities the images differ in (before:
    'in spaces [MNI, MNI]; pass space=...', which could not choose)."""
    for sub in ["01", "02"]:
        _touch_run(
            tmp_path / f"sub-{sub}" / "func",
            f"sub-{sub}_task-rest",
            spaces=(f"{MNI}_res-1", f"{MNI}_res-2", "T1w"),
        )
    with pytest.raises(
        ValueError,
        match=r"^2 run\(s\) have several preprocessed images, which differ in res \(e\.g\. "
        r"\{'sub': '01', 'task': 'rest'\}: res \['1', '2'\]\); pass res=\.\.\. to choose one\.$",
    ):
        fmriprep_cohort(tmp_path, space=MNI)
    with pytest.raises(
        ValueError,
        match=r"differ in res, space \(e\.g\. .*: res \['1', '2', None\]; space "
        r"\['MNI152NLin2009cAsym', 'MNI152NLin2009cAsym', 'T1w'\]\); pass res=\.\.\. and "
        r"space=\.\.\. to choose one\.$",
    ):
        fmriprep_cohort(tmp_path)
    table = fmriprep_cohort(tmp_path, space=MNI, res="2")
    assert list(table.columns) == ["participant_id", "task", "space", "image", "confounds"]
    assert [Path(p).name for p in table["image"]] == [
        f"sub-{sub}_task-rest_space-{MNI}_res-2_desc-preproc_bold.nii.gz" for sub in ["01", "02"]
    ]
    assert [Path(p).name for p in table["confounds"]] == [
        f"sub-{sub}_task-rest_desc-confounds_timeseries.tsv" for sub in ["01", "02"]
    ]
    assert len(fmriprep_cohort(tmp_path, res="1")) == 2  # T1w has no res: left out
    with pytest.raises(ValueError, match=r"no fMRIPrep run .* task=None, space=.*, res='3'\."):
        fmriprep_cohort(tmp_path, space=MNI, res="3")


def test_images_told_apart_by_an_entity_without_a_parameter_say_so(tmp_path):
    """MNIInfant at two cohorts: no parameter chooses the cohort; the error says so."""
    _touch_run(tmp_path / "sub-01" / "func", "sub-01_task-rest", spaces=("MNIInfant_cohort-1",))
    _touch_run(tmp_path / "sub-01" / "func", "sub-01_task-rest", spaces=("MNIInfant_cohort-2",))
    with pytest.raises(
        ValueError,
        match=r"differ in cohort \(e\.g\. .*: cohort \['1', '2'\]\); fmriprep_cohort has no "
        r"parameter that chooses by cohort: keep one of those images per run in derivatives_dir\.$",
    ):
        fmriprep_cohort(tmp_path, space="MNIInfant")


def test_participants_file_errors(dataset, tmp_path):
    with pytest.raises(FileNotFoundError, match="participants_tsv .*nope.tsv"):
        fmriprep_cohort(dataset, tmp_path / "nope.tsv", task="rest", space=MNI)
    bad = tmp_path / "bad.tsv"
    for content, problem in [(b"", "No columns to parse"), (b"\xff\xfe\x00", "utf-8")]:
        bad.write_bytes(content)  # empty, or not text: pandas' own error named the file not
        with pytest.raises(ValueError, match=rf"participants_tsv '.*bad.tsv' .*{problem}"):
            fmriprep_cohort(dataset, bad, task="rest", space=MNI)
    pd.DataFrame({"subject": ["01"]}).to_csv(bad, sep="\t", index=False)
    with pytest.raises(ValueError, match="has no 'participant_id' column"):
        fmriprep_cohort(dataset, bad, task="rest", space=MNI)
    pd.DataFrame({"participant_id": ["sub-01", "01"]}).to_csv(bad, sep="\t", index=False)
    with pytest.raises(ValueError, match=r"lists participant\(s\) \['sub-01'\] more than once"):
        fmriprep_cohort(dataset, bad, task="rest", space=MNI)
    bad.write_text("participant_id\tage\nsub-01\t30\n\t31\nn/a\t32\n")  # was 'sub-nan'
    with pytest.raises(
        ValueError, match=r"bad.tsv' has no participant_id in row\(s\) \[2, 3\] below"
    ):
        fmriprep_cohort(dataset, bad, task="rest", space=MNI)
    pd.DataFrame({"participant_id": ["sub-01"], "image": ["x"]}).to_csv(bad, sep="\t", index=False)
    with pytest.raises(ValueError, match=r"column\(s\) \['image'\]"):
        fmriprep_cohort(dataset, bad, task="rest", space=MNI)
    pd.DataFrame({"participant_id": ["sub-01"], "age": [3]}).to_csv(bad, sep="\t", index=False)
    with pytest.warns(UserWarning, match=r"1 participant\(s\) .*\['sub-02'\]"):
        table = fmriprep_cohort(dataset, bad, task="rest", space=MNI)
    assert table["age"].isna().tolist() == [False] * 4 + [True] * 4
    with pytest.raises(ValueError, match=r"no fMRIPrep run .* task='motor'"):
        fmriprep_cohort(dataset, task="motor")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        fmriprep_cohort(tmp_path / "missing")


def test_no_participants_file_gives_the_run_columns(tmp_path):
    _touch_run(tmp_path / "sub-7" / "func", "sub-7_task-rest")
    table = fmriprep_cohort(tmp_path)
    assert list(table.columns) == ["participant_id", "task", "space", "image", "confounds"]


# ----------------------------------------------------------------- simulated fMRI cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_fmri_cohort(
        n_subjects=8, n_sites=2, n_volumes=30, data_dir=tmp_path_factory.mktemp("fmri")
    )


def test_fmri_cohort_is_fmriprep_shaped(cohort):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every run has its confounds; every subject is listed
        table = fmriprep_cohort(cohort.path)
    expected = cohort.participants.drop(columns=["image", "confounds"])
    pd.testing.assert_frame_equal(
        table[expected.columns].reset_index(drop=True), expected, check_dtype=False
    )
    assert table["image"].tolist() == cohort.participants["image"].tolist()
    assert table["confounds"].tolist() == cohort.participants["confounds"].tolist()
    img = nib.load(table["image"][0])
    assert img.shape == (14, 10, 10, 30) and img.get_data_dtype() == np.float32
    assert img.header.get_zooms()[3] == cohort.t_r
    atlas = np.asarray(nib.load(cohort.atlas).dataobj)
    assert sorted(np.unique(atlas)) == list(range(13)) and len(cohort.labels) == 12
    # nilearn's fMRIPrep reader takes the tables: every strategy the docs use
    for strategy in [
        ("motion", "wm_csf"),
        ("motion", "high_pass", "wm_csf", "scrub"),
        ("motion", "global_signal"),
    ]:
        confounds, mask = load_confounds(table["image"][0], strategy=strategy, motion="full")
        assert len(confounds) == 30 and not confounds.isna().any().any()


def test_fmri_cohort_is_reused_and_reproducible(cohort, tmp_path, monkeypatch):
    import kwneuro_sk.datasets as datasets

    def no_writing(folder, params):
        pytest.fail("a complete cohort folder was written again")

    with monkeypatch.context() as patched:  # the same path alone would not show a reuse
        patched.setattr(datasets, "_write_fmri_cohort", no_writing)
        again = make_fmri_cohort(
            n_subjects=8, n_sites=2, n_volumes=30, data_dir=Path(cohort.path).parents[1]
        )
    assert again.path == cohort.path
    other = make_fmri_cohort(n_subjects=8, n_sites=2, n_volumes=30, data_dir=tmp_path)
    assert other.path != cohort.path
    for a, b in zip(cohort.participants["image"], other.participants["image"]):
        np.testing.assert_array_equal(nib.load(a).get_fdata(), nib.load(b).get_fdata())
    with pytest.raises(ValueError, match="at least 2 per site"):
        make_fmri_cohort(n_subjects=3, n_sites=2, data_dir=tmp_path)


def test_fmri_cohort_sites_differ_in_noise_and_scale(cohort):
    """Voxel noise (the within-region spread) and intensity differ by site, as documented."""
    atlas = np.asarray(nib.load(cohort.atlas).dataobj)
    spread = {}
    for site, image in zip(cohort.participants["site"], cohort.participants["image"]):
        data = nib.load(image).get_fdata()
        region = data[atlas == 1]  # (64 voxels, 30 volumes)
        spread.setdefault(site, []).append(region.std(axis=0).mean() / region.mean())
    low, high = sorted(np.mean(v) for v in spread.values())
    assert high > 1.5 * low
