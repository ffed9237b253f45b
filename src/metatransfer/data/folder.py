"""A folder of class folders, the user's own data: ``root/<class>/*`` or
``root/<split>/<class>/*`` (``*.{jpg,png,...}``).

Split folders: any sub-folder of ``root`` is a split, so ``trainval`` or ``novel`` work as
well as ``train``/``val``/``test``. Class folders only (a *flat* folder, the way photos
usually come): the classes are split into training, selection and report classes by
:mod:`.class_split` (``data.split_fractions`` or ``split_counts``, ``split_seed``), named
``data.train_split``, ``val_split`` and ``test_split``. Images are read as RGB whatever
their type and resized to ``data.image_size`` (84 by default), as stored;
``data.channels=1`` reads them as grayscale and ``data.invert=true`` inverts them (both
are set from a checkpoint's preprocessing in meta-test). The same scan serves the folder
layouts of miniImageNet and tieredImageNet.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..errors import DataError
from .base import ImageSplit
from .class_split import class_split, require_disjoint_images, split_names
from .images import (
    IMAGE_EXTENSIONS,
    decoding_args,
    is_image_file,
    load_image_files,
    require_root,
)
from .registry import register_dataset

LAYOUT = ("one folder of images per class (split into training, selection and report classes "
          "by data.split_fractions), or one sub-folder per split (train/, val/, test/) "
          "holding one folder of images per class")
DEFAULT_SIZE = 84
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def split_dir(dataset: str, root: Path, split: str) -> Path:
    """``root/split``, or a :class:`DataError` listing the splits that do exist."""
    path = root / split
    if path.is_dir():
        return path
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    have = f"found: {', '.join(found)}" if found else "it has no sub-folders"
    raise DataError(f"{dataset}: split folder {path} is absent ({have}); add it or choose "
                    f"another split")


def scan_class_folders(dataset: str, folder: Path, where: str = "the split folder"
                       ) -> dict[str, list[Path]]:
    """``{class name: sorted image paths}`` for each class sub-folder of ``folder``.

    Non-image files are ignored; an image outside a class folder, a folder inside a class
    folder and a class folder without images are errors, since each would silently change
    what the classes are.
    """
    classes: dict[str, list[Path]] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            if is_image_file(entry):
                raise DataError(f"{dataset}: {entry} lies directly in {where}; move it into a "
                                f"folder named after its class")
            continue
        files = []
        for item in sorted(entry.iterdir()):
            if item.name.startswith("."):
                continue
            if item.is_dir():
                raise DataError(f"{dataset}: {item} is a folder inside class folder {entry.name}; "
                                f"image files are expected there, move it out")
            if is_image_file(item):
                files.append(item)
        if not files:
            kinds = "/".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
            raise DataError(f"{dataset}: class folder {entry} has no images ({kinds}); add images "
                            f"or remove the folder")
        classes[entry.name] = files
    if not classes:
        raise DataError(f"{dataset}: {folder} has no class folders; put one folder of images per "
                        f"class in it")
    return classes


def flatten(classes: dict[str, list[Path]]) -> tuple[list[Path], np.ndarray, list[str]]:
    """Paths, labels (sorted class-name order) and class names of a class -> paths map."""
    names = sorted(classes)
    paths = [p for n in names for p in classes[n]]
    labels = np.repeat(np.arange(len(names)), [len(classes[n]) for n in names])
    return paths, labels, names


def is_flat(root: Path) -> bool:
    """Whether ``root`` holds class folders (``root/<class>/*``) rather than split folders.

    A sub-folder holding folders is a split; one holding only files is a class. Both kinds
    side by side are an error (a stray folder inside a class, or a class beside the
    splits), since either reading would silently drop images.
    """
    splits, classes = [], []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        inner = [p for p in entry.iterdir() if not p.name.startswith(".")]
        if any(p.is_dir() for p in inner):
            splits.append(entry)
        elif any(is_image_file(p) for p in inner):
            classes.append(entry)
    if splits and classes:
        raise DataError(f"folder: {root} mixes class folders ({classes[0].name}/ holds images) "
                        f"and split folders ({splits[0].name}/ holds folders); use "
                        "root/<class>/<image> throughout, or root/<split>/<class>/<image>")
    return not splits


def flat_classes(cfg: DataConfig, root: Path, split: str) -> dict[str, list[Path]]:
    """``{class: image paths}`` of split ``split`` of a flat folder (see :mod:`.class_split`);
    the same image file in two splits is an error."""
    classes = scan_class_folders("folder", root, where=f"{root} (one folder per class)")
    chosen = class_split(list(classes), cfg)
    if split not in chosen:
        raise DataError(f"folder: {root} holds one folder per class, split into "
                        f"{', '.join(chosen)} classes; there is no split '{split}' (choose one "
                        "of those)")
    if not chosen[split]:
        raise DataError(f"folder: split '{split}' gets no classes of {root} "
                        f"(data.split_fractions {cfg.split_fractions}, data.split_counts "
                        f"{cfg.split_counts}); give it a share")
    require_disjoint_images({name: [p for c in names for p in classes[c]]
                             for name, names in chosen.items()})
    return {c: classes[c] for c in chosen[split]}


def frozen_class_split(cfg: DataConfig) -> DataConfig:
    """``cfg`` with ``class_split`` filled in when it names a flat folder and has none yet:
    what a run saves in its config.yaml, so that its resume and its meta-test read the same
    classes. Other folders and datasets are returned as they are."""
    if cfg.name != "folder" or cfg.class_split:
        return cfg
    root = require_root("folder", cfg.root, LAYOUT)
    if not is_flat(root):
        return cfg
    classes = scan_class_folders("folder", root, where=f"{root} (one folder per class)")
    return dataclasses.replace(cfg, class_split=class_split(list(classes), cfg))


def describe_class_split(cfg: DataConfig) -> str:
    """One line on a frozen split: its sizes, split names and where it came from."""
    sizes = " / ".join(str(len(cfg.class_split.get(s, []))) for s in split_names(cfg))
    how = (f"data.split_counts {cfg.split_counts}" if cfg.split_counts
           else f"data.split_fractions {cfg.split_fractions}")
    return (f"classes split {sizes} into training / selection / report classes "
            f"({', '.join(split_names(cfg))}; {how}, data.split_seed {cfg.split_seed})")


@register_dataset("folder")
def load(cfg: DataConfig, split: str) -> ImageSplit:
    """Any ``root/<class>/*`` or ``root/<split>/<class>/*`` tree, as RGB at
    ``image_size`` (84 by default)."""
    root = require_root("folder", cfg.root, LAYOUT)
    if is_flat(root):
        classes, source = flat_classes(cfg, root, split), f"{root} ({split} classes)"
    else:
        folder = split_dir("folder", root, split)
        classes, source = scan_class_folders("folder", folder), str(folder)
    paths, labels, names = flatten(classes)
    return load_image_files(
        dataset="folder", split=split, paths=paths, labels=labels, class_names=names,
        size=cfg.image_size or DEFAULT_SIZE,
        **decoding_args(cfg, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD),
        cache_dir=cfg.cache_dir, skip_corrupt=cfg.skip_corrupt, source=source,
    )
