"""Simulated multi-site data made on the user's machine, with no network.

Two generators share one model of a multi-site study:

- :func:`make_site_features` returns a table (one row per subject) of feature values with site,
  age, sex and diagnosis columns. It is instant and needs no images.
- :func:`make_demo_cohort` writes one grey-matter-like NIfTI image per subject on nilearn's
  MNI152 2 mm grid, a labels atlas of spheres around the Dosenbach et al. (2010) regions of
  interest, a look-up table of region names and a covariates table. Files are cached on disk and
  reused.

Features (regions) belong to networks: for the images, the Dosenbach et al. (2010) network of
each region; for the tables, a few pseudo-networks, the features the diagnosis affects forming
one of them. The model (per subject ``i`` at site ``s`` and feature or region ``r`` of network
``n(r)``) is the ComBat model of Johnson et al. (2007)::

    x[i, r] = baseline[r]
              + age_effect[r] * (age[i] - reference_age)
              + sex_effect[r] * (sex[i] == "M")
              + diagnosis_effect[r] * (diagnosis[i] == "patient")
              + site_offset[s, r]
              + site_scale[s, r] * e[i, r]

    site_offset[s, r] = a[s] + b[s, n(r)] + c[s, r]          (whole brain, network, region)
    e[i, r] = residual_sd * (sqrt(rho) * u[i, n(r)] + sqrt(1 - rho) * v[i, r])

with ``u`` and ``v`` standard normal and ``rho = residual_network_correlation``. The network
part ``b`` of the site offset models scanners whose grey/white contrast differs by brain
network or lobe: its size is comparable to the diagnosis effect, so at a site whose
default-mode regions come out darker every subject looks a little like a patient. The subject
effect ``u`` shared by the regions of a network makes regions of one network correlated, as in
real data, so
averaging many regions does not make the diagnosis trivially easy. ComBat, fitted feature by
feature, sees ``e`` as a residual of standard deviation ``residual_sd``: its ``gamma`` is the
whole ``site_offset`` (up to a shift shared by all sites) and its ``delta`` is
``site_scale ** 2`` (up to a factor shared by all sites). The effects are returned as a
:class:`SimulatedEffects`, so that a test or a tutorial can check that harmonization removes
what was added and keeps what biology added. Sites differ in mean age and in the proportion of
patients, as real sites do, so that removing site means without covariates also removes part of
the age and diagnosis effects.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import cKDTree
from sklearn.utils._param_validation import Interval, validate_params

__all__ = [
    "DemoCohort",
    "SimulatedEffects",
    "get_data_dir",
    "make_demo_cohort",
    "make_site_features",
]

#: Environment variable naming the folder where generated data are cached.
DATA_DIR_ENV = "KWNEURO_SK_DATA"

# Bump whenever the generator changes what it writes, so stale caches are not reused.
_GENERATOR_VERSION = 2

# Effect sizes, in the units of the features (grey-matter probability for the images).
_REFERENCE_AGE = 50.0
_AGE_SLOPE = -0.002  # per year, times U(0.5, 1.5) per feature
_SEX_EFFECT_MAX = 0.02  # male minus female, U(0, max) per feature
_DIAGNOSIS_EFFECT = -0.03  # patient minus control, times U(0.7, 1.3) on affected features
_RESIDUAL_SD = 0.025  # between-subject standard deviation before the site scale
_SITE_OFFSET_SD = (0.04, 0.06, 0.015)  # per site, per (site, network), per (site, feature)
_RESIDUAL_NETWORK_CORRELATION = 0.7  # share of the residual variance common to a network
_SITE_LOG_SCALE_SD = (0.3, 0.1)  # per site, then per (site, feature)
_SITE_AGE_MEANS = (40.0, 60.0)  # site mean ages are spread evenly over this range
_AGE_SD = 10.0
_AGE_RANGE = (18.0, 90.0)
_PATIENT_FRACTIONS = (0.35, 0.55)  # per-site fraction of patients, spread evenly

# Image-only settings.
_VOXEL_NOISE_SD = 0.05  # voxel-wise measurement noise, before the site scale
_NOISE_FWHM_MM = 6.0
_DIAGNOSIS_NETWORK = "default"  # Dosenbach network whose regions the diagnosis affects

# Table-only setting: the features the diagnosis affects form one pseudo-network, the others
# are dealt out over this many more.
_N_OTHER_NETWORKS = 3


@dataclass(frozen=True)
class SimulatedEffects:
    """The effects a simulation added: the ground truth to check harmonization against.

    Every per-feature table is indexed by feature (or region) name, in the column order of the
    data; per-site tables are indexed by site label.

    Attributes
    ----------
    baseline : pandas.Series
        Expected value of a female control of ``reference_age`` before any site effect.
    age_effect : pandas.Series
        Change per year of age.
    sex_effect : pandas.Series
        Males minus females.
    diagnosis_effect : pandas.Series
        Patients minus controls; zero on the features the diagnosis does not affect.
    network : pandas.Series
        Network (a string) of each feature.
    site_offset : pandas.DataFrame
        The whole additive site effect, shape (n_sites, n_features): the sum of its
        whole-brain, network and feature parts, so ComBat's gamma up to a shift shared by all
        sites.
    site_network_offset : pandas.DataFrame
        The network part of ``site_offset``, shape (n_sites, n_networks), columns sorted by
        network name.
    site_scale : pandas.DataFrame
        Factor multiplying each site's residual standard deviation, shape
        (n_sites, n_features): ComBat's delta is ``site_scale ** 2`` up to a common factor.
    residual_sd : float
        Standard deviation of the subject-level residual before the site scale. In the images
        smooth voxel noise adds to it, so region means vary a little more.
    residual_network_correlation : float
        Correlation between the residuals of two features of the same network (of one
        subject); residuals of different networks are independent.
    reference_age : float
        Age at which the age effect is zero.

    Examples
    --------
    >>> from kwneuro_sk.datasets import make_site_features
    >>> data, effects = make_site_features(n_subjects=60, n_features=4, return_effects=True)
    >>> effects.feature_names
    ['feature_00', 'feature_01', 'feature_02', 'feature_03']
    >>> effects.diagnosis_features  # the features the diagnosis lowers
    ['feature_02']
    >>> site_part = data[effects.feature_names] - effects.biological_mean(data)
    >>> site_part.groupby(data["site"]).mean().round(2).shape  # site offsets, plus noise
    (3, 4)
    """

    baseline: pd.Series
    age_effect: pd.Series
    sex_effect: pd.Series
    diagnosis_effect: pd.Series
    network: pd.Series
    site_offset: pd.DataFrame
    site_network_offset: pd.DataFrame
    site_scale: pd.DataFrame
    residual_sd: float
    residual_network_correlation: float
    reference_age: float

    @property
    def feature_names(self) -> list[str]:
        """Names of the features (or regions), in data column order."""
        return [str(name) for name in self.baseline.index]

    @property
    def diagnosis_features(self) -> list[str]:
        """Names of the features the diagnosis changes."""
        return [str(name) for name in self.diagnosis_effect.index[self.diagnosis_effect != 0]]

    def biological_mean(self, covariates: pd.DataFrame) -> pd.DataFrame:
        """Expected feature values of each subject without any site effect.

        Parameters
        ----------
        covariates : pandas.DataFrame
            One row per subject with columns ``age``, ``sex`` (``"F"``/``"M"``) and
            ``diagnosis`` (``"control"``/``"patient"``).

        Returns
        -------
        pandas.DataFrame
            Shape (n_subjects, n_features), same index as ``covariates``. Subtracting it from
            the data leaves ``site_offset + site_scale * residual``.
        """
        _require_columns(covariates, ["age", "sex", "diagnosis"], "covariates")
        age = covariates["age"].to_numpy(dtype=float)[:, None] - self.reference_age
        male = (covariates["sex"].astype(str) == "M").to_numpy(dtype=float)[:, None]
        patient = (covariates["diagnosis"].astype(str) == "patient").to_numpy(dtype=float)[:, None]
        values = (
            self.baseline.to_numpy()
            + age * self.age_effect.to_numpy()
            + male * self.sex_effect.to_numpy()
            + patient * self.diagnosis_effect.to_numpy()
        )
        return pd.DataFrame(values, index=covariates.index, columns=self.baseline.index)

    def to_dict(self) -> dict:
        """Plain JSON-serialisable form, read back by :meth:`from_dict`."""
        return {
            "features": self.feature_names,
            "sites": [str(site) for site in self.site_offset.index],
            "baseline": self.baseline.tolist(),
            "age_effect": self.age_effect.tolist(),
            "sex_effect": self.sex_effect.tolist(),
            "diagnosis_effect": self.diagnosis_effect.tolist(),
            "network": self.network.tolist(),
            "networks": [str(name) for name in self.site_network_offset.columns],
            "site_offset": self.site_offset.to_numpy().tolist(),
            "site_network_offset": self.site_network_offset.to_numpy().tolist(),
            "site_scale": self.site_scale.to_numpy().tolist(),
            "residual_sd": self.residual_sd,
            "residual_network_correlation": self.residual_network_correlation,
            "reference_age": self.reference_age,
        }

    @classmethod
    def from_dict(cls, data: dict) -> SimulatedEffects:
        """Rebuild the effects from :meth:`to_dict` output."""
        features = pd.Index(data["features"], dtype=str)
        sites = pd.Index(data["sites"], dtype=str, name="site")

        def series(key):
            return pd.Series(data[key], index=features, name=key, dtype=float)

        def table(key, columns=features):
            return pd.DataFrame(data[key], index=sites, columns=columns, dtype=float)

        return cls(
            baseline=series("baseline"),
            age_effect=series("age_effect"),
            sex_effect=series("sex_effect"),
            diagnosis_effect=series("diagnosis_effect"),
            network=pd.Series(data["network"], index=features, name="network", dtype=str),
            site_offset=table("site_offset"),
            site_network_offset=table(
                "site_network_offset", pd.Index(data["networks"], dtype=str, name="network")
            ),
            site_scale=table("site_scale"),
            residual_sd=float(data["residual_sd"]),
            residual_network_correlation=float(data["residual_network_correlation"]),
            reference_age=float(data["reference_age"]),
        )


@dataclass(frozen=True)
class DemoCohort:
    """A simulated multi-site imaging cohort written by :func:`make_demo_cohort`.

    Attributes
    ----------
    images : list of str
        Paths of the subject images (float32 ``.nii.gz``), in the row order of ``covariates``.
    atlas : str
        Path of the labels image: 0 is background, region ``k`` has value ``k``.
    labels : list of str
        Region names; ``labels[k - 1]`` names the region with value ``k``.
    labels_file : str
        Path of a TSV look-up table with columns ``index``, ``name``, ``network``, ``x``,
        ``y``, ``z`` (sphere centre in MNI mm), one row per region.
    covariates : pandas.DataFrame
        One row per subject: ``subject``, ``site``, ``age`` (float, years), ``sex``
        (``"F"``/``"M"``), ``diagnosis`` (``"control"``/``"patient"``) and ``image`` (path).
    effects : SimulatedEffects
        The ground truth, per region, of the effects that were added.
    path : str
        The folder holding all the files.
    """

    images: list[str]
    atlas: str
    labels: list[str]
    labels_file: str
    covariates: pd.DataFrame
    effects: SimulatedEffects
    path: str


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


@validate_params({"data_dir": [str, os.PathLike, None]}, prefer_skip_nested_validation=True)
def get_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Folder where kwneuro_sk caches the data it generates.

    Parameters
    ----------
    data_dir : str or path-like, default=None
        Used as is when given. Otherwise the environment variable ``KWNEURO_SK_DATA``, else
        the platform's user cache folder: ``$XDG_CACHE_HOME/kwneuro_sk`` or
        ``~/.cache/kwneuro_sk`` on Linux, ``~/Library/Caches/kwneuro_sk`` on macOS,
        ``%LOCALAPPDATA%\\kwneuro_sk\\Cache`` on Windows.

    Returns
    -------
    pathlib.Path
        The folder (not created by this function).

    Examples
    --------
    >>> from kwneuro_sk.datasets import get_data_dir
    >>> str(get_data_dir("/tmp/my_data"))
    '/tmp/my_data'
    """
    if data_dir is not None:
        return Path(data_dir).expanduser()
    from_env = os.environ.get(DATA_DIR_ENV)
    if from_env:
        return Path(from_env).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
        return base / "kwneuro_sk" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "kwneuro_sk"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kwneuro_sk"


