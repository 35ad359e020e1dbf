"""Voxel-wise ComBat on images: :func:`harmonize_volumes`, :class:`VolumeEstimates` and
:func:`apply_volumes`.

``memory`` reads the in-mask voxels of every volume into one matrix; ``streaming`` (with
``output_dir``) reads them in chunks of voxels and writes files, in memory that does not grow
with the number of subjects; ``estimates`` holds the fitted voxel-wise model and applies it to
new images; ``maps`` writes its site effects as images; ``inputs`` holds what they share.
"""

from kwneuro_sk.volumes.estimates import VolumeEstimates, apply_volumes
from kwneuro_sk.volumes.maps import site_effect_maps
from kwneuro_sk.volumes.memory import harmonize_volumes

__all__ = ["VolumeEstimates", "apply_volumes", "harmonize_volumes", "site_effect_maps"]
