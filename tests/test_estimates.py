"""CombatEstimates files come from other people: every damaged or foreign file fails at load
with a ValueError naming the file and the field, and nothing is ever unpickled."""

import json
import os
import pickle

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from kwneuro_sk import CombatEstimates, CombatHarmonizer, harmonize_volumes
from kwneuro_sk.cli import main


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.normal(size=(30, 4)), columns=["f1", "f2", "f3", "f4"])
    X["site"] = np.repeat(["a", "b", "c"], 10)
    X["sex"] = np.tile(["F", "M"], 15)
    X["age"] = rng.uniform(20, 70, 30).round()
    path = tmp_path_factory.mktemp("model") / "model.npz"
    CombatHarmonizer("site", ["sex"], ["age"]).fit(X).estimates_.save(path)
    return path, X


def _edited(model_file, tmp_path, edit, name="edited.npz"):
    """A copy of the model file with its manifest or arrays changed by edit(manifest, arrays);
    edit may return a replacement manifest (a dict, or text written as it is)."""
    with np.load(model_file, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    manifest = json.loads(str(arrays.pop("__manifest__")))
    replaced = edit(manifest, arrays)
    manifest = manifest if replaced is None else replaced
    arrays["__manifest__"] = np.array(
        manifest if isinstance(manifest, str) else json.dumps(manifest)
    )
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def _member(manifest, field):
    for key, value in manifest["estimates"]["__dict__"]:
        if key == field:
            return value["__array__"]
    raise KeyError(field)


def _set_info(key, value):
    def edit(manifest, arrays):
        entries = manifest["info"]["__dict__"]
        if value is _DELETE:
            manifest["info"]["__dict__"] = [kv for kv in entries if kv[0] != key]
        for kv in entries:
            if kv[0] == key:
                kv[1] = value

    return edit


def _set_array(field, value):
    def edit(manifest, arrays):
        arrays[_member(manifest, field)] = value

    return edit


_DELETE = object()


def _raw_files(tmp_path, model_file):
    raw = model_file.read_bytes()
    files = {
        "truncated.npz": raw[: len(raw) // 2],
        "empty.npz": b"",
        "table.csv": b"site,f1\na,1.0\n",
        "random.npz": bytes(range(256)) * 3,
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    with open(tmp_path / "model.pkl", "wb") as f:
        pickle.dump({"gamma_star": np.zeros(3)}, f)
    np.save(tmp_path / "array.npy", np.arange(3))
    np.savez(tmp_path / "objects.npz", __manifest__=np.array([{"a": 1}], dtype=object))
    np.savez(tmp_path / "other.npz", x=np.arange(3))
    return tmp_path


@pytest.mark.parametrize(
    "name, problem",
    [
        ("truncated.npz", "truncated or corrupt"),
        ("empty.npz", "the file is empty"),
        ("table.csv", "not an .npz archive"),
        ("random.npz", "not an .npz archive"),
        ("model.pkl", "the file is a pickle"),
        ("array.npy", "NumPy .npy array"),
        ("objects.npz", "object array, which is never unpickled"),
        ("other.npz", "no manifest"),
    ],
)
def test_foreign_files_refused_without_unpickling(tmp_path, model_file, name, problem):
    folder = _raw_files(tmp_path, model_file[0])
    with pytest.raises(ValueError, match=problem) as info:
        CombatEstimates.load(folder / name)
    assert name in str(info.value)
    assert "allow_pickle" not in str(info.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        CombatEstimates.load(tmp_path / "nope.npz")
    with pytest.raises(ValueError, match="is a directory"):
        CombatEstimates.load(tmp_path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m, a: "{not json", "the manifest is not valid JSON"),
        (lambda m, a: "[1, 2]", "the manifest is a JSON list"),
        (lambda m, a: "[" * 100_000 + "]" * 100_000, "nested too deeply"),
        (lambda m, a: {**m, "info": {"__dict__": [[[[]] * 2] * 2] * 3000}}, "info"),
        (lambda m, a: {**m, "version": 99}, "version 99"),
        (lambda m, a: {**m, "version": True}, "version True"),
        (lambda m, a: {k: v for k, v in m.items() if k != "info"}, "no 'info' field"),
        (_set_info("batches", _DELETE), r"info\['batches'\] is missing"),
        (_set_info("batches", 3), r"info\['batches'\] must list at least 2 sites"),
        (_set_info("batches", ["a", "a", "c"]), r"info\['batches'\] has repeated site labels"),
        (_set_info("eb", "yes"), r"info\['eb'\] must be true or false"),
        (_set_info("n_features_in", "x"), r"info\['n_features_in'\] must be an integer"),
        (_set_info("categories", "x"), r"info\['categories'\] must be a list"),
        (_set_info("ref_batch", "zz"), r"info\['ref_batch'\] 'zz' is not among the sites"),
        (_set_info("n_samples_per_batch", [-1, 10, 10]), r"info\['n_samples_per_batch'\]"),
        (_set_info("feature_names", ["f1"]), r"info\['feature_names'\] has 1 names for 4"),
        (_set_info("batch_col", [1, 2]), r"info\['batch_col'\] must be a column name"),
        (
            lambda m, a: [a.pop(_member(m, "gamma_star")), None][1],
            r"estimates\['gamma_star'\] refers to array member",
        ),
        (
            _set_array("gamma_star", np.ones((2, 2))),
            r"estimates\['gamma_star'\] has shape \(2, 2\)",
        ),
        (_set_array("delta_star", -np.ones((3, 4))), r"estimates\['delta_star'\] has values <= 0"),
        (_set_array("delta_star", np.full((3, 4), np.nan)), r"estimates\['delta_star'\] has NaN"),
        (_set_array("delta_hat", -np.ones((3, 4))), r"estimates\['delta_hat'\] has negative"),
        (_set_array("var_pooled", np.array(["a"] * 4)), r"estimates\['var_pooled'\] has dtype"),
        (
            _set_array("zero_variance_features", np.zeros(4)),
            r"estimates\['zero_variance_features'\] has dtype",
        ),
        (_set_array("grand_mean", np.ones((4, 1))), r"estimates\['grand_mean'\] must be 1-D"),
    ],
)
def test_edited_manifest_or_arrays_named(tmp_path, model_file, edit, message):
    path = _edited(model_file[0], tmp_path, edit)
    with pytest.raises(ValueError, match=message) as info:
        CombatEstimates.load(path)
    assert "edited.npz" in str(info.value)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("mask", np.ones((2, 2, 2), dtype=bool), r"\['mask'\] must be a boolean array of shape"),
        ("affine", np.eye(3), r"\['affine'\] must be a finite 4 x 4 array"),
        ("shape", [9, 9, 9], r"\['mask'\] must be a boolean array of shape \(9, 9, 9\)"),
        ("shape", [4, 4], r"\['shape'\] must be 3 positive integers"),
    ],
)
def test_volume_model_grid_checked(tmp_path, key, value, message):
    rng = np.random.default_rng(0)
    imgs = [nib.Nifti1Image(rng.normal(size=(4, 4, 4)), np.eye(4)) for _ in range(6)]
    mask = nib.Nifti1Image(np.ones((4, 4, 4), dtype=np.uint8), np.eye(4))
    _, est = harmonize_volumes(imgs, pd.DataFrame({"site": np.tile(["a", "b"], 3)}), "site", mask)
    est.info["volumes"][key] = value
    est.save(tmp_path / "vol.npz")
    with pytest.raises(ValueError, match=message):
        CombatEstimates.load(tmp_path / "vol.npz")


