"""The kwneuro-sk command line: every command runs, gives the library's numbers, fails clearly."""

import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from kwneuro_sk import CombatHarmonizer, LabelsMasker
from kwneuro_sk.cli import main
from kwneuro_sk.datasets import make_site_features


@pytest.fixture
def features_csv(tmp_path):
    data = make_site_features(n_subjects=60, n_features=6, random_state=1)
    path = tmp_path / "features.csv"
    data.to_csv(path, index=False)
    return path, data


HARMONIZE = ["--batch-col", "site", "--categorical", "sex", "--continuous", "age",
             "--keep", "subject", "diagnosis"]


@pytest.mark.parametrize("command", ["demo", "harmonize", "apply", "extract"])
def test_help_for_each_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: kwneuro-sk {command}" in capsys.readouterr().out


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "kwneuro_sk.cli", "--help"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0
    assert "harmonize" in result.stdout and "extract" in result.stdout


@pytest.mark.parametrize("options, kwargs", [
    ([], {}),
    (["--no-eb"], {"eb": False}),
    (["--non-parametric", "--mean-only"], {"parametric": False, "mean_only": True}),
    (["--ref-batch", "site2"], {"ref_batch": "site2"}),
])
def test_harmonize_gives_the_estimator_numbers(features_csv, tmp_path, options, kwargs):
    path, data = features_csv
    out = tmp_path / "out.csv"
    assert main(["harmonize", str(path), *HARMONIZE, *options, "-o", str(out)]) == 0
    result = pd.read_csv(out)
    assert list(result.columns) == list(data.columns)
    pd.testing.assert_frame_equal(result[["subject", "site", "diagnosis"]],
                                  data[["subject", "site", "diagnosis"]].astype(object),
                                  check_dtype=False)
    combat = CombatHarmonizer("site", ["sex"], ["age"], **kwargs)
    expected = combat.fit_transform(data.drop(columns=["subject", "diagnosis"]))
    features = [c for c in data.columns if c.startswith("feature_")]
    np.testing.assert_allclose(result[features].to_numpy(), expected, rtol=1e-12)


def test_saved_model_applies_to_new_rows(features_csv, tmp_path):
    path, data = features_csv
    train, new = data.iloc[:45], data.iloc[45:]
    train.to_csv(tmp_path / "train.csv", index=False)
    new.to_csv(tmp_path / "new.csv", index=False)
    model = tmp_path / "model.npz"
    assert main(["harmonize", str(tmp_path / "train.csv"), *HARMONIZE, "-o",
                 str(tmp_path / "train_out.csv"), "--save-model", str(model)]) == 0
    assert main(["apply", str(model), str(tmp_path / "new.csv"), "-o",
                 str(tmp_path / "new_out.csv")]) == 0
    result = pd.read_csv(tmp_path / "new_out.csv")
    combat = CombatHarmonizer("site", ["sex"], ["age"]).fit(
        train.drop(columns=["subject", "diagnosis"]))
    expected = combat.transform(new.drop(columns=["subject", "diagnosis"]))
    features = [c for c in data.columns if c.startswith("feature_")]
    np.testing.assert_allclose(result[features].to_numpy(), expected, rtol=1e-12)
    assert list(result["subject"]) == list(new["subject"])


def test_apply_unseen_site(features_csv, tmp_path, capsys):
    path, data = features_csv
    model = tmp_path / "model.npz"
    main(["harmonize", str(path), *HARMONIZE, "-o", str(tmp_path / "o.csv"),
          "--save-model", str(model)])
    new = data.iloc[:6].assign(site="siteNEW")
    new.to_csv(tmp_path / "new.csv", index=False)
    assert main(["apply", str(model), str(tmp_path / "new.csv"), "-o",
                 str(tmp_path / "n.csv")]) == 1
    assert "['siteNEW'] were not seen in fit" in capsys.readouterr().err
    assert main(["apply", str(model), str(tmp_path / "new.csv"), "-o",
                 str(tmp_path / "n.csv"), "--adapt-new-sites"]) == 0
    adapted = pd.read_csv(tmp_path / "n.csv").filter(like="feature_").to_numpy()
    combat = CombatHarmonizer("site", ["sex"], ["age"], unseen_batch="adapt")
    combat.fit(data.drop(columns=["subject", "diagnosis"]))
    expected = combat.transform(new.drop(columns=["subject", "diagnosis"]))
    np.testing.assert_allclose(adapted, expected, rtol=1e-12)


