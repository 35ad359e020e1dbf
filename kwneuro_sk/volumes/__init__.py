"""Voxel-wise ComBat on images: :func:`harmonize_volumes` and :func:`apply_volumes`.

``memory`` reads the in-mask voxels of every volume into one matrix; ``streaming`` (with
``output_dir``) reads them in chunks of voxels and writes files, in memory that does not grow
with the number of subjects; ``inputs`` holds what both share.
"""

from kwneuro_sk.combat.estimates import CombatEstimates
from kwneuro_sk.volumes.memory import apply_volumes, harmonize_volumes

__all__ = ["CombatEstimates", "apply_volumes", "harmonize_volumes"]
