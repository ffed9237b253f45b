"""Datasets: one module per on-disk format, all returning :class:`ImageSplit`."""

from . import (
    cifar,  # noqa: F401  (fc100, cifarfs)
    folder,  # noqa: F401
    glyphs,  # noqa: F401  (each import registers its loader)
    miniimagenet,  # noqa: F401
    omniglot,  # noqa: F401
    tieredimagenet,  # noqa: F401
)
from .base import ImageSplit
from .registry import dataset_names, input_size, load_split, register_dataset

__all__ = ["ImageSplit", "dataset_names", "input_size", "load_split", "register_dataset"]