@pytest.mark.parametrize("args, message", [
    (["harmonize", "missing.csv", "--batch-col", "site", "-o", "o.csv"], "no such file"),
    (["harmonize", "{csv}", "--batch-col", "scanner", "-o", "o.csv"],
     "--batch-col 'scanner' is not a column"),
    (["harmonize", "{csv}", "--batch-col", "site", "-o", "o.csv"],
     r"feature column(s) ['subject', 'sex', 'diagnosis'] are not numeric"),
    (["harmonize", "{csv}", *HARMONIZE, "--ref-batch", "site9", "-o", "o.csv"],
     "--ref-batch 'site9' is not among the sites"),
    (["apply", "nomodel.npz", "{csv}", "-o", "o.csv"], "no such model file"),
    (["extract", "--atlas", "atlas.nii.gz", "-o", "o.csv"], "no images"),
    (["demo", "--n-subjects", "1", "--no-figure"],
     "'n_subjects' parameter of run_demo must be an int in the range [2, inf)"),
])
def test_errors_exit_nonzero_with_a_message(features_csv, tmp_path, monkeypatch, capsys,
                                            args, message):
    monkeypatch.chdir(tmp_path)
    path, _ = features_csv
    args = [a.replace("{csv}", str(path)) for a in args]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"kwneuro-sk {args[0]}: error:")
    assert message in err


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["harmonize", "x.csv"])
    assert exit_info.value.code == 2
    assert "--batch-col" in capsys.readouterr().err


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    atlas = np.zeros((8, 9, 7), dtype=np.int16)
    atlas[1:4, 1:5, 1:6] = 1
    atlas[4:7, 2:8, 1:6] = 2
    atlas[1:3, 6:9, 2:5] = 5
    nib.save(nib.Nifti1Image(atlas, affine), tmp_path / "atlas.nii.gz")
    pd.DataFrame({"index": [1, 2, 5], "name": ["left", "right", "top"]}).to_csv(
        tmp_path / "labels.tsv", sep="\t", index=False)
    paths = []
    for i in range(25):
        path = tmp_path / f"sub{i:02d}.nii.gz"
        nib.save(nib.Nifti1Image(rng.normal(i, 1, atlas.shape).astype(np.float32), affine),
                 path)
        paths.append(path.name)
    pd.DataFrame({"subject": range(25), "img": paths, "site": ["a", "b"] * 12 + ["a"]}).to_csv(
        tmp_path / "subjects.csv", index=False)
    return tmp_path


@pytest.mark.parametrize("strategy", ["mean", "median"])
def test_extract_from_csv_equals_the_masker(images, strategy, capsys):
    out = images / "regions.csv"
    assert main(["extract", "--atlas", str(images / "atlas.nii.gz"), "--labels",
                 str(images / "labels.tsv"), "--strategy", strategy, "--from-csv",
                 str(images / "subjects.csv"), "--column", "img", "-o", str(out)]) == 0
    result = pd.read_csv(out)
    assert list(result.columns) == ["subject", "img", "site", "left", "right", "top"]
    masker = LabelsMasker(str(images / "atlas.nii.gz"), strategy=strategy).fit()
    expected = masker.transform([str(images / p) for p in result["img"]])
    np.testing.assert_allclose(result[["left", "right", "top"]].to_numpy(), expected,
                               rtol=1e-6)
    captured = capsys.readouterr()
    assert "25/25 images" in captured.err  # progress bar on 20+ images
    assert "extracted 3 regions" in captured.out


def test_extract_image_arguments(images):
    out = images / "regions.csv"
    paths = [str(images / "sub00.nii.gz"), str(images / "sub01.nii.gz")]
    assert main(["extract", *paths, "--atlas", str(images / "atlas.nii.gz"), "-o",
                 str(out)]) == 0
    result = pd.read_csv(out)
    assert result.shape == (2, 4)
    assert list(result["image"]) == paths


def test_extract_missing_image_named(images, capsys):
    assert main(["extract", str(images / "nope.nii.gz"), "--atlas",
                 str(images / "atlas.nii.gz"), "-o", str(images / "o.csv")]) == 1
    assert "nope.nii.gz" in capsys.readouterr().err


def test_demo_prints_the_table(tmp_path, capsys, demo_data_dir, demo_n_subjects):
    assert main(["demo", "--n-subjects", str(demo_n_subjects), "--data-dir", str(demo_data_dir),
                 "--output-dir", str(tmp_path / "out"), "--no-figure"]) == 0
    out = capsys.readouterr().out
    assert "ComBat inside the pipeline" in out and "site left out" in out
    table = [line for line in out.splitlines() if re.search(r"\d ± \d", line)]
    assert len(table) == 5  # 2 diagnosis metrics x 2 splits, and the site
    assert all(len(line) <= 100 for line in table)
    scores = pd.read_csv(tmp_path / "out" / "demo_scores.csv", index_col=0, header=[0, 1])
    assert list(scores.index) == ["no harmonization", "ComBat inside the pipeline"]
    assert scores.columns.tolist() == [
        ("diagnosis, 5-fold", "ROC AUC"), ("diagnosis, 5-fold", "balanced accuracy"),
        ("diagnosis, site left out", "ROC AUC"), ("diagnosis, site left out", "balanced accuracy"),
        ("site, 5-fold", "balanced accuracy")]
    # every cell is "mean ± sd" of scores between 0 and 1
    means = scores.apply(lambda column: column.str.split(" ± ").str[0].astype(float))
    assert ((means >= 0) & (means <= 1)).all().all()
    # the raw regions tell the sites apart; after ComBat much less so
    site = means[("site, 5-fold", "balanced accuracy")]
    assert site["no harmonization"] > 0.8 and site["ComBat inside the pipeline"] < 0.7
