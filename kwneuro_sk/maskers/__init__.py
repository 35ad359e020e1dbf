"""Region extraction from images as scikit-learn transformers."""

from kwneuro_sk.maskers.labels import LabelsMasker

__all__ = ["LabelsMasker"]
