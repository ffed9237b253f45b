"""The one interface every dataset presents to samplers and phases.

A split is a uint8 image array (possibly memory-mapped), an integer label per image and
the class names. Samplers only ever see ``indices_by_class``; phases turn index batches
into float tensors with :func:`metatransfer.data.transforms.to_tensor_batch`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from ..errors import DataError
from ..preprocessing import Decoding


@dataclass
class ImageSplit:
    """One split of one dataset, decoded once.

    Attributes:
        images: ``(n, height, width, channels)`` uint8, channels 1 or 3.
        labels: ``(n,)`` int64 in ``[0, num_classes)``.
        class_names: one name per label value.
        name: e.g. ``"miniimagenet/val"``, used in messages.
        mean, std: per-channel normalisation in ``[0, 1]`` units.
        decoding: what the loader did to every decoded image (colour mode, size, resize
            policy, ink polarity); a checkpoint trained on the split records it, so that
            every tool decodes a user's files the same way. Default: the images' own size
            and channel count, resized directly, as stored.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    name: str
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    source: str = ""  # where the images came from, for messages
    meta: dict = field(default_factory=dict)
    decoding: Decoding | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(f"{self.name}: images must be (n, h, w, c) uint8")
        if self.decoding is None:
            self.decoding = Decoding(int(self.images.shape[1]), int(self.images.shape[3]))
        if len(self.labels) != len(self.images):
            raise ValueError(
                f"{self.name}: {len(self.labels)} labels for {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.images.shape[3])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    @cached_property
    def indices_by_class(self) -> list[np.ndarray]:
        """Image indices of each class, in order."""
        order = np.argsort(self.labels, kind="stable")
        counts = np.bincount(self.labels, minlength=self.num_classes)
        return np.split(order, np.cumsum(counts)[:-1])

    @property
    def class_sizes(self) -> np.ndarray:
        return np.array([len(i) for i in self.indices_by_class])

    def shortfall(self, ways: int, per_class: int, what: str = "episodes") -> str | None:
        """Why ``ways``-way episodes with ``per_class`` images per class cannot be drawn
        from this split (one line naming the fix), or None when they can."""
        if ways > self.num_classes:
            label = what if f"{ways}-way" in what else f"{ways}-way {what}"
            return (f"{self.name}: {label} need {ways} classes but the split has "
                    f"{self.num_classes}; lower the ways")
        sizes = self.class_sizes
        enough = int((sizes >= per_class).sum())
        if enough < ways:
            small = self.class_names[int(np.argmin(sizes))]
            return (f"{self.name}: {what} need {per_class} images per class (shots + queries) "
                    f"in {ways} classes, but only {enough} classes have that many (class "
                    f"'{small}' has {sizes.min()}); lower shots or queries")
        return None

    def require(self, ways: int, per_class: int, what: str = "episodes") -> None:
        """Fail clearly when ``ways``-way episodes with ``per_class`` images can't be drawn."""
        problem = self.shortfall(ways, per_class, what)
        if problem:
            raise DataError(problem)


# ------------------------------------------------------------------ class holdout

_VARIANT = re.compile(r"/rot\d{3}$")  # Omniglot's rotated copies belong to one character
_HOLDOUT_SEED = 20190616  # fixed: the held-out classes are a property of the data, not the run


def held_out_mask(class_names: list[str], share: float) -> np.ndarray:
    """``(num_classes,)`` bool: the classes set apart for meta-training.

    ``round(share * groups)`` groups of classes, chosen by a fixed seed, where a group is
    a class with its rotated copies (so pre-training never sees any view of a held-out
    character). At least one group is held out when ``share > 0``, and at least one kept.
    """
    groups = list(dict.fromkeys(_VARIANT.sub("", n) for n in class_names))
    count = min(max(1, round(share * len(groups))), len(groups) - 1) if share > 0 else 0
    order = np.random.default_rng([len(groups), _HOLDOUT_SEED]).permutation(len(groups))
    out = {groups[i] for i in order[:count]}
    return np.array([_VARIANT.sub("", n) in out for n in class_names], dtype=bool)


def phase_classes(split: ImageSplit, share: float, phase: str) -> np.ndarray:
    """Class ids ``phase`` (``pretrain`` or ``meta``) uses under ``data.meta_holdout``;
    fails clearly when fewer than 2 are left (cheap: no images are touched)."""
    if share <= 0:
        return np.arange(split.num_classes)
    mask = held_out_mask(split.class_names, share)
    classes = np.flatnonzero(mask if phase == "meta" else ~mask)
    if len(classes) < 2:
        raise DataError(f"{split.name}: data.meta_holdout={share} leaves {len(classes)} "
                        f"class(es) for {phase}; choose a share that leaves at least 2 to each")
    return classes


def class_share(split: ImageSplit, share: float, phase: str) -> ImageSplit:
    """The part of a training split a phase uses when ``data.meta_holdout`` is ``share``.

    ``phase='pretrain'`` keeps the classes not held out, ``'meta'`` only the held-out ones;
    with ``share == 0`` both get the whole split. Meta-training on classes the frozen
    backbone never fitted makes its episodes look like test episodes, so SS learns to
    transfer instead of fitting the base classes further.
    """
    if share <= 0:
        return split
    classes = phase_classes(split, share, phase)
    return subset_classes(split, classes, f"{split.name}[{phase} classes]")


# ------------------------------------------------------------------ selection classes

_SELECTION_SEED = 20200401  # fixed, and apart from the meta-holdout's


def selection_group(class_name: str) -> str:
    """The unit classes are set apart in for checkpoint selection: the part of the name
    before the first ``/`` (Omniglot's ``Alphabet/character``: a whole alphabet, as new
    alphabets are what is reported), else the class itself."""
    return _VARIANT.sub("", class_name).split("/", 1)[0]


def selection_mask(class_names: list[str], share: float) -> np.ndarray:
    """``(num_classes,)`` bool: the training classes set apart for selection
    (``data.selection_holdout``): ``round(share * groups)`` groups, at least one, at least
    one left, chosen by a fixed seed (a property of the data, not of the run)."""
    groups = list(dict.fromkeys(selection_group(n) for n in class_names))
    if share <= 0:
        return np.zeros(len(class_names), dtype=bool)
    if len(groups) < 2:
        raise DataError(f"data.selection_holdout={share} needs at least 2 class groups in the "
                        f"training split, found {len(groups)}")
    count = min(max(1, round(share * len(groups))), len(groups) - 1)
    order = np.random.default_rng([len(groups), _SELECTION_SEED]).permutation(len(groups))
    out = {groups[i] for i in order[:count]}
    return np.array([selection_group(n) in out for n in class_names], dtype=bool)


def subset_classes(split: ImageSplit, classes: np.ndarray, name: str) -> ImageSplit:
    """``split`` restricted to ``classes`` (relabelled ``0 .. len(classes) - 1``)."""
    classes = np.asarray(classes, dtype=np.int64)
    keep = np.flatnonzero(np.isin(split.labels, classes))
    relabel = np.full(split.num_classes, -1, dtype=np.int64)
    relabel[classes] = np.arange(len(classes))
    return dataclasses.replace(
        split, images=np.ascontiguousarray(split.images[keep]),
        labels=relabel[split.labels[keep]], class_names=[split.class_names[c] for c in classes],
        name=name)


def selection_share(split: ImageSplit, share: float) -> tuple[ImageSplit, ImageSplit]:
    """``(training part, selection part)`` of a training split under
    ``data.selection_holdout``: selection gets the held-out groups' classes as drawn
    (without the rotated copies ``data.rotations`` adds, like any val or test split),
    training keeps every other class. Neither phase trains on a selection class, so the
    val split stays unseen for the report."""
    mask = selection_mask(split.class_names, share)
    plain = np.array([not _VARIANT.search(n) or n.endswith("/rot000")
                      for n in split.class_names])
    rest = subset_classes(split, np.flatnonzero(~mask), f"{split.name}[training classes]")
    chosen = subset_classes(split, np.flatnonzero(mask & plain),
                            f"{split.name}[selection classes]")
    return rest, chosen
