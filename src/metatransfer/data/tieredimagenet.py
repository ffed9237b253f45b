"""tieredImageNet in the folder layout ``root/{train,val,test}/<wnid>/*.jpg``.

The standard splits (351/97/160 classes, Ren et al. 2018) are checked against the class
lists shipped in ``data/splits/tieredimagenet``: a listed class missing on disk is an
error, since results would no longer be comparable; an extra folder is ignored with a
warning. Other split folders (e.g. ``trainval``) are read as they are. RGB, 84x84 by
default, ImageNet normalisation.
"""

from __future__ import annotations

import logging

from ..config import DataConfig
from ..errors import DataError
from .base import ImageSplit
from .folder import IMAGENET_MEAN, IMAGENET_STD, flatten, scan_class_folders, split_dir
from .images import decoding_args, load_image_files, packaged_split, require_root
from .registry import register_dataset

log = logging.getLogger(__name__)

DEFAULT_SIZE = 84
LAYOUT = "train/, val/ and test/, each with one folder of .jpg images per wnid"


def standard_classes(split: str) -> list[str] | None:
    """The wnids of a standard split (``train``/``val``/``test``), None for other splits."""
    text = packaged_split("tieredimagenet", f"{split}.csv")
    if text is None:
        return None
    return [line.split(",")[0].strip() for line in text.splitlines() if line.strip()]


@register_dataset("tieredimagenet")
def load(cfg: DataConfig, split: str) -> ImageSplit:
    """One split of tieredImageNet, checked against the standard class list."""
    root = require_root("tieredimagenet", cfg.root, LAYOUT)
    folder = split_dir("tieredimagenet", root, split)
    classes = scan_class_folders("tieredimagenet", folder)
    expected = standard_classes(split)
    if expected is not None:
        absent = [w for w in expected if w not in classes]
        if absent:
            more = f" and {len(absent) - 1} more" if len(absent) > 1 else ""
            raise DataError(
                f"tieredimagenet: the standard {split} list names class {absent[0]}{more}, but "
                f"{folder / absent[0]} is absent; restore the class folders of the {split} split"
            )
        extra = sorted(set(classes) - set(expected))
        if extra:
            log.warning("tieredimagenet: ignoring %d folders in %s that are not in the standard "
                        "%s list (first: %s)", len(extra), folder, split, extra[0])
        classes = {w: classes[w] for w in expected}
    paths, labels, names = flatten(classes)
    return load_image_files(
        dataset="tieredimagenet", split=split, paths=paths, labels=labels, class_names=names,
        size=cfg.image_size or DEFAULT_SIZE,
        **decoding_args(cfg, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD),
        cache_dir=cfg.cache_dir, skip_corrupt=cfg.skip_corrupt, source=str(folder),
    )
