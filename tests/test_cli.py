"""The kwneuro-sk command line: every command runs, gives the library's numbers, fails clearly."""

import os
import re
import stat
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


HARMONIZE = [
    "--batch-col",
    "site",
    "--categorical",
    "sex",
    "--continuous",
    "age",
    "--keep",
    "subject",
    "diagnosis",
]


@pytest.mark.parametrize("command", ["demo", "harmonize", "apply", "extract"])
def test_help_for_each_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: kwneuro-sk {command}" in capsys.readouterr().out


def test_console_script_is_installed():
    result = subprocess.run(
        [sys.executable, "-m", "kwneuro_sk.cli", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    assert "harmonize" in result.stdout and "extract" in result.stdout


@pytest.mark.parametrize(
    "options, kwargs",
    [
        ([], {}),
        (["--no-eb"], {"eb": False}),
        (["--non-parametric", "--mean-only"], {"parametric": False, "mean_only": True}),
        (["--ref-batch", "site2"], {"ref_batch": "site2"}),
    ],
)
def test_harmonize_gives_the_estimator_numbers(features_csv, tmp_path, options, kwargs):
    path, data = features_csv
    out = tmp_path / "out.csv"
    assert main(["harmonize", str(path), *HARMONIZE, *options, "-o", str(out)]) == 0
    result = pd.read_csv(out)
    assert list(result.columns) == list(data.columns)
    pd.testing.assert_frame_equal(
        result[["subject", "site", "diagnosis"]],
        data[["subject", "site", "diagnosis"]].astype(object),
        check_dtype=False,
    )
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
    assert (
        main(
            [
                "harmonize",
                str(tmp_path / "train.csv"),
                *HARMONIZE,
                "-o",
                str(tmp_path / "train_out.csv"),
                "--save-model",
                str(model),
            ]
        )
        == 0
    )
    assert (
        main(["apply", str(model), str(tmp_path / "new.csv"), "-o", str(tmp_path / "new_out.csv")])
        == 0
    )
    result = pd.read_csv(tmp_path / "new_out.csv")
    combat = CombatHarmonizer("site", ["sex"], ["age"]).fit(
        train.drop(columns=["subject", "diagnosis"])
    )
    expected = combat.transform(new.drop(columns=["subject", "diagnosis"]))
    features = [c for c in data.columns if c.startswith("feature_")]
    np.testing.assert_allclose(result[features].to_numpy(), expected, rtol=1e-12)
    assert list(result["subject"]) == list(new["subject"])


def test_apply_unseen_site(features_csv, tmp_path, capsys):
    path, data = features_csv
    model = tmp_path / "model.npz"
    main(
        [
            "harmonize",
            str(path),
            *HARMONIZE,
            "-o",
            str(tmp_path / "o.csv"),
            "--save-model",
            str(model),
        ]
    )
    new = data.iloc[:6].assign(site="siteNEW")
    new.to_csv(tmp_path / "new.csv", index=False)
    assert (
        main(["apply", str(model), str(tmp_path / "new.csv"), "-o", str(tmp_path / "n.csv")]) == 1
    )
    assert "['siteNEW'] were not seen in fit" in capsys.readouterr().err
    assert (
        main(
            [
                "apply",
                str(model),
                str(tmp_path / "new.csv"),
                "-o",
                str(tmp_path / "n.csv"),
                "--adapt-new-sites",
            ]
        )
        == 0
    )
    adapted = pd.read_csv(tmp_path / "n.csv").filter(like="feature_").to_numpy()
    combat = CombatHarmonizer("site", ["sex"], ["age"], unseen_batch="adapt")
    combat.fit(data.drop(columns=["subject", "diagnosis"]))
    expected = combat.transform(new.drop(columns=["subject", "diagnosis"]))
    np.testing.assert_allclose(adapted, expected, rtol=1e-12)


@pytest.mark.parametrize(
    "args, message",
    [
        (["harmonize", "missing.csv", "--batch-col", "site", "-o", "o.csv"], "no such file"),
        (
            ["harmonize", "{csv}", "--batch-col", "scanner", "-o", "o.csv"],
            "--batch-col 'scanner' is not a column",
        ),
        (
            ["harmonize", "{csv}", "--batch-col", "site", "-o", "o.csv"],
            r"feature column(s) ['subject', 'sex', 'diagnosis'] are not numeric",
        ),
        (
            ["harmonize", "{csv}", *HARMONIZE, "--ref-batch", "site9", "-o", "o.csv"],
            "--ref-batch 'site9' is not among the sites",
        ),
        (
            ["harmonize", "{csv}", *HARMONIZE, "--subject", "site", "-o", "o.csv"],
            "column 'site' is given to both --batch-col and --subject; give each column one role",
        ),
        (
            ["summarize", "{csv}", *HARMONIZE, "--smooth", "age", "-o", "s.npz"],
            "column 'age' is given to both --continuous and --smooth",
        ),
        (["apply", "nomodel.npz", "{csv}", "-o", "o.csv"], "no such model file"),
        (["extract", "--atlas", "atlas.nii.gz", "-o", "o.csv"], "no images"),
        (
            ["demo", "--n-subjects", "1", "--no-figure"],
            "'n_subjects' parameter of run_demo must be an int in the range [2, inf)",
        ),
    ],
)
def test_errors_exit_nonzero_with_a_message(
    features_csv, tmp_path, monkeypatch, capsys, args, message
):
    monkeypatch.chdir(tmp_path)
    path, _ = features_csv
    args = [a.replace("{csv}", str(path)) for a in args]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"kwneuro-sk {args[0]}: error:")
    assert message in err
    assert not (tmp_path / "o.csv").exists() and not (tmp_path / "s.npz").exists()


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
        tmp_path / "labels.tsv", sep="\t", index=False
    )
    paths = []
    for i in range(25):
        path = tmp_path / f"sub{i:02d}.nii.gz"
        nib.save(nib.Nifti1Image(rng.normal(i, 1, atlas.shape).astype(np.float32), affine), path)
        paths.append(path.name)
    pd.DataFrame({"subject": range(25), "img": paths, "site": ["a", "b"] * 12 + ["a"]}).to_csv(
        tmp_path / "subjects.csv", index=False
    )
    return tmp_path


