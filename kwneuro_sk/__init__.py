"""kwneuro_sk: multi-site neuroimaging harmonization and region extraction for scikit-learn."""

from kwneuro_sk.combat import CombatEstimates, CombatHarmonizer, CovBatHarmonizer, SiteSummary
from kwneuro_sk.connectomes import ConnectomeExtractor
from kwneuro_sk.fmriprep import fmriprep_cohort
from kwneuro_sk.maskers import LabelsMasker
from kwneuro_sk.volumes import VolumeEstimates, harmonize_volumes

__version__ = "0.1.0"

__all__ = [
    "CombatEstimates",
    "CombatHarmonizer",
    "ConnectomeExtractor",
    "CovBatHarmonizer",
    "LabelsMasker",
    "SiteSummary",
    "VolumeEstimates",
    "fmriprep_cohort",
    "harmonize_volumes",
]
