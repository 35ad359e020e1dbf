"""ComBat: the model's math (:mod:`.model`) and its scikit-learn estimator (:mod:`.harmonizer`)."""

from kwneuro_sk.combat.covbat import CovBatHarmonizer
from kwneuro_sk.combat.estimates import CombatEstimates
from kwneuro_sk.combat.harmonizer import CombatHarmonizer
from kwneuro_sk.combat.summary import SiteSummary

__all__ = ["CombatEstimates", "CombatHarmonizer", "CovBatHarmonizer", "SiteSummary"]