@pytest.mark.parametrize("strategy", ["mean", "median"])
def test_extract_from_csv_equals_the_masker(images, strategy, capsys):
    out = images / "regions.csv"
    assert (
        main(
            [
                "extract",
                "--atlas",
                str(images / "atlas.nii.gz"),
                "--labels",
                str(images / "labels.tsv"),
                "--strategy",
                strategy,
                "--from-csv",
                str(images / "subjects.csv"),
                "--column",
                "img",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    result = pd.read_csv(out)
    assert list(result.columns) == ["subject", "img", "site", "left", "right", "top"]
    masker = LabelsMasker(str(images / "atlas.nii.gz"), strategy=strategy).fit()
    expected = masker.transform([str(images / p) for p in result["img"]])
    np.testing.assert_allclose(result[["left", "right", "top"]].to_numpy(), expected, rtol=1e-6)
    captured = capsys.readouterr()
    assert "25/25 images" in captured.err  # progress bar on 20+ images
    assert "extracted 3 regions" in captured.out


def test_extract_image_arguments(images):
    out = images / "regions.csv"
    paths = [str(images / "sub00.nii.gz"), str(images / "sub01.nii.gz")]
    assert main(["extract", *paths, "--atlas", str(images / "atlas.nii.gz"), "-o", str(out)]) == 0
    result = pd.read_csv(out)
    assert result.shape == (2, 4)
    assert list(result["image"]) == paths


def test_extract_missing_image_named(images, capsys):
    assert (
        main(
            [
                "extract",
                str(images / "nope.nii.gz"),
                "--atlas",
                str(images / "atlas.nii.gz"),
                "-o",
                str(images / "o.csv"),
            ]
        )
        == 1
    )
    assert "nope.nii.gz" in capsys.readouterr().err


def test_demo_prints_the_table(tmp_path, capsys, demo_data_dir, demo_n_subjects):
    assert (
        main(
            [
                "demo",
                "--n-subjects",
                str(demo_n_subjects),
                "--data-dir",
                str(demo_data_dir),
                "--output-dir",
                str(tmp_path / "out"),
                "--no-figure",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "ComBat inside the pipeline" in out and "site left out" in out
    table = [line for line in out.splitlines() if re.search(r"\d ± \d", line)]
    assert len(table) == 5  # 2 diagnosis metrics x 2 splits, and the site
    assert all(len(line) <= 100 for line in table)
    scores = pd.read_csv(tmp_path / "out" / "demo_scores.csv", index_col=0, header=[0, 1])
    assert list(scores.index) == ["no harmonization", "ComBat inside the pipeline"]
    assert scores.columns.tolist() == [
        ("diagnosis, 5-fold", "ROC AUC"),
        ("diagnosis, 5-fold", "balanced accuracy"),
        ("diagnosis, site left out", "ROC AUC"),
        ("diagnosis, site left out", "balanced accuracy"),
        ("site, 5-fold", "balanced accuracy"),
    ]
    # every cell is "mean ± sd" of scores between 0 and 1
    means = scores.apply(lambda column: column.str.split(" ± ").str[0].astype(float))
    assert ((means >= 0) & (means <= 1)).all().all()
    # the raw regions tell the sites apart; after ComBat much less so
    site = means[("site, 5-fold", "balanced accuracy")]
    assert site["no harmonization"] > 0.8 and site["ComBat inside the pipeline"] < 0.7


# --------------------------------------------------------------------------------------------
# issue 11: verbatim text columns, inputs never overwritten, atomic outputs, one-line errors
# --------------------------------------------------------------------------------------------


@pytest.fixture
def text_table(tmp_path):
    """A table whose non-feature cells change if parsed: zero-padded IDs, 'NA', '1.50'."""
    data = make_site_features(n_subjects=30, n_features=4, random_state=2)
    data["subject"] = [f"{i:03d}" for i in range(30)]
    data["note"] = ["NA", "01", "", "1.50", "n/a"] * 6
    return data


@pytest.mark.parametrize("suffix, sep", [(".csv", ","), (".tsv", "\t"), (".tab", "\t")])
def test_harmonize_keeps_text_columns_verbatim(tmp_path, text_table, suffix, sep):
    path = tmp_path / f"in{suffix}"
    text_table.to_csv(path, index=False, sep=sep)
    out = tmp_path / f"out{suffix}"
    assert main(["harmonize", str(path), *HARMONIZE, "note", "-o", str(out)]) == 0
    lines_in = path.read_text().splitlines()
    lines_out = out.read_text().splitlines()
    assert lines_out[0] == lines_in[0]  # same header, same separator
    header = lines_in[0].split(sep)
    for line_in, line_out in zip(lines_in[1:], lines_out[1:]):
        cells_in, cells_out = line_in.split(sep), line_out.split(sep)
        for column in ("subject", "note", "site", "sex", "age", "diagnosis"):
            i = header.index(column)
            assert cells_out[i] == cells_in[i], column
    result = pd.read_csv(out, sep=sep, dtype=str, keep_default_na=False)
    assert result["subject"].tolist()[:3] == ["000", "001", "002"]
    assert result["note"].tolist()[:5] == ["NA", "01", "", "1.50", "n/a"]
    features = [c for c in text_table.columns if c.startswith("feature_")]
    expected = CombatHarmonizer("site", ["sex"], ["age"]).fit_transform(
        text_table.drop(columns=["subject", "diagnosis", "note"])
    )
    np.testing.assert_allclose(result[features].astype(float), expected, rtol=1e-12)


def test_extract_from_csv_keeps_other_columns_verbatim(images):
    table = images / "ids.csv"
    table.write_text("id,img,group\n007,sub00.nii.gz,NA\n01,sub01.nii.gz,1.50\n")
    out = images / "regions.csv"
    assert (
        main(
            [
                "extract",
                "--atlas",
                str(images / "atlas.nii.gz"),
                "--from-csv",
                str(table),
                "--column",
                "img",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    lines = out.read_text().splitlines()
    assert lines[0].startswith("id,img,group,")
    assert lines[1].startswith("007,sub00.nii.gz,NA,")
    assert lines[2].startswith("01,sub01.nii.gz,1.50,")


def _cli_error(capsys, args):
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "make_args, clobbered",
    [
        (lambda d: ["harmonize", str(d / "f.csv"), *HARMONIZE, "-o", str(d / "f.csv")], "f.csv"),
        (
            lambda d: [
                "harmonize",
                str(d / "f.csv"),
                *HARMONIZE,
                "-o",
                str(d / "sub" / ".." / "f.csv"),
            ],
            "f.csv",
        ),
        (lambda d: ["harmonize", str(d / "f.csv"), *HARMONIZE, "-o", str(d / "link.csv")], "f.csv"),
        (
            lambda d: [
                "harmonize",
                str(d / "f.csv"),
                *HARMONIZE,
                "-o",
                str(d / "o.csv"),
                "--save-model",
                str(d / "f.csv"),
            ],
            "f.csv",
        ),
        (lambda d: ["apply", str(d / "m.npz"), str(d / "f.csv"), "-o", str(d / "m.npz")], "m.npz"),
        (lambda d: ["apply", str(d / "m.npz"), str(d / "f.csv"), "-o", str(d / "f.csv")], "f.csv"),
        (
            lambda d: [
                "extract",
                str(d / "sub00.nii.gz"),
                "--atlas",
                str(d / "atlas.nii.gz"),
                "-o",
                str(d / "atlas.nii.gz"),
            ],
            "atlas.nii.gz",
        ),
        (
            lambda d: [
                "extract",
                str(d / "sub00.nii.gz"),
                "--atlas",
                str(d / "atlas.nii.gz"),
                "--labels",
                str(d / "labels.tsv"),
                "-o",
                str(d / "labels.tsv"),
            ],
            "labels.tsv",
        ),
        (
            lambda d: [
                "extract",
                "--atlas",
                str(d / "atlas.nii.gz"),
                "--from-csv",
                str(d / "subjects.csv"),
                "--column",
                "img",
                "-o",
                str(d / "subjects.csv"),
            ],
            "subjects.csv",
        ),
        (
            lambda d: [
                "extract",
                str(d / "sub00.nii.gz"),
                "--atlas",
                str(d / "atlas.nii.gz"),
                "-o",
                str(d / "sub00.nii.gz"),
            ],
            "sub00.nii.gz",
        ),
    ],
)
def test_output_equal_to_an_input_refused(images, features_csv, capsys, make_args, clobbered):
    d = images
    _, data = features_csv
    data.to_csv(d / "f.csv", index=False)
    (d / "sub").mkdir()
    (d / "link.csv").symlink_to(d / "f.csv")
    assert (
        main(
            [
                "harmonize",
                str(d / "f.csv"),
                *HARMONIZE,
                "-o",
                str(d / "h.csv"),
                "--save-model",
                str(d / "m.npz"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}
    err = _cli_error(capsys, make_args(d))
    assert clobbered in err and "inputs are never overwritten" in err
    assert {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()} == before


def test_outputs_get_their_folders(features_csv, tmp_path):
    path, _ = features_csv
    out, model = tmp_path / "a" / "b" / "out.csv", tmp_path / "c" / "model.npz"
    assert (
        main(["harmonize", str(path), *HARMONIZE, "-o", str(out), "--save-model", str(model)]) == 0
    )
    assert out.is_file() and model.is_file()


@pytest.mark.parametrize(
    "output, model, message",
    [
        ("{d}", None, "is a directory; give a file name"),
        ("{d}/afile/out.csv", None, "cannot create the folder of -o"),
        ("{d}/out.csv", "{d}/afile/m.npz", "cannot create the folder of --save-model"),
        ("{d}/out.csv", "{d}/out.csv", "are the same file"),
    ],
)
def test_bad_output_paths_fail_before_writing(
    features_csv, tmp_path, capsys, output, model, message
):
    path, _ = features_csv
    (tmp_path / "afile").write_text("x")
    args = ["harmonize", str(path), *HARMONIZE, "-o", output.format(d=tmp_path)]
    if model:
        args += ["--save-model", model.format(d=tmp_path)]
    assert message in _cli_error(capsys, args)
    assert not (tmp_path / "out.csv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "features.csv"]


def test_failed_command_leaves_existing_outputs_untouched(
    features_csv, tmp_path, monkeypatch, capsys
):
    from kwneuro_sk import CombatEstimates

    path, _ = features_csv
    out, model = tmp_path / "out.csv", tmp_path / "m.npz"
    out.write_text("previous results\n")

    def failing_save(self, target):
        raise ValueError(f"cannot save the model to {target}")

    monkeypatch.setattr(CombatEstimates, "save", failing_save)
    _cli_error(
        capsys, ["harmonize", str(path), *HARMONIZE, "-o", str(out), "--save-model", str(model)]
    )
    assert out.read_text() == "previous results\n"
    assert not model.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.csv", "out.csv"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty: expected a header line"),
        ("subject,site,sex,age,diagnosis,feature_0\n", "has a header but no rows"),
        (
            "subject,site,sex,age,diagnosis,feature_0\ns1,a,F,30,0,1.5\ns2,b,M,31,1,abc\n",
            "table.csv line 3, column 'feature_0': 'abc'); copy them unchanged with --keep",
        ),
        (
            "subject,site,sex,age,diagnosis,feature_0\ns1,a,F,old,0,1.5\ns2,b,M,31,1,2\n",
            "table.csv line 2, column 'age': 'old'); give numbers",
        ),
        (
            "subject,site,sex,age,diagnosis,feature_0\ns1,a,F,30,0,1.5\ns2,,M,31,1,2\n",
            "--batch-col column 'site' has no value in",
        ),
        (
            "subject,site,sex,age,diagnosis,feature_0\ns1,a,F,30,0,1.5\ns2,b,NA,31,1,2\n",
            "table.csv line 3 ('NA'); every row needs one",
        ),
    ],
)
def test_bad_tables_one_line(tmp_path, capsys, content, message):
    (tmp_path / "table.csv").write_text(content)
    err = _cli_error(
        capsys,
        ["harmonize", str(tmp_path / "table.csv"), *HARMONIZE, "-o", str(tmp_path / "o.csv")],
    )
    assert "table.csv" in err and message in err


def test_extract_empty_image_cell_and_bad_labels_table(images, capsys):
    (images / "holes.csv").write_text("id,img\n1,sub00.nii.gz\n2,\n")
    err = _cli_error(
        capsys,
        [
            "extract",
            "--atlas",
            str(images / "atlas.nii.gz"),
            "--from-csv",
            str(images / "holes.csv"),
            "--column",
            "img",
            "-o",
            str(images / "o.csv"),
        ],
    )
    assert "holes.csv line 3: column 'img' is empty" in err
    (images / "bad.tsv").write_text("index\tname\n1\tleft\nB\tright\n")
    err = _cli_error(
        capsys,
        [
            "extract",
            str(images / "sub00.nii.gz"),
            "--atlas",
            str(images / "atlas.nii.gz"),
            "--labels",
            str(images / "bad.tsv"),
            "-o",
            str(images / "o.csv"),
        ],
    )
    assert "bad.tsv" in err and "column 'index'" in err and "row 1 has 'B'" in err
    (images / "empty.csv").write_text("")
    err = _cli_error(
        capsys,
        [
            "extract",
            "--atlas",
            str(images / "atlas.nii.gz"),
            "--from-csv",
            str(images / "empty.csv"),
            "-o",
            str(images / "o.csv"),
        ],
    )
    assert "empty.csv is empty" in err
    assert not (images / "o.csv").exists()


def test_advice_in_command_line_terms(features_csv, tmp_path, capsys):
    path, data = features_csv
    data.assign(site=["lonely"] + list(data["site"][1:])).to_csv(tmp_path / "one.csv", index=False)
    err = _cli_error(
        capsys, ["harmonize", str(tmp_path / "one.csv"), *HARMONIZE, "-o", str(tmp_path / "o.csv")]
    )
    assert "['lonely'] have a single row" in err and "use --mean-only" in err
    assert "mean_only" not in err
    model = tmp_path / "m.npz"
    assert (
        main(
            [
                "harmonize",
                str(path),
                *HARMONIZE,
                "-o",
                str(tmp_path / "h.csv"),
                "--save-model",
                str(model),
            ]
        )
        == 0
    )
    data.assign(site="siteNEW").to_csv(tmp_path / "new.csv", index=False)
    err = _cli_error(
        capsys, ["apply", str(model), str(tmp_path / "new.csv"), "-o", str(tmp_path / "n.csv")]
    )
    assert "--adapt-new-sites" in err and "unseen_batch" not in err
    assert "ColumnTransformer" not in err


def test_apply_maps_text_to_integer_sites_of_a_python_model(tmp_path):
    """A model fitted in Python with integer sites applies to a CSV, where sites are text."""
    data = make_site_features(n_subjects=30, n_features=3, random_state=3)
    data["site"] = data["site"].str[-1].astype(int)
    X = data.drop(columns=["subject", "diagnosis"])
    combat = CombatHarmonizer("site", ["sex"], ["age"]).fit(X)
    combat.estimates_.save(tmp_path / "m.npz")
    data.to_csv(tmp_path / "new.csv", index=False)
    assert (
        main(
            [
                "apply",
                str(tmp_path / "m.npz"),
                str(tmp_path / "new.csv"),
                "-o",
                str(tmp_path / "o.csv"),
            ]
        )
        == 0
    )
    result = pd.read_csv(tmp_path / "o.csv")
    features = [c for c in data.columns if c.startswith("feature_")]
    np.testing.assert_allclose(result[features], combat.transform(X), rtol=1e-12)


def test_outputs_have_the_usual_permissions(features_csv, tmp_path):
    """Staged outputs are not left private to the user (mkstemp creates files as 0600)."""
    path, _ = features_csv
    umask = os.umask(0o022)
    try:
        assert (
            main(
                [
                    "harmonize",
                    str(path),
                    *HARMONIZE,
                    "-o",
                    str(tmp_path / "o.csv"),
                    "--save-model",
                    str(tmp_path / "m.npz"),
                ]
            )
            == 0
        )
    finally:
        os.umask(umask)
    for name in ("o.csv", "m.npz"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644


def test_failing_input_creates_no_output_folder(tmp_path, capsys):
    err = _cli_error(
        capsys,
        [
            "harmonize",
            str(tmp_path / "missing.csv"),
            "--batch-col",
            "site",
            "-o",
            str(tmp_path / "new" / "out.csv"),
        ],
    )
    assert "missing.csv" in err
    assert not (tmp_path / "new").exists()


def test_apply_refuses_a_voxel_model_and_a_keyword_model(features_csv, tmp_path, capsys):
    from kwneuro_sk import harmonize_volumes

    path, data = features_csv
    rng = np.random.default_rng(0)
    imgs = [nib.Nifti1Image(rng.normal(size=(3, 3, 3)), np.eye(4)) for _ in range(4)]
    mask = nib.Nifti1Image(np.ones((3, 3, 3), dtype=np.uint8), np.eye(4))
    _, est = harmonize_volumes(imgs, pd.DataFrame({"site": ["a", "b"] * 2}), "site", mask)
    est.save(tmp_path / "voxels.npz")
    err = _cli_error(
        capsys, ["apply", str(tmp_path / "voxels.npz"), str(path), "-o", str(tmp_path / "o.csv")]
    )
    assert "voxels.npz was made by harmonize_volumes" in err
    features = data.filter(like="feature_").to_numpy()
    CombatHarmonizer().fit(features, batch=data["site"].to_numpy()).estimates_.save(
        tmp_path / "kw.npz"
    )
    err = _cli_error(
        capsys, ["apply", str(tmp_path / "kw.npz"), str(path), "-o", str(tmp_path / "o.csv")]
    )
    assert "kw.npz was fitted with the sites given as batch=" in err
