"""Omniglot: ``images_background/`` and ``images_evaluation/``, ``<Alphabet>/<character>/*.png``.

Either the 105x105 originals or the common 28x28 resize, resized to ``data.image_size``
(28 by default). One class per character, named ``Alphabet/characterNN``.

Split schemes (``data.split_scheme``):

- ``lake`` (default): ``test`` = all of ``images_evaluation`` (20 alphabets, 659
  characters); ``val`` = these 5 background alphabets, the alphabets of the Vinyals
  validation list: Armenian, Bengali, Early_Aramaic, Hebrew, Mkhedruli_(Georgian)
  (172 characters); ``train`` = the other 25 background alphabets (792 characters).
  ``background`` and ``evaluation`` read a whole folder.
- ``vinyals``: the character lists of Vinyals et al. (2016) shipped in
  ``data/splits/omniglot_vinyals`` (train 1028, val 172, test 423, trainval 1200
  characters), drawn from both folders.

``data.rotations=true`` adds each character rotated by 90, 180 and 270 degrees as three
new classes (``.../rot090`` etc.), as in the MAML/ProtoNet protocol, to the *training*
split only (``data.train_split``): more base classes for pre-training, while validation and
test episodes use the characters as drawn, like any new alphabet a user brings.

Ink: the files are black ink on white; we invert them so ink is bright (255) on a dark
(0) background. Zero is then "no stroke", which is what the zero padding of crops and
affine augmentation fills in. The inversion is this loader's declared preprocessing
(``ImageSplit.decoding.invert``): a model trained here records it, and ``adapt``,
``serve`` and meta-test on any other dataset invert raw files for it likewise.
``data.invert=false`` reads the files as stored (a checkpoint's polarity sets it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..errors import ConfigError, DataError
from .base import ImageSplit
from .folder import flatten, scan_class_folders
from .images import (
    decoding_args,
    is_image_file,
    load_image_files,
    packaged_split,
    require_root,
)
from .registry import register_dataset

DEFAULT_SIZE = 28
VAL_ALPHABETS = ("Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)")
FOLDERS = {"background": "images_background", "evaluation": "images_evaluation"}
# measured on the inverted 28x28 background set: ink covers about 8% of the pixels
MEAN = (0.0787,)
STD = (0.2693,)
LAYOUT = "images_background/ and images_evaluation/, each <Alphabet>/<character>/*.png"
ROTATION_NAMES = ("/rot000", "/rot090", "/rot180", "/rot270")


# the lake splits each folder serves (what verify can check when the other is absent)
LAKE_SPLITS = {"background": ("train", "val", "background"), "evaluation": ("test", "evaluation")}


def _folder(root: Path, which: str) -> Path:
    path = root / FOLDERS[which]
    if path.is_dir():
        return path
    present = [w for w in FOLDERS if (root / FOLDERS[w]).is_dir()]
    if not present:  # a wrong root, not a missing half of the dataset
        nested = [p for p in (root / "omniglot", root / "omniglot_resized")
                  if any((p / f).is_dir() for f in FOLDERS.values())]
        hint = f" (did you mean {nested[0]}?)" if nested else ""
        raise DataError(f"omniglot: {root} holds neither images_background/ nor "
                        f"images_evaluation/; set data.root (--root) to the folder that holds "
                        f"them{hint}")
    other = present[0]
    splits = ",".join(LAKE_SPLITS[other][:2] if other == "background" else LAKE_SPLITS[other])
    run_hint = "; in a run, --set eval.split=val" if other == "background" else ""
    raise DataError(f"omniglot: {path} is absent; unpack Omniglot's {FOLDERS[which]}.zip there "
                    f"(<Alphabet>/<character>/*.png), or use only the splits of "
                    f"{FOLDERS[other]}/ (mtl data verify omniglot --splits {splits}{run_hint})")


def _alphabets(folder: Path, only=None, exclude=()) -> dict[str, list[Path]]:
    """``{"Alphabet/character": pngs}`` for the alphabets of ``folder``."""
    if only is not None:
        for name in only:
            if not (folder / name).is_dir():
                raise DataError(f"omniglot: validation alphabet {folder / name} is absent; "
                                f"restore the full images_background folder")
    names = only if only is not None else sorted(
        p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes: dict[str, list[Path]] = {}
    for alphabet in names:
        if alphabet in exclude:
            continue
        for char, files in scan_class_folders("omniglot", folder / alphabet).items():
            classes[f"{alphabet}/{char}"] = files
    if not classes:
        raise DataError(f"omniglot: {folder} holds no alphabets; put <Alphabet>/<character>/*.png "
                        f"folders there")
    return classes


def _vinyals(root: Path, split: str) -> dict[str, list[Path]]:
    text = packaged_split("omniglot_vinyals", f"{split}.txt")
    if text is None:
        raise DataError(f"omniglot: the vinyals scheme has splits train, val, test and trainval, "
                        f"not '{split}'; choose one of them")
    classes: dict[str, list[Path]] = {}
    for name in (line.strip() for line in text.splitlines()):
        if not name:
            continue
        found = [root / f / name for f in FOLDERS.values() if (root / f / name).is_dir()]
        if not found:
            raise DataError(f"omniglot: the vinyals {split} list names {name}, which is in neither "
                            f"{root / FOLDERS['background']} nor {root / FOLDERS['evaluation']}; "
                            f"put both Omniglot folders under data.root")
        files = sorted(p for p in found[0].iterdir() if is_image_file(p))
        if not files:
            raise DataError(f"omniglot: class folder {found[0]} has no images; restore its .png "
                            f"files")
        classes[name] = files
    return classes


def _lake(root: Path, split: str) -> dict[str, list[Path]]:
    if split == "train":
        return _alphabets(_folder(root, "background"), exclude=VAL_ALPHABETS)
    if split == "val":
        return _alphabets(_folder(root, "background"), only=VAL_ALPHABETS)
    if split in ("test", "evaluation"):
        return _alphabets(_folder(root, "evaluation"))
    if split == "background":
        return _alphabets(_folder(root, "background"))
    raise DataError(f"omniglot: the lake scheme has splits train, val, test, background and "
                    f"evaluation, not '{split}'; choose one of them")


def _rotations(image: np.ndarray) -> list[np.ndarray]:
    return [np.rot90(image, k, axes=(0, 1)) for k in range(4)]


@register_dataset("omniglot")
def load(cfg: DataConfig, split: str) -> ImageSplit:
    """One Omniglot split (see module docstring), single channel, ink bright."""
    if cfg.split_scheme not in ("lake", "vinyals"):
        raise ConfigError(f"data.split_scheme must be lake or vinyals for omniglot, got "
                          f"'{cfg.split_scheme}'")
    root = require_root("omniglot", cfg.root, LAYOUT)
    classes = _lake(root, split) if cfg.split_scheme == "lake" else _vinyals(root, split)
    paths, labels, names = flatten(classes)
    rotate = bool(cfg.rotations) and split == cfg.train_split
    return load_image_files(
        dataset="omniglot", split=split, paths=paths, labels=labels,
        class_names=names, size=cfg.image_size or DEFAULT_SIZE,
        **decoding_args(cfg, channels=1, mean=MEAN, std=STD, invert=True),
        cache_dir=cfg.cache_dir, skip_corrupt=cfg.skip_corrupt, source=str(root),
        variants=4 if rotate else 1, expand=_rotations if rotate else None,
        variant_names=ROTATION_NAMES if rotate else ("",),
    )
