"""A folder of class sub-folders: ``root/<split>/<class>/*.{jpg,png,...}`` (the user's data).

Any sub-folder of ``root`` is a split, so ``trainval`` or ``novel`` work as well as
``train``/``val``/``test``. Images are read as RGB whatever their type and resized to
``data.image_size`` (84 by default), as stored; ``data.channels=1`` reads them as
grayscale and ``data.invert=true`` inverts them (both are set from a checkpoint's
preprocessing in meta-test). The same scan serves the folder layouts of
miniImageNet and tieredImageNet.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..errors import DataError
from .base import ImageSplit
from .images import (
    IMAGE_EXTENSIONS,
    decoding_args,
    is_image_file,
    load_image_files,
    require_root,
)
from .registry import register_dataset

LAYOUT = "one sub-folder per split (train/, val/, test/) holding one folder of images per class"
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


def scan_class_folders(dataset: str, folder: Path) -> dict[str, list[Path]]:
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
                raise DataError(f"{dataset}: {entry} lies directly in the split folder; move it "
                                f"into a folder named after its class")
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


@register_dataset("folder")
def load(cfg: DataConfig, split: str) -> ImageSplit:
    """Any ``root/<split>/<class>/*`` tree, as RGB at ``image_size`` (84 by default)."""
    root = require_root("folder", cfg.root, LAYOUT)
    folder = split_dir("folder", root, split)
    paths, labels, names = flatten(scan_class_folders("folder", folder))
    return load_image_files(
        dataset="folder", split=split, paths=paths, labels=labels, class_names=names,
        size=cfg.image_size or DEFAULT_SIZE,
        **decoding_args(cfg, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD),
        cache_dir=cfg.cache_dir, skip_corrupt=cfg.skip_corrupt, source=str(folder),
    )
