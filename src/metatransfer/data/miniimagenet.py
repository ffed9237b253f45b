"""miniImageNet: ``images/*.jpg`` + ``<split>.csv`` (Ravi & Larochelle), or class folders.

``layout``: ``csv`` reads ``root/<split>.csv`` (header ``filename,label``) naming files in
``root/images/``; ``folder`` reads ``root/<split>/<wnid>/*.jpg`` (the MTL authors' layout);
``auto`` uses the CSV when it exists, else the folder. Any split with a CSV or a folder can
be read. Images are RGB, 84x84 by default (set ``data.image_size=80`` for the authors'
PyTorch setting). Normalisation uses the miniImageNet statistics of the MTL code.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..errors import ConfigError, DataError
from .base import ImageSplit
from .folder import flatten, scan_class_folders, split_dir
from .images import decoding_args, load_image_files, require_root
from .registry import register_dataset

DEFAULT_SIZE = 84
MEAN = (120.39586422 / 255, 115.59361427 / 255, 104.54012653 / 255)
STD = (70.68188272 / 255, 68.27635443 / 255, 72.54505529 / 255)
LAYOUT = "images/*.jpg with train.csv, val.csv, test.csv (filename,label), or train/ val/ test/ " \
         "class folders"
HEADERS = (["filename", "label"], ["filename", "class"])


def read_split_csv(path: Path) -> tuple[list[str], list[str], list[int]]:
    """Filenames, labels and line numbers of a ``filename,label`` CSV."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except IsADirectoryError:
        raise DataError(f"{path} is a folder where the split CSV file is expected") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} cannot be read ({exc.__class__.__name__}); restore the file") \
            from None
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        raise DataError(f"{path} is empty; it needs a 'filename,label' header and one row per "
                        f"image")
    header = [h.strip().lower() for h in rows[0]]
    if header not in HEADERS:
        raise DataError(f"{path}: header is '{','.join(rows[0])}' but 'filename,label' is "
                        f"expected; fix the first line")
    files, labels, lines = [], [], []
    first_line: dict[str, int] = {}
    for number, row in enumerate(rows[1:], 2):
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"{path} line {number}: expected 'filename,label', got "
                            f"'{','.join(row)}'; fix that line")
        name = row[0].strip()
        if name in first_line:
            raise DataError(f"{path} line {number} lists {name} again (first on line "
                            f"{first_line[name]}); each image may appear once, remove one")
        first_line[name] = number
        files.append(name)
        labels.append(row[1].strip())
        lines.append(number)
    if not files:
        raise DataError(f"{path} lists no images; add 'filename,label' rows")
    return files, labels, lines


def _csv_split(root: Path, split: str, csv_path: Path):
    images = root / "images"
    if not images.is_dir():
        raise DataError(f"miniimagenet: {images} is absent; {csv_path.name} names files in "
                        f"images/, put the .jpg files there")
    files, label_strs, lines = read_split_csv(csv_path)
    names = sorted(set(label_strs))
    index = {n: i for i, n in enumerate(names)}
    paths = [images / f for f in files]
    labels = np.array([index[s] for s in label_strs], dtype=np.int64)
    line_of = {str(p): n for p, n in zip(paths, lines, strict=True)}

    def missing(p: Path) -> str:
        return (f"{csv_path} line {line_of.get(str(p), '?')} names {p.name}, which is not in "
                f"{images}; restore the file or remove the line")

    return paths, labels, names, missing, str(csv_path)


def _absent(root: Path, split: str) -> DataError:
    have = sorted(p.name for p in root.glob("*.csv")) + sorted(
        p.name + "/" for p in root.iterdir() if p.is_dir() and p.name != "images")
    found = f"this root has {', '.join(have)}" if have else "this root has no split files"
    return DataError(f"miniimagenet: split file {root / (split + '.csv')} is absent ({found}); "
                     f"put {split}.csv beside images/ or choose another split")


@register_dataset("miniimagenet")
def load(cfg: DataConfig, split: str) -> ImageSplit:
    """One split of miniImageNet in either on-disk layout (see module docstring)."""
    root = require_root("miniimagenet", cfg.root, LAYOUT)
    if cfg.layout not in ("auto", "csv", "folder"):
        raise ConfigError(f"data.layout must be auto, csv or folder for miniimagenet, "
                          f"got '{cfg.layout}'")
    csv_path = root / f"{split}.csv"
    layout = cfg.layout
    if layout == "auto":
        if csv_path.exists():
            layout = "csv"
        elif (root / split).is_dir() or not (root / "images").is_dir():
            layout = "folder"
        else:
            raise _absent(root, split)
    if layout == "csv":
        if not csv_path.exists():
            raise _absent(root, split)
        paths, labels, names, missing, source = _csv_split(root, split, csv_path)
    else:
        folder = split_dir("miniimagenet", root, split)
        paths, labels, names = flatten(scan_class_folders("miniimagenet", folder))
        missing, source = None, str(folder)
    return load_image_files(
        dataset="miniimagenet", split=split, paths=paths, labels=labels, class_names=names,
        size=cfg.image_size or DEFAULT_SIZE,
        **decoding_args(cfg, channels=3, mean=MEAN, std=STD),
        cache_dir=cfg.cache_dir, skip_corrupt=cfg.skip_corrupt, source=source, missing=missing,
    )
