"""Datasets: one module per on-disk format, all returning :class:`ImageSplit`."""

from . import glyphs  # noqa: F401  (each import registers its loader)
from .base import ImageSplit
from .registry import dataset_names, load_split, register_dataset

__all__ = ["ImageSplit", "dataset_names", "load_split", "register_dataset"]
