"""Voxel-wise ComBat on whole-brain images, and reusing the fitted model on new scans.

The story
---------
Region averages are not always enough: voxel-based morphometry needs every voxel harmonized.
:func:`~kwneuro_sk.harmonize_volumes` treats each voxel inside a brain mask as a feature, fits
ComBat on a set of images and returns harmonized images plus the fitted estimates. Months later,
new subjects scanned at the same sites are harmonized with those saved estimates, without
refitting (and so without changing the images harmonized before).

What you learn
--------------
1. Call ``harmonize_volumes(images, covariates, "site", mask, ...)`` with image paths, a
   covariates table and a mask (here nilearn's MNI152 brain mask); covariate effects (age,
   sex, diagnosis) are preserved.
2. Look at the result: per-site mean images minus the overall mean, before and after. Before,
   each site is brighter or darker all over; after, what remains is biology (the sites differ
   in mean age and in their share of patients).
3. Save the estimates (one ``.npz`` file holding the mask and grid too), load them and
   harmonize held-out subjects with ``VolumeEstimates.apply_volumes``.

Run it with ``python examples/04_voxelwise_harmonize_volumes.py``. The demo images are cached in
``KWNEURO_SK_DATA``; figures and the estimates go to the folder named by
``KWNEURO_SK_EXAMPLES_OUTPUT`` (default: a new temporary folder).
"""

import os
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # write files, never open windows

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
from nilearn.datasets import load_mni152_brain_mask
from sklearn.model_selection import train_test_split

from kwneuro_sk import CombatEstimates, harmonize_volumes
from kwneuro_sk.datasets import make_demo_cohort

output = Path(os.environ.get("KWNEURO_SK_EXAMPLES_OUTPUT") or tempfile.mkdtemp(prefix="kwneuro_sk"))
output.mkdir(parents=True, exist_ok=True)

# --------------------------------------------------------------------------------------------
# 1. 60 simulated grey-matter images from 3 sites (MNI 2 mm), split 45 to fit, 15 held out.
# --------------------------------------------------------------------------------------------
# 60 subjects; tests/test_examples.py sets KWNEURO_SK_EXAMPLES_N_SUBJECTS lower to run quicker.
n_subjects = int(os.environ.get("KWNEURO_SK_EXAMPLES_N_SUBJECTS", 60))
cohort = make_demo_cohort(n_subjects=n_subjects, random_state=0)
covariates = cohort.covariates
fit_rows, new_rows = train_test_split(
    covariates, test_size=n_subjects // 4, stratify=covariates["site"], random_state=0
)
mask_img = load_mni152_brain_mask(resolution=2)  # ships with nilearn: no download
mask = np.asarray(mask_img.dataobj) > 0
print(
    f"{len(fit_rows)} images to fit, {len(new_rows)} held out; "
    f"{mask.sum()} brain voxels of a {mask.shape} grid"
)

# --------------------------------------------------------------------------------------------
# 2. Fit and harmonize in one call.
# --------------------------------------------------------------------------------------------
tick = time.perf_counter()
harmonized, estimates = harmonize_volumes(
    fit_rows["image"].tolist(),
    fit_rows,
    "site",
    mask_img,
    categorical_cols=["sex", "diagnosis"],
    continuous_cols=["age"],
)
print(
    f"harmonize_volumes: {len(harmonized)} images x {mask.sum()} voxels "
    f"in {time.perf_counter() - tick:.1f} s"
)


def in_mask(images):
    """(n_images, n_voxels) matrix of the brain voxels of images given as paths or objects."""
    return np.stack(
        [
            np.asarray(
                nib.load(img).dataobj if isinstance(img, str) else img.dataobj, dtype=np.float32
            )[mask]
            for img in images
        ]
    )


def site_deviations(values, sites):
    """Per-site mean image minus the mean of the site means: shape (n_sites, n_voxels)."""
    names = np.unique(sites)
    means = np.stack([values[sites == site].mean(axis=0) for site in names])
    return names, means - means.mean(axis=0)