def test_tuple_batch_col_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.normal(size=(20, 3)), columns=["a", "b", "c"])
    X[("meta", "site")] = np.repeat(["s1", "s2"], 10)
    combat = CombatHarmonizer(("meta", "site")).fit(X)
    combat.estimates_.save(tmp_path / "m.npz")
    rebuilt = CombatHarmonizer.from_estimates(CombatEstimates.load(tmp_path / "m.npz"))
    assert rebuilt.batch_col == ("meta", "site")
    np.testing.assert_array_equal(rebuilt.transform(X), combat.transform(X))


def test_save_is_atomic_over_an_existing_model(tmp_path, model_file, monkeypatch):
    """A failure while saving leaves the existing model intact and no temporary file."""
    path = tmp_path / "m.npz"
    path.write_bytes(model_file[0].read_bytes())
    before = path.read_bytes()
    est = CombatEstimates.load(path)

    def broken(file, **arrays):
        file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError, match="disk full"):
        est.save(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.npz"]


def test_cli_apply_names_the_bad_model(tmp_path, model_file, capsys):
    path, X = model_file
    X.to_csv(tmp_path / "new.csv", index=False)
    bad = _edited(path, tmp_path, _set_array("delta_star", -np.ones((3, 4))), "bad.npz")
    assert (
        main(["apply", str(bad), str(tmp_path / "new.csv"), "-o", str(tmp_path / "out.csv")]) == 1
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "bad.npz" in err and "estimates['delta_star'] has values <= 0" in err
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("categories", [[["F"], "M"]], "levels of 'sex' that are not labels"),
        ("categories", [["F", "F"]], "repeated levels for 'sex'"),
        ("feature_names", [1, 2, 3, 4], "feature names as text"),
    ],
)
def test_info_labels_checked(tmp_path, model_file, key, value, message):
    path = _edited(model_file[0], tmp_path, _set_info(key, value))
    with pytest.raises(ValueError, match=message):
        CombatEstimates.load(path)
