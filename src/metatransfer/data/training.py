"""The classes each training phase trains on and selects its checkpoints on.

Pre-training and meta-training draw their batches and tasks from the train split
(``data.train_split``; with ``data.meta_holdout`` each from its own share of its classes)
and select checkpoints on few-shot episodes of a *selection* split: ``data.val_split``, or,
with ``data.selection_holdout``, classes set apart from the train split (whole Omniglot
alphabets), so that the val split stays unseen until it is reported on. Both phases and
the pre-flight check call :func:`training_splits`, so they agree on every class.
"""

from __future__ import annotations

from ..config import DataConfig
from .base import ImageSplit, class_share, selection_share
from .registry import load_split


def training_splits(data: DataConfig, phase: str) -> tuple[ImageSplit, ImageSplit]:
    """``(train, selection)`` splits of ``phase`` (``pretrain`` or ``meta``)."""
    train = load_split(data, data.train_split)
    if data.selection_holdout > 0:
        train, selection = selection_share(train, data.selection_holdout)
    else:
        selection = load_split(data, data.val_split)
    return class_share(train, data.meta_holdout, phase), selection


def evaluation_split(data: DataConfig, name: str) -> ImageSplit:
    """The split meta-test reports on: ``name`` as on disk, or for ``selection`` the
    classes checkpoints are selected on (:func:`training_splits`), so settings can be
    looked at and tuned there and the val / test classes stay unseen until reported."""
    if name == "selection":
        return training_splits(data, "meta")[1]
    return load_split(data, name)


def selection_name(data: DataConfig) -> str:
    """Where checkpoints are selected, in words (for logs and results)."""
    if data.selection_holdout > 0:
        return (f"{data.train_split} classes set apart (data.selection_holdout="
                f"{data.selection_holdout:g})")
    return data.val_split