@validate_params(
    {
        "n_subjects": [Interval(Integral, 2, None, closed="left")],
        "n_features": [Interval(Integral, 1, None, closed="left")],
        "n_sites": [Interval(Integral, 1, None, closed="left")],
        # numpy's Generator stream (not scikit-learn's RandomState): the same seed must keep
        # giving the same table, so check_random_state is not used here.
        "random_state": [Interval(Integral, 0, None, closed="left"), np.random.Generator, None],
        "return_effects": ["boolean"],
    },
    prefer_skip_nested_validation=True,
)
def make_site_features(
    n_subjects: int = 300,
    n_features: int = 20,
    n_sites: int = 3,
    *,
    random_state: int | np.random.Generator | None = 0,
    return_effects: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, SimulatedEffects]:
    """Simulate a table of features from a multi-site study with known site effects.

    The same model as :func:`make_demo_cohort` (see the module docstring) without images: each
    site shifts and scales every feature, age lowers every feature, and the diagnosis lowers a
    quarter of the features. Those features form one pseudo-network (``"network1"``); the
    others are dealt out at random over three more (``"network2"`` to ``"network4"``), which
    share site offsets and part of the subject residual.

    Parameters
    ----------
    n_subjects : int, default=300
        Number of rows; at least two per site.
    n_features : int, default=20
        Number of feature columns, named ``feature_00``, ``feature_01``, ...
    n_sites : int, default=3
        Number of sites, labelled ``site1``, ``site2``, ... Subjects are spread as evenly as
        possible over the sites, in shuffled order.
    random_state : int, numpy.random.Generator or None, default=0
        Seed. The same integer gives the same table.
    return_effects : bool, default=False
        Also return the :class:`SimulatedEffects` that were added.

    Returns
    -------
    data : pandas.DataFrame
        Columns ``subject``, ``site``, ``age``, ``sex``, ``diagnosis``, then the features.
    effects : SimulatedEffects
        Only when ``return_effects`` is True.

    Examples
    --------
    >>> from kwneuro_sk.datasets import make_site_features
    >>> data, effects = make_site_features(n_subjects=60, n_features=5, return_effects=True)
    >>> data.shape
    (60, 10)
    >>> list(data.columns[:5])
    ['subject', 'site', 'age', 'sex', 'diagnosis']
    >>> effects.site_offset.shape
    (3, 5)
    """
    n_subjects, n_sites = _check_design(n_subjects, n_sites)
    n_features = int(n_features)
    rng = np.random.default_rng(random_state)

    covariates = _simulate_covariates(n_subjects, n_sites, rng)
    width = max(2, len(str(n_features - 1)))
    features = [f"feature_{j:0{width}d}" for j in range(n_features)]
    n_affected = max(1, n_features // 4)
    affected = np.zeros(n_features, dtype=bool)
    affected[rng.choice(n_features, size=n_affected, replace=False)] = True
    network = np.zeros(n_features, dtype=int)  # 0: the affected features
    others = rng.permutation(np.flatnonzero(~affected))
    network[others] = 1 + np.arange(others.size) % _N_OTHER_NETWORKS
    network_names = [f"network{k + 1}" for k in network]
    baseline = rng.uniform(0.4, 0.7, size=n_features)
    effects = _simulate_effects(
        features, _site_names(n_sites), baseline, affected, network_names, rng
    )

    residuals = _residuals(effects, n_subjects, rng)
    site_rows = covariates["site"].to_numpy(dtype=str)
    offset = effects.site_offset.loc[site_rows].to_numpy()
    scale = effects.site_scale.loc[site_rows].to_numpy()
    values = effects.biological_mean(covariates).to_numpy() + offset + scale * residuals

    data = pd.concat([covariates, pd.DataFrame(values, columns=features)], axis=1)
    return (data, effects) if return_effects else data


@validate_params(
    {
        "n_subjects": [Interval(Integral, 2, None, closed="left")],
        "n_sites": [Interval(Integral, 1, None, closed="left")],
        "data_dir": [str, os.PathLike, None],
        "random_state": [Interval(Integral, 0, None, closed="left")],
        "roi_radius": [Interval(Real, 2.0, 15.0, closed="both")],
        "verbose": ["verbose"],
    },
    prefer_skip_nested_validation=True,
)
def make_demo_cohort(
    n_subjects: int = 120,
    n_sites: int = 3,
    *,
    data_dir: str | os.PathLike | None = None,
    random_state: int = 0,
    roi_radius: float = 6.0,
    verbose: int = 0,
) -> DemoCohort:
    """Write (or reuse) a simulated multi-site cohort of grey-matter images with known effects.

    Everything is made locally from files nilearn ships, with no network:

    - **Grid**: nilearn's MNI152 (ICBM 2009 symmetric) 2 mm template grid, shape
      (99, 117, 95), the grid of ``nilearn.datasets.load_mni152_template(resolution=2)``.
    - **Atlas**: spheres of ``roi_radius`` mm around the 160 regions of interest of
      Dosenbach et al. (2010, Science), inside nilearn's MNI152 brain mask; a voxel within
      reach of two centres goes to the nearest one. Region names are Dosenbach's, numbered
      (``"vmPFC 1"``), with their network in the look-up table.
    - **Images**: the MNI152 grey-matter probability map plus, per subject, the model of the
      module docstring applied region by region (regional residual, age, sex, diagnosis and
      site offset and scale), and smooth voxel noise (6 mm FWHM) also scaled by the site.
      The regions of one Dosenbach network share part of the site offset and part of the
      subject residual. Brain voxels outside every region get each site's mean offset and
      scale; voxels outside the brain are 0. The diagnosis lowers grey matter in the regions
      of the default-mode network (34 regions).
    - **Covariates**: sites differ in mean age (40 to 60 years) and in the fraction of patients
      (35 % to 55 %), so site is confounded with biology as in real studies.

    Files go to ``<data_dir>/demo_cohort/<key>/`` where the key encodes the parameters; a
    complete folder is reused without rewriting anything. The folder is built under a temporary
    name and renamed when complete, so an interrupted run leaves no half-written cohort.

    Parameters
    ----------
    n_subjects : int, default=120
        Number of subjects; at least two per site. 120 subjects take a few seconds and about
        110 MB of disk.
    n_sites : int, default=3
        Number of sites, labelled ``site1``, ``site2``, ...
    data_dir : str or path-like, default=None
        Cache root; see :func:`get_data_dir` for the default (environment variable
        ``KWNEURO_SK_DATA``, else the user cache folder).
    random_state : int, default=0
        Seed: the same seed gives identical files. Must be an integer because it keys the cache.
    roi_radius : float, default=6.0
        Radius in mm of the spheres of the atlas, between 2 and 15.
    verbose : int, default=0
        Print where the cohort is written or found when greater than 0.

    Returns
    -------
    DemoCohort
        Paths of the images, atlas and look-up table, the region names, the covariates table and
        the simulated effects per region.

    Examples
    --------
    >>> import tempfile
    >>> from kwneuro_sk.datasets import make_demo_cohort
    >>> cohort = make_demo_cohort(n_subjects=6, data_dir=tempfile.mkdtemp())
    >>> len(cohort.images), len(cohort.labels)
    (6, 160)
    >>> list(cohort.covariates.columns)
    ['subject', 'site', 'age', 'sex', 'diagnosis', 'image']
    >>> cohort.effects.site_offset.shape
    (3, 160)
    """
    n_subjects, n_sites = _check_design(n_subjects, n_sites)
    random_state, roi_radius = int(random_state), float(roi_radius)

    params = {
        "generator_version": _GENERATOR_VERSION,
        "n_subjects": n_subjects,
        "n_sites": n_sites,
        "random_state": random_state,
        "roi_radius": roi_radius,
    }
    name = f"n{n_subjects}_sites{n_sites}_seed{random_state}"
    folder = _build_once(
        get_data_dir(data_dir) / "demo_cohort", name, params, _write_cohort, "demo cohort", verbose
    )
    return _load_cohort(folder)


# --------------------------------------------------------------------------------------------
# Simulation shared by both generators
# --------------------------------------------------------------------------------------------


def _site_names(n_sites: int) -> list[str]:
    width = len(str(n_sites))
    return [f"site{s + 1:0{width}d}" for s in range(n_sites)]


def _spread(bounds: tuple[float, float], n: int) -> np.ndarray:
    """n values evenly spread over bounds (the midpoint when n is 1)."""
    return np.linspace(*bounds, n) if n > 1 else np.array([np.mean(bounds)])


def _simulate_covariates(n_subjects: int, n_sites: int, rng: np.random.Generator) -> pd.DataFrame:
    """Subjects spread evenly over sites; per-site mean age and fraction of patients differ."""
    sites = _site_names(n_sites)
    site_index = rng.permutation(np.arange(n_subjects) % n_sites)
    age_means = _spread(_SITE_AGE_MEANS, n_sites)
    age = rng.normal(age_means[site_index], _AGE_SD)
    age = np.round(np.clip(age, *_AGE_RANGE) * 4) / 4  # quarter years: exact in float32 too

    # Exact counts per site (not coin flips) so that small cohorts have both sexes and both
    # diagnoses at every site that has at least two subjects.
    male = np.zeros(n_subjects, dtype=bool)
    patient = np.zeros(n_subjects, dtype=bool)
    for s, fraction in enumerate(_spread(_PATIENT_FRACTIONS, n_sites)):
        rows = np.flatnonzero(site_index == s)
        n_patients = int(np.clip(np.round(fraction * rows.size), 1, max(rows.size - 1, 1)))
        patient[rng.permutation(rows)[:n_patients]] = True
        male[rng.permutation(rows)[: rows.size // 2]] = True

    width = max(3, len(str(n_subjects)))
    return pd.DataFrame(
        {
            "subject": [f"sub-{i + 1:0{width}d}" for i in range(n_subjects)],
            "site": np.asarray(sites)[site_index],
            "age": age,
            "sex": np.where(male, "M", "F"),
            "diagnosis": np.where(patient, "patient", "control"),
        }
    ).astype({"subject": str, "site": str, "sex": str, "diagnosis": str})


def _simulate_effects(
    features: list[str],
    sites: list[str],
    baseline: np.ndarray,
    diagnosis_affected: np.ndarray,
    network: list[str],
    rng: np.random.Generator,
) -> SimulatedEffects:
    n_features, n_sites = len(features), len(sites)
    networks, network_code = _networks(network)
    diagnosis = _DIAGNOSIS_EFFECT * rng.uniform(0.7, 1.3, size=n_features) * diagnosis_affected
    whole_sd, network_sd, feature_sd = _SITE_OFFSET_SD
    network_offset = rng.normal(0.0, network_sd, size=(n_sites, len(networks)))
    offset = (
        rng.normal(0.0, whole_sd, size=(n_sites, 1))
        + network_offset[:, network_code]
        + rng.normal(0.0, feature_sd, size=(n_sites, n_features))
    )
    log_scale = rng.normal(0.0, _SITE_LOG_SCALE_SD[0], size=(n_sites, 1)) + rng.normal(
        0.0, _SITE_LOG_SCALE_SD[1], size=(n_sites, n_features)
    )
    return SimulatedEffects.from_dict(
        {
            "features": features,
            "sites": sites,
            "baseline": np.asarray(baseline, dtype=float).tolist(),
            "age_effect": (_AGE_SLOPE * rng.uniform(0.5, 1.5, size=n_features)).tolist(),
            "sex_effect": rng.uniform(0.0, _SEX_EFFECT_MAX, size=n_features).tolist(),
            "diagnosis_effect": diagnosis.tolist(),
            "network": [str(name) for name in network],
            "networks": networks,
            "site_offset": offset.tolist(),
            "site_network_offset": network_offset.tolist(),
            "site_scale": np.exp(log_scale).tolist(),
            "residual_sd": _RESIDUAL_SD,
            "residual_network_correlation": _RESIDUAL_NETWORK_CORRELATION,
            "reference_age": _REFERENCE_AGE,
        }
    )


def _networks(network) -> tuple[list[str], np.ndarray]:
    """Sorted network names, and each feature's index among them."""
    names, code = np.unique(np.asarray(network, dtype=str), return_inverse=True)
    return names.tolist(), code


def _residuals(effects: SimulatedEffects, n_subjects: int, rng: np.random.Generator) -> np.ndarray:
    """Subject residuals ``e`` of the module docstring, shape (n_subjects, n_features)."""
    _, network_code = _networks(effects.network)
    rho = effects.residual_network_correlation
    shared = rng.standard_normal((n_subjects, network_code.max() + 1))[:, network_code]
    own = rng.standard_normal((n_subjects, network_code.size))
    return effects.residual_sd * (np.sqrt(rho) * shared + np.sqrt(1.0 - rho) * own)


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def _make_atlas(mask: np.ndarray, affine: np.ndarray, radius: float):
    """Spheres around the Dosenbach 2010 ROIs, inside the mask, nearest centre wins."""
    from nilearn.datasets import fetch_coords_dosenbach_2010

    rois = fetch_coords_dosenbach_2010(ordered_regions=False)
    centres = rois.rois[["x", "y", "z"]].to_numpy(dtype=float)
    table = pd.DataFrame(
        {
            "index": np.arange(1, len(centres) + 1),
            "name": [str(label) for label in rois.labels],
            "network": [str(net) for net in rois.networks],
            "x": centres[:, 0],
            "y": centres[:, 1],
            "z": centres[:, 2],
        }
    )
    ijk = np.argwhere(mask)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    _, nearest = cKDTree(centres).query(xyz, distance_upper_bound=radius)
    inside = nearest < len(centres)  # query returns len(centres) when nothing is in reach
    atlas = np.zeros(mask.shape, dtype=np.int16)
    atlas[tuple(ijk[inside].T)] = nearest[inside] + 1
    sizes = np.bincount(atlas[mask], minlength=len(centres) + 1)[1:]
    if np.any(sizes == 0):
        empty = table["name"][sizes == 0].tolist()
        raise RuntimeError(f"Atlas regions with no brain voxel at radius {radius} mm: {empty}.")
    return atlas, table


def _noise_scale(sigma_voxels: float) -> float:
    """Standard deviation of unit white noise after scipy's Gaussian filter of this sigma."""
    impulse = np.zeros(int(8 * sigma_voxels) * 2 + 1)
    impulse[impulse.size // 2] = 1.0
    kernel = ndimage.gaussian_filter1d(impulse, sigma_voxels)
    return float(np.sqrt(np.sum(kernel**2)) ** 3)


@functools.lru_cache(maxsize=1)
def _templates() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """nilearn's MNI152 2 mm grey-matter map, brain mask and affine, read-only.

    Kept for the process: nilearn resamples the grey-matter map on every load (half a second),
    and every cohort starts from the same templates.
    """
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_gm_template

    gm_img = load_mni152_gm_template(resolution=2)
    mask_img = load_mni152_brain_mask(resolution=2)
    arrays = (
        np.asarray(gm_img.get_fdata(), dtype=np.float64),
        np.asarray(mask_img.dataobj) > 0,
        np.array(gm_img.affine, dtype=np.float64),
    )
    for array in arrays:
        array.setflags(write=False)
    return arrays


def _write_cohort(folder: Path, params: dict) -> None:
    """Simulate and write every file of the cohort into folder; params.json is written last."""
    gm, mask, affine = _templates()

    atlas, table = _make_atlas(mask, affine, params["roi_radius"])
    n_regions = len(table)
    region_of_voxel = atlas[mask].astype(np.intp)  # 0 = brain outside every region
    voxel_count = np.bincount(region_of_voxel, minlength=n_regions + 1)
    region_gm = np.bincount(region_of_voxel, weights=gm[mask], minlength=n_regions + 1)
    baseline = region_gm[1:] / voxel_count[1:]

    cov_seed, effect_seed, subject_seed = np.random.SeedSequence(params["random_state"]).spawn(3)
    covariates = _simulate_covariates(
        params["n_subjects"], params["n_sites"], np.random.default_rng(cov_seed)
    )
    affected = (table["network"] == _DIAGNOSIS_NETWORK).to_numpy()
    effects = _simulate_effects(
        table["name"].tolist(),
        _site_names(params["n_sites"]),
        baseline,
        affected,
        table["network"].tolist(),
        np.random.default_rng(effect_seed),
    )

    # Per-region values with a leading entry for brain voxels outside every region: those get
    # the mean effect (and no diagnosis effect), so the whole brain carries the site effect,
    # and an independent residual.
    def with_background(values, background):
        return np.concatenate([[background], values])

    age_fx = with_background(effects.age_effect.to_numpy(), effects.age_effect.mean())
    sex_fx = with_background(effects.sex_effect.to_numpy(), effects.sex_effect.mean())
    dx_fx = with_background(effects.diagnosis_effect.to_numpy(), 0.0)
    offsets = effects.site_offset.to_numpy()
    scales = effects.site_scale.to_numpy()
    site_offset = np.column_stack([offsets.mean(axis=1), offsets])
    site_scale = np.column_stack([scales.mean(axis=1), scales])

    sigma = _NOISE_FWHM_MM / np.sqrt(8 * np.log(2)) / abs(affine[0, 0])
    noise_gain = _VOXEL_NOISE_SD / _noise_scale(sigma)
    gm_inside = gm[mask]
    # Noise is drawn only in the brain's bounding box, with a margin for the filter.
    margin = int(np.ceil(4 * sigma))
    corners = np.argwhere(mask)
    box = tuple(
        slice(max(low - margin, 0), min(high + margin + 1, size))
        for low, high, size in zip(corners.min(axis=0), corners.max(axis=0), mask.shape)
    )
    mask_box = mask[box]
    site_index = pd.Index(effects.site_offset.index).get_indexer(covariates["site"])
    image_names = [f"{subject}_gm.nii.gz" for subject in covariates["subject"]]

    subject_rngs = (np.random.default_rng(s) for s in subject_seed.spawn(len(covariates)))
    for row, rng in enumerate(subject_rngs):
        subject = covariates.iloc[row]
        s = site_index[row]
        region_values = (
            age_fx * (subject["age"] - effects.reference_age)
            + sex_fx * (subject["sex"] == "M")
            + dx_fx * (subject["diagnosis"] == "patient")
            + site_offset[s]
            + site_scale[s]
            * with_background(_residuals(effects, 1, rng)[0], rng.normal(0.0, effects.residual_sd))
        )
        noise = ndimage.gaussian_filter(
            rng.standard_normal(mask_box.shape, dtype=np.float32), sigma, output=np.float32
        )[mask_box]
        volume = np.zeros(mask.shape, dtype=np.float32)
        volume[mask] = (
            gm_inside
            + region_values[region_of_voxel]
            + site_scale[s][region_of_voxel] * noise_gain * noise
        )
        _save(volume, affine, folder / image_names[row])

    _save(atlas, affine, folder / "atlas.nii.gz")
    table.to_csv(folder / "atlas_labels.tsv", sep="\t", index=False)
    covariates.assign(image=image_names).to_csv(folder / "covariates.tsv", sep="\t", index=False)
    (folder / "effects.json").write_text(json.dumps(effects.to_dict()))
    manifest = {**params, "files": image_names}
    (folder / "params.json").write_text(json.dumps(manifest, indent=1))


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=4)  # 4 = MNI152
    img.set_sform(affine, code=4)
    img.to_filename(path)


def _build_once(root: Path, name: str, params: dict, write, what: str, verbose: int) -> Path:
    """The folder ``root/<name>_<key of params>``, written by ``write(folder, params)`` unless
    complete. It is built under a temporary name and renamed when complete, so an interrupted
    run leaves no half-written folder; ``write`` writes ``params.json`` last."""
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    name = f"{name}_{digest}"
    folder = root / name
    if not _is_complete(folder):
        root.mkdir(parents=True, exist_ok=True)
        if verbose:
            print(f"[kwneuro_sk] writing the {what} to {folder}")
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
        try:
            write(staging, params)
            if folder.exists():  # incomplete leftover from an older run
                shutil.rmtree(folder)
            os.replace(staging, folder)
        except OSError:
            if not _is_complete(folder):  # a concurrent run did not finish it either
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    elif verbose:
        print(f"[kwneuro_sk] using the {what} in {folder}")
    return folder


def _is_complete(folder: Path) -> bool:
    manifest = folder / "params.json"
    if not manifest.is_file():
        return False
    try:
        manifest = json.loads(manifest.read_text())
        files = manifest["files"]
    except (ValueError, KeyError):
        return False
    # the demo cohort's manifest lists its subject images only
    fixed = manifest.get(
        "fixed", ["atlas.nii.gz", "atlas_labels.tsv", "covariates.tsv", "effects.json"]
    )
    return all((folder / name).is_file() for name in [*fixed, *files])


def _load_cohort(folder: Path) -> DemoCohort:
    table = pd.read_csv(folder / "atlas_labels.tsv", sep="\t", dtype={"name": str, "network": str})
    covariates = pd.read_csv(
        folder / "covariates.tsv",
        sep="\t",
        dtype={
            "subject": str,
            "site": str,
            "age": float,
            "sex": str,
            "diagnosis": str,
            "image": str,
        },
    )
    covariates["image"] = [str(folder / name) for name in covariates["image"]]
    effects = SimulatedEffects.from_dict(json.loads((folder / "effects.json").read_text()))
    return DemoCohort(
        images=covariates["image"].tolist(),
        atlas=str(folder / "atlas.nii.gz"),
        labels=table["name"].tolist(),
        labels_file=str(folder / "atlas_labels.tsv"),
        covariates=covariates,
        effects=effects,
        path=str(folder),
    )


# --------------------------------------------------------------------------------------------
# Resting-state fMRI cohort (fMRIPrep-shaped)
# --------------------------------------------------------------------------------------------

_FMRI_GENERATOR_VERSION = 1
_FMRI_NETWORKS = ("default", "visual", "motor")
_FMRI_REGIONS_PER_NETWORK = 4
_FMRI_SPACE = "MNI152NLin2009cAsym"
_FMRI_VOXEL_MM = 4.0
_FMRI_LOADING = 0.65  # loading of a region on its network's signal (subject mean)
_FMRI_DIAGNOSIS_LOADING_DROP = 0.45  # patients: lower loading of the affected default regions
_FMRI_AFFECTED_REGIONS = (0, 1)  # the first two default-mode regions
_FMRI_SITE_NOISE_SD = (1.0, 4.0)  # voxel noise (relative to the region signal), per site
_FMRI_SITE_SCALE = (0.8, 1.25)  # intensity scale, per site
_FMRI_SITE_ARTIFACT_SD = 0.6  # a scanner-specific spatial pattern of shared fluctuation


@dataclass(frozen=True)
class FMRICohort:
    """A simulated multi-site resting-state cohort written by :func:`make_fmri_cohort`.

    Attributes
    ----------
    path : str
        The fMRIPrep-shaped derivatives folder (``participants.tsv``,
        ``sub-*/func/*_desc-preproc_bold.nii.gz`` and ``*_desc-confounds_timeseries.tsv``).
    participants : pandas.DataFrame
        One row per subject: ``participant_id``, ``site``, ``age``, ``sex``, ``diagnosis``,
        ``image`` (path of the run) and ``confounds`` (path of its confounds table).
    atlas : str
        Path of the labels image (on the runs' grid): 0 is background, region ``k`` has
        value ``k``.
    labels : list of str
        Region names; ``labels[k - 1]`` names the region with value ``k``.
    labels_file : str
        TSV look-up table with columns ``index``, ``name``, ``network``.
    t_r : float
        Repetition time in seconds.
    affected_connections : list of str
        The connections the diagnosis weakens, named ``"<region>--<region>"`` as
        :class:`~kwneuro_sk.ConnectomeExtractor` names its columns.
    """

    path: str
    participants: pd.DataFrame
    atlas: str
    labels: list[str]
    labels_file: str
    t_r: float
    affected_connections: list[str]


@validate_params(
    {
        "n_subjects": [Interval(Integral, 2, None, closed="left")],
        "n_sites": [Interval(Integral, 1, None, closed="left")],
        "n_volumes": [Interval(Integral, 20, None, closed="left")],
        "t_r": [Interval(Real, 0, None, closed="neither")],
        "data_dir": [str, os.PathLike, None],
        "random_state": [Interval(Integral, 0, None, closed="left")],
        "verbose": ["verbose"],
    },
    prefer_skip_nested_validation=True,
)
def make_fmri_cohort(
    n_subjects: int = 40,
    n_sites: int = 4,
    *,
    n_volumes: int = 100,
    t_r: float = 2.0,
    data_dir: str | os.PathLike | None = None,
    random_state: int = 0,
    verbose: int = 0,
) -> FMRICohort:
    """Write (or reuse) a simulated multi-site resting-state cohort laid out as fMRIPrep does.

    Small and fast: one 4D run per subject on a (14, 10, 10) grid of 4 mm voxels, twelve
    slab-shaped regions (four in each of a ``default``, ``visual`` and ``motor`` network), made
    with no network access. Per subject:

    - **Neural signal**: each region loads on its network's slow fluctuation (loading about
      0.65, varying by subject) plus its own fluctuation, so regions of one network are
      correlated.
    - **Diagnosis**: in patients the first two default-mode regions load less on the
      default-mode signal, which weakens their connections within the network (a weak
      effect, listed in ``affected_connections``).
    - **Nuisance signals, in the confounds table**: head motion (six parameters with their
      derivatives and squares, and ``framewise_displacement``; a few sudden jumps that the
      ``scrub`` strategy removes), a physiological signal shared by the regions and seen in
      ``white_matter`` and ``csf``, slow drifts spanned by the ``cosine*`` columns, and
      ``global_signal``. Derivative columns start with ``n/a`` as in fMRIPrep.
    - **Site**: sites differ in voxel noise level (which lowers every correlation), in
      intensity scale, and in a scanner-specific spatial pattern of shared fluctuation that
      no confound captures, so a site can be recognized from its connectomes. Sites also
      differ in mean age and fraction of patients (as :func:`make_demo_cohort`).

    Files go to ``<data_dir>/fmri_cohort/<key>/`` and a complete folder is reused; the folder
    is built under a temporary name and renamed when complete. Names follow fMRIPrep:
    ``sub-001/func/sub-001_task-rest_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz``
    and ``sub-001_task-rest_desc-confounds_timeseries.tsv`` (+ ``.json``), with
    ``participants.tsv`` and ``dataset_description.json`` at the top, and the atlas under
    ``atlas/``.

    Parameters
    ----------
    n_subjects : int, default=40
        Number of subjects (one run each), at least two per site.
    n_sites : int, default=4
        Number of sites, labelled ``site1``, ``site2``, ...
    n_volumes : int, default=100
        Volumes per run (at least 20).
    t_r : float, default=2.0
        Repetition time in seconds.
    data_dir : str or path-like, default=None
        Cache root; see :func:`get_data_dir`.
    random_state : int, default=0
        Seed: the same seed gives identical files.
    verbose : int, default=0
        Print where the cohort is written or found when greater than 0.

    Returns
    -------
    FMRICohort
        Paths, the participants table (with each run and confounds path) and the ground truth.

    Examples
    --------
    >>> import tempfile
    >>> from kwneuro_sk.datasets import make_fmri_cohort
    >>> cohort = make_fmri_cohort(n_subjects=8, n_volumes=30, data_dir=tempfile.mkdtemp())
    >>> list(cohort.participants.columns)
    ['participant_id', 'site', 'age', 'sex', 'diagnosis', 'image', 'confounds']
    >>> cohort.participants["image"].str.endswith("_desc-preproc_bold.nii.gz").all()
    np.True_
    >>> len(cohort.labels), cohort.affected_connections[0]
    (12, 'default 1--default 2')
    """
    n_subjects, n_sites = _check_design(n_subjects, n_sites)
    params = {
        "generator_version": _FMRI_GENERATOR_VERSION,
        "n_subjects": n_subjects,
        "n_sites": n_sites,
        "n_volumes": int(n_volumes),
        "t_r": float(t_r),
        "random_state": int(random_state),
    }
    name = f"n{n_subjects}_sites{n_sites}_vols{int(n_volumes)}_seed{int(random_state)}"
    folder = _build_once(
        get_data_dir(data_dir) / "fmri_cohort",
        name,
        params,
        _write_fmri_cohort,
        "fMRI cohort",
        verbose,
    )
    return _load_fmri_cohort(folder)


def _fmri_atlas():
    """Twelve slabs of 8 x 8 voxels along x inside a one-voxel background border."""
    n_regions = len(_FMRI_NETWORKS) * _FMRI_REGIONS_PER_NETWORK
    atlas = np.zeros((n_regions + 2, 10, 10), dtype=np.int16)
    for region in range(n_regions):
        atlas[region + 1, 1:-1, 1:-1] = region + 1
    affine = np.diag([_FMRI_VOXEL_MM] * 3 + [1.0])
    affine[:3, 3] = -np.array(atlas.shape) * _FMRI_VOXEL_MM / 2
    networks = [net for net in _FMRI_NETWORKS for _ in range(_FMRI_REGIONS_PER_NETWORK)]
    names = [f"{net} {k % _FMRI_REGIONS_PER_NETWORK + 1}" for k, net in enumerate(networks)]
    table = pd.DataFrame({"index": np.arange(1, n_regions + 1), "name": names, "network": networks})
    return atlas, affine, table


def _affected_connections(names: list[str]) -> list[str]:
    """Connections between an affected default-mode region and another default-mode region."""
    default = [k for k in range(len(names)) if k < _FMRI_REGIONS_PER_NETWORK]
    pairs = sorted(
        {(min(a, b), max(a, b)) for a in _FMRI_AFFECTED_REGIONS for b in default if a != b}
    )
    return [f"{names[a]}--{names[b]}" for a, b in pairs]


def _slow(rng, shape, sigma=1.5):
    """Unit-variance noise smoothed along time (axis 0)."""
    values = ndimage.gaussian_filter1d(rng.standard_normal(shape), sigma, axis=0)
    return (values - values.mean(axis=0)) / values.std(axis=0)


def _with_expansions(frame: pd.DataFrame) -> pd.DataFrame:
    """fMRIPrep's expansions of each column: derivative1 (first row n/a), power2, both."""
    out = {}
    for column in frame.columns:
        values = frame[column].to_numpy()
        derivative = np.concatenate([[np.nan], np.diff(values)])
        out[column] = values
        out[f"{column}_derivative1"] = derivative
        out[f"{column}_power2"] = values**2
        out[f"{column}_derivative1_power2"] = derivative**2
    return pd.DataFrame(out)


def _simulate_run(rng, n_volumes, t_r, patient, site_noise, site_pattern, n_regions):
    """(n_volumes, n_regions) region signals and the run's fMRIPrep confounds table."""
    n_nets = len(_FMRI_NETWORKS)
    network_of = np.repeat(np.arange(n_nets), _FMRI_REGIONS_PER_NETWORK)
    loading = np.clip(_FMRI_LOADING + 0.08 * rng.standard_normal(n_regions), 0.2, 0.95)
    if patient:
        loading[list(_FMRI_AFFECTED_REGIONS)] -= _FMRI_DIAGNOSIS_LOADING_DROP
    signal = loading * _slow(rng, (n_volumes, n_nets))[:, network_of]
    signal += np.sqrt(1 - loading**2) * _slow(rng, (n_volumes, n_regions))
    signal += _FMRI_SITE_ARTIFACT_SD * _slow(rng, (n_volumes, 1)) * site_pattern

    # head motion: slow random walks (mm, rad) and a few sudden jumps
    translation = np.cumsum(0.02 * rng.standard_normal((n_volumes, 3)), axis=0)
    rotation = np.cumsum(0.0004 * rng.standard_normal((n_volumes, 3)), axis=0)
    jumps = rng.choice(np.arange(10, n_volumes - 10), size=rng.poisson(1.0), replace=False)
    for volume in jumps:
        translation[volume:] += rng.choice([-1, 1], 3) * 0.4
    motion = np.hstack([translation, rotation])
    centred = (motion - motion.mean(axis=0)) / (motion.std(axis=0) + 1e-12)
    signal += centred @ (0.3 * rng.standard_normal((6, n_regions)))
    signal[jumps] += 2.0 * rng.standard_normal((len(jumps), n_regions))

    physio = _slow(rng, (n_volumes, 1), sigma=0.7)
    signal += 0.6 * physio * rng.uniform(0.5, 1.0, n_regions)

    n_cosines = max(1, int(np.floor(2 * n_volumes * t_r / 128.0)))
    time = (np.arange(n_volumes) + 0.5) / n_volumes
    cosines = np.column_stack([np.cos(np.pi * time * k) for k in range(1, n_cosines + 1)])
    cosines *= np.sqrt(2.0 / n_volumes)
    signal += cosines @ (3.0 * rng.standard_normal((n_cosines, n_regions)))

    region_noise = site_noise / 8.0  # voxel noise averaged over a region's 64 voxels
    displacement = np.abs(np.diff(translation, axis=0)).sum(axis=1)
    displacement += 50.0 * np.abs(np.diff(rotation, axis=0)).sum(axis=1)
    dvars = np.sqrt(np.mean(np.diff(signal, axis=0) ** 2, axis=1) + region_noise**2)
    columns = {
        "global_signal": signal.mean(axis=1),
        "csf": 0.8 * physio[:, 0] + 0.3 * rng.standard_normal(n_volumes),
        "white_matter": physio[:, 0] + 0.3 * rng.standard_normal(n_volumes),
    }
    columns.update(zip(["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"], motion.T))
    table = _with_expansions(pd.DataFrame(columns))
    table.insert(0, "framewise_displacement", np.concatenate([[np.nan], displacement]))
    table.insert(0, "std_dvars", np.concatenate([[np.nan], dvars / np.median(dvars)]))
    table.insert(0, "dvars", np.concatenate([[np.nan], dvars]))
    for k in range(n_cosines):
        table[f"cosine{k:02d}"] = cosines[:, k]
    return signal, table


def _write_fmri_cohort(folder: Path, params: dict) -> None:
    """Simulate and write every file of the fMRI cohort; params.json is written last."""
    atlas, affine, table = _fmri_atlas()
    n_regions = len(table)
    n_volumes, t_r = params["n_volumes"], params["t_r"]
    cov_seed, site_seed, subject_seed = np.random.SeedSequence(params["random_state"]).spawn(3)
    participants = _simulate_covariates(
        params["n_subjects"], params["n_sites"], np.random.default_rng(cov_seed)
    ).rename(columns={"subject": "participant_id"})
    sites = _site_names(params["n_sites"])
    site_rng = np.random.default_rng(site_seed)
    noise_sd = dict(zip(sites, site_rng.permutation(_spread(_FMRI_SITE_NOISE_SD, len(sites)))))
    scale = dict(zip(sites, site_rng.permutation(_spread(_FMRI_SITE_SCALE, len(sites)))))
    pattern = {site: site_rng.standard_normal(n_regions) for site in sites}
    baseline = 100.0 + 10.0 * site_rng.random(n_regions)

    region_of_voxel = atlas.ravel().astype(np.intp)  # 0: background inside the box
    files, images, confounds = [], [], []
    rngs = (np.random.default_rng(s) for s in subject_seed.spawn(len(participants)))
    for row, rng in zip(participants.itertuples(index=False), rngs):
        signal, confounds_table = _simulate_run(
            rng,
            n_volumes,
            t_r,
            row.diagnosis == "patient",
            noise_sd[row.site],
            pattern[row.site],
            n_regions,
        )
        background = 0.3 * _slow(rng, (n_volumes, 1))
        values = np.hstack([background, signal]) + np.concatenate([[100.0], baseline])
        voxels = values[:, region_of_voxel]
        voxels += noise_sd[row.site] * rng.standard_normal(voxels.shape)
        data = (scale[row.site] * voxels).T.reshape(atlas.shape + (n_volumes,))
        func = Path(row.participant_id) / "func"
        (folder / func).mkdir(parents=True)
        stem = f"{row.participant_id}_task-rest"
        image = func / f"{stem}_space-{_FMRI_SPACE}_desc-preproc_bold.nii.gz"
        tsv = func / f"{stem}_desc-confounds_timeseries.tsv"
        img = nib.Nifti1Image(data.astype(np.float32), affine)
        img.header.set_xyzt_units("mm", "sec")
        img.header["pixdim"][4] = t_r
        img.to_filename(folder / image)
        confounds_table.to_csv(folder / tsv, sep="\t", index=False, na_rep="n/a")
        sidecar = tsv.with_suffix(".json")
        (folder / sidecar).write_text(json.dumps({"RepetitionTime": t_r}))
        files += [str(image), str(tsv), str(sidecar)]
        images.append(str(image))
        confounds.append(str(tsv))

    (folder / "atlas").mkdir()
    _save(atlas, affine, folder / "atlas" / "atlas.nii.gz")
    table.to_csv(folder / "atlas" / "atlas_labels.tsv", sep="\t", index=False)
    participants.to_csv(folder / "participants.tsv", sep="\t", index=False)
    description = {
        "Name": "kwneuro_sk simulated multi-site resting-state cohort",
        "BIDSVersion": "1.8.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "kwneuro_sk.datasets.make_fmri_cohort"}],
    }
    (folder / "dataset_description.json").write_text(json.dumps(description, indent=1))
    fixed = ["atlas/atlas.nii.gz", "atlas/atlas_labels.tsv", "participants.tsv"]
    manifest = {**params, "fixed": fixed, "files": files, "images": images, "confounds": confounds}
    (folder / "params.json").write_text(json.dumps(manifest, indent=1))


def _load_fmri_cohort(folder: Path) -> FMRICohort:
    manifest = json.loads((folder / "params.json").read_text())
    participants = pd.read_csv(
        folder / "participants.tsv",
        sep="\t",
        dtype={"participant_id": str, "site": str, "age": float, "sex": str, "diagnosis": str},
    )
    participants["image"] = [str(folder / name) for name in manifest["images"]]
    participants["confounds"] = [str(folder / name) for name in manifest["confounds"]]
    table = pd.read_csv(
        folder / "atlas" / "atlas_labels.tsv", sep="\t", dtype={"name": str, "network": str}
    )
    labels = table["name"].tolist()
    return FMRICohort(
        path=str(folder),
        participants=participants,
        atlas=str(folder / "atlas" / "atlas.nii.gz"),
        labels=labels,
        labels_file=str(folder / "atlas" / "atlas_labels.tsv"),
        t_r=float(manifest["t_r"]),
        affected_connections=_affected_connections(labels),
    )


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_design(n_subjects, n_sites) -> tuple[int, int]:
    """Both already validated as integers; here only what ties them together."""
    if n_subjects < 2 * n_sites:
        raise ValueError(
            f"n_subjects must be at least 2 per site (2 * n_sites = {2 * n_sites}), "
            f"got {n_subjects}."
        )
    return int(n_subjects), int(n_sites)


def _require_columns(frame, columns, name):
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"{name} must be a pandas DataFrame, got {type(frame).__name__}.")
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise ValueError(f"{name} is missing the columns {missing}.")
