"""Site-effect maps of voxel-wise models: images, files, command line and report, against the
estimates."""

import os

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from kwneuro_sk import CombatEstimates, CombatHarmonizer, harmonize_volumes
from kwneuro_sk.cli import main
from kwneuro_sk.volumes import site_effect_maps

SHAPE = (6, 5, 4)
AFFINE = np.diag([2.0, 3.0, 2.5, 1.0])
AFFINE[:3, 3] = [-5.0, 7.0, 1.0]


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(4)
    mask = np.zeros(SHAPE, dtype=bool)
    mask[1:5, 1:4, :] = True
    site = np.repeat(["north", "south east", "west"], 6)
    age = rng.uniform(20, 70, site.size)
    offset = pd.Series(site).map({"north": 0.0, "south east": 3.0, "west": -2.0}).to_numpy()
    scale = pd.Series(site).map({"north": 1.0, "south east": 2.0, "west": 0.7}).to_numpy()
    images = [
        nib.Nifti1Image((100 + o + 0.1 * a + s * rng.normal(size=SHAPE)).astype(np.float32), AFFINE)
        for o, s, a in zip(offset, scale, age)
    ]
    covars = pd.DataFrame({"site": site, "age": age})
    mask_img = nib.Nifti1Image(mask.astype(np.uint8), AFFINE)
    _, estimates = harmonize_volumes(images, covars, "site", mask_img, continuous_cols="age")
    return estimates, mask, images, covars


def test_maps_are_the_estimates_in_the_input_space(fitted, tmp_path):
    estimates, mask, _, _ = fitted
    e = estimates.estimates
    path = tmp_path / "model.npz"
    estimates.save(path)
    for source in (estimates, CombatEstimates.load(path)):
        maps = source.site_effect_maps()
        assert list(maps) == [
            "gamma_star_north",
            "gamma_star_south_east",
            "gamma_star_west",
            "delta_star_north",
            "delta_star_south_east",
            "delta_star_west",
            "sigma",
        ]
        for k, label in enumerate(["north", "south_east", "west"]):
            for kind in ("gamma_star", "delta_star"):
                img = maps[f"{kind}_{label}"]
                assert img.shape == SHAPE and img.get_data_dtype() == np.float32
                np.testing.assert_array_equal(img.affine, AFFINE)
                data = img.get_fdata()
                np.testing.assert_array_equal(data[mask], e[kind][k].astype(np.float32))
                assert (data[~mask] == 0).all()
        sigma = maps["sigma"].get_fdata()
        np.testing.assert_array_equal(sigma[mask], e["sigma"].astype(np.float32))
        np.testing.assert_allclose(sigma[mask], np.sqrt(e["var_pooled"]), rtol=1e-6)
    # the simulated site effects show: "south east" is shifted up and more variable
    means = {k: maps[f"gamma_star_{k}"].get_fdata()[mask].mean() for k in ("north", "west")}
    south = maps["gamma_star_south_east"].get_fdata()[mask].mean()
    assert south > means["north"] > means["west"]
    assert np.median(maps["delta_star_south_east"].get_fdata()[mask]) > 1.5


def test_maps_written_all_or_nothing(fitted, tmp_path):
    estimates, mask, _, _ = fitted
    written = site_effect_maps(estimates, output_dir=tmp_path / "maps")
    assert sorted(os.listdir(tmp_path / "maps")) == sorted(f"{n}.nii.gz" for n in written)
    in_memory = site_effect_maps(estimates)
    for name, path in written.items():
        np.testing.assert_array_equal(nib.load(path).get_fdata(), in_memory[name].get_fdata())
    # one target is a folder: refused before anything is written, nothing left behind
    blocked = tmp_path / "blocked"
    (blocked / "sigma.nii.gz").mkdir(parents=True)
    with pytest.raises(ValueError, match="map 'sigma' .*sigma.nii.gz' is a folder") as info:
        estimates.site_effect_maps(output_dir=blocked)
    assert "nothing was written" in " ".join(getattr(info.value, "__notes__", []))
    assert os.listdir(blocked) == ["sigma.nii.gz"]


def test_maps_refuse_table_models_and_colliding_site_names(fitted):
    rng = np.random.default_rng(0)
    table = CombatHarmonizer().fit(rng.normal(size=(10, 3)), batch=np.repeat([0, 1], 5))
    with pytest.raises(ValueError, match="not made by harmonize_volumes"):
        site_effect_maps(table.estimates_)
    estimates = fitted[0]
    info = dict(estimates.info, batches=np.array(["a b", "a_b", "c"], dtype=object))
    clash = type(estimates)(estimates.estimates, info)
    with pytest.raises(ValueError, match="sites 'a b' and 'a_b' would both be written"):
        site_effect_maps(clash)


def test_maps_command(fitted, tmp_path, capsys):
    estimates = fitted[0]
    model = tmp_path / "model.npz"
    estimates.save(model)
    assert main(["maps", str(model), "-o", str(tmp_path / "out")]) == 0
    assert "wrote 7 maps" in capsys.readouterr().out
    np.testing.assert_array_equal(
        nib.load(tmp_path / "out" / "delta_star_west.nii.gz").get_fdata(),
        site_effect_maps(estimates)["delta_star_west"].get_fdata(),
    )
    rng = np.random.default_rng(0)
    table = tmp_path / "table.npz"
    CombatHarmonizer().fit(rng.normal(size=(10, 3)), batch=np.repeat([0, 1], 5)).estimates_.save(
        table
    )
    assert main(["maps", str(table), "-o", str(tmp_path / "none")]) == 1
    assert "is not a voxel-wise model" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_report_shows_the_maps_of_a_voxel_model(fitted):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from kwneuro_sk.report import _site_effect_maps_section, harmonization_report

    estimates, mask, images, covars = fitted
    combat = CombatHarmonizer.from_estimates(estimates)
    X = np.stack([img.get_fdata()[mask] for img in images])
    report = harmonization_report(combat, X, batch=covars["site"], covariates=covars, cv=3)
    assert "<h2>Site-effect maps</h2>" in report.html
    # a model of a feature table has no maps section
    table = CombatHarmonizer(continuous_cols="age").fit(X, batch=covars["site"], covariates=covars)
    assert _site_effect_maps_section(table, None) is None
