"""kwneuro_sk: multi-site neuroimaging harmonization and region extraction for scikit-learn."""

from kwneuro_sk.combat import CombatEstimates, CombatHarmonizer

__version__ = "0.1.0"

__all__ = ["CombatEstimates", "CombatHarmonizer"]