sites = fit_rows["site"].to_numpy()
site_names, before = site_deviations(in_mask(fit_rows["image"]), sites)
_, after = site_deviations(in_mask(harmonized), sites)
del harmonized  # 45 full-grid float32 images: free them once summarized
# The simulation's ground truth, averaged over regions: the site offsets ComBat should remove,
# and the biology (age, sex, diagnosis) it should keep.
offset = cohort.effects.site_offset.loc[site_names].mean(axis=1)
biology = cohort.effects.biological_mean(fit_rows).mean(axis=1).groupby(sites).mean()
offset, biology = offset - offset.mean(), biology - biology.mean()
print("whole-brain mean of (site mean - overall mean), before -> after harmonization:")
for s, site in enumerate(site_names):
    print(
        f"  {site}: {before[s].mean():+.4f} -> {after[s].mean():+.4f}   "
        f"simulated: site offset {offset[site]:+.4f}, biology {biology[site]:+.4f} "
        f"(mean age {fit_rows['age'][sites == site].mean():.0f})"
    )
whole_brain = {"before": before.mean(axis=1), "after": after.mean(axis=1)}
gap = {
    stage: np.abs(means - biology[site_names].to_numpy()).max()
    for stage, means in whole_brain.items()
}
print(
    f"largest |site deviation - simulated biology|: before {gap['before']:.4f}, "
    f"after {gap['after']:.4f}"
)
spread_before, spread_after = np.abs(before).mean(), np.abs(after).mean()
print(
    f"mean |site mean - overall mean| over brain voxels: before {spread_before:.4f}, "
    f"after {spread_after:.4f} ({spread_after / spread_before:.0%} of before)"
)

# --------------------------------------------------------------------------------------------
# 3. Save, load, harmonize the held-out subjects with the saved estimates.
# --------------------------------------------------------------------------------------------
model_file = output / "04_voxelwise_combat.npz"
estimates.save(model_file)
loaded = CombatEstimates.load(model_file)
new_images = new_rows["image"].tolist()
new_harmonized = loaded.apply_volumes(new_images, new_rows)
same = estimates.apply_volumes(new_images, new_rows)
difference = np.max(np.abs(in_mask(new_harmonized) - in_mask(same)))
new_sites = new_rows["site"].to_numpy()
_, new_before = site_deviations(in_mask(new_images), new_sites)
_, new_after = site_deviations(in_mask(new_harmonized), new_sites)
print(
    f"estimates saved to {model_file.name} ({model_file.stat().st_size / 2**20:.1f} MiB); "
    f"loaded vs in-memory estimates max |difference|: {difference:.1e}"
)
print(
    f"held-out subjects, mean |site mean - overall mean|: "
    f"before {np.abs(new_before).mean():.4f}, after {np.abs(new_after).mean():.4f}"
)
nib.save(new_harmonized[0], output / "04_first_held_out_harmonized.nii.gz")

# --------------------------------------------------------------------------------------------
# Figure: one axial slice of each site's deviation from the overall mean, before and after.
# --------------------------------------------------------------------------------------------
z = 45  # axial slice through the basal ganglia and cortex
slice_mask = mask[:, :, z]
limit = np.percentile(np.abs(before), 99)
fig, axes = plt.subplots(
    2, len(site_names), figsize=(3 * len(site_names), 6.4), constrained_layout=True
)
for row, (stage, deviations) in enumerate((("before", before), ("after", after))):
    for s, site in enumerate(site_names):
        volume = np.full(mask.shape, np.nan, dtype=np.float32)
        volume[mask] = deviations[s]
        shown = axes[row, s].imshow(
            np.rot90(np.where(slice_mask, volume[:, :, z], np.nan)),
            cmap="RdBu_r",
            vmin=-limit,
            vmax=limit,
        )
        axes[row, s].set_title(f"{site}, {stage}", fontsize="medium")
        axes[row, s].axis("off")
fig.colorbar(shown, ax=axes, shrink=0.6, label="site mean - overall mean (GM probability)")
fig.suptitle(
    f"Voxel-wise ComBat: per-site mean images, axial slice z={z}\n"
    "(after: the sites' age difference remains, kept on purpose)"
)
fig.savefig(output / "04_site_means_before_after.png", dpi=100)
print(f"figures and files written to {output}")
