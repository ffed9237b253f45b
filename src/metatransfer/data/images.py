"""Decode image files once into a uint8 cache, with one-line errors a user can act on.

Every file-based format (miniImageNet, tieredImageNet, Omniglot, user folders) lists its
files and labels, then calls :func:`load_image_files`, which decodes and resizes each file
exactly once into a memory-mapped ``.npy`` (rows written one by one, so peak memory is
the uint8 array) and memory-maps it on every later load.

Resizing (``data.resize``, see :mod:`metatransfer.preprocessing`): by default straight to
``size x size`` with Lanczos (what the usual 84x84 miniImageNet and
28x28 Omniglot files were made with); large JPEGs are first reduced by the decoder
(``draft``), which is much faster and loses nothing at these small target sizes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ..config import DATA_ENV, DATA_PLACEHOLDER, DataConfig, data_search_path
from ..errors import DataError
from ..preprocessing import (
    Decoding,
    cache_key_policy,
    canonical_resize,
    channel_count,
    parse_resize,
    polarity,
    stats_for,
)
from .base import ImageSplit
from .cache import cache_key, cache_root, cached_uint8, files_fingerprint

log = logging.getLogger(__name__)

#: Bump when decoding or resizing changes, so old caches are not reused.
FORMAT_VERSION = 1

#: File suffixes read as images in folder layouts (compared lower-case).
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)

_CHUNK = 256  # files decoded per thread-pool round: bounds memory held in flight
SKIP_HINT = "replace the file, or set data.skip_corrupt=true to skip unreadable images"


class CorruptImageError(DataError):
    """An image file that exists but cannot be decoded (skippable with ``skip_corrupt``)."""


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def read_image(path: Path, size: int, channels: int, invert: bool = False,
               resize: str = "direct") -> np.ndarray:
    """One file as ``(size, size, channels)`` uint8; ``invert`` flips grey levels (ink);
    ``resize`` is the policy of :mod:`metatransfer.preprocessing` (``direct`` or ``crop:N``).
    See :func:`decode_file`."""
    return decode_file(path, Decoding(size, channels, canonical_resize(resize), invert))


def decode_file(path: Path, steps: Decoding) -> np.ndarray:
    """One file as a ``(size, size, channels)`` uint8 row, decoded with ``steps``.

    Raises :class:`CorruptImageError` for a directory, an empty file or undecodable bytes,
    and :class:`DataError` for a missing file.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        raise DataError(f"{path} does not exist; restore it or remove it from the split") from None
    if stat.S_ISDIR(info.st_mode):
        raise CorruptImageError(
            f"{path} is a directory where an image file is expected; move it out of the dataset"
        )
    if info.st_size == 0:
        raise CorruptImageError(f"{path} is empty (0 bytes); {SKIP_HINT}")
    try:
        with Image.open(path) as im:
            target = parse_resize(steps.resize) or steps.size
            if im.format == "JPEG" and min(im.size) > 2 * target:
                im.draft(steps.mode, (target, target))
            return steps.decode(im)
    except UnidentifiedImageError:
        raise CorruptImageError(f"{path} is not a readable image; {SKIP_HINT}") from None
    except Exception as exc:  # any decoder failure on a damaged file means the same thing
        reason = (str(exc).splitlines() or [type(exc).__name__])[0].replace(str(path), "file")
        raise CorruptImageError(f"{path} cannot be decoded ({reason}); {SKIP_HINT}") from None


def decoding_args(cfg: DataConfig, *, channels: int, mean: tuple[float, ...],
                  std: tuple[float, ...], invert: bool = False) -> dict:
    """The colour, polarity and statistics arguments of :func:`load_image_files` for a
    dataset whose own images have ``channels`` channels, polarity ``invert`` and channel
    statistics ``mean``/``std``, decoded as ``cfg`` asks (``data.channels``,
    ``data.invert``, ``data.resize``: a checkpoint's, or the user's)."""
    want_channels = channel_count(cfg.channels, channels)
    want_invert = polarity(cfg.invert, invert)
    mean, std = stats_for(mean, std, want_channels, want_invert != invert)
    return {"channels": want_channels, "invert": want_invert, "mean": mean, "std": std,
            "resize": cfg.resize}


def _try_read(read: Callable[[Path], np.ndarray], path: Path) -> np.ndarray | CorruptImageError:
    try:
        return read(path)
    except CorruptImageError as exc:
        return exc


def fill_rows(
    out: np.ndarray,
    paths: Sequence[Path],
    read: Callable[[Path], np.ndarray],
    *,
    skip_corrupt: bool,
    expand: Callable[[np.ndarray], list[np.ndarray]] | None = None,
    desc: str = "decoding",
) -> list[int]:
    """Decode ``paths`` in order into consecutive rows of ``out``; return skipped indices.

    Corrupt files raise, or with ``skip_corrupt`` are logged and skipped: later rows move
    up, so the good rows are ``out[:kept * variants]``. ``expand`` turns one image into
    several rows (e.g. rotations). A few threads overlap file reads and decoding (Pillow
    releases the GIL while decoding).
    """
    threads = min(4, os.cpu_count() or 1)
    skipped: list[int] = []
    row = 0
    with ThreadPoolExecutor(threads) as pool, tqdm(
        total=len(paths), desc=desc, unit="img", disable=None, leave=False
    ) as bar:
        for start in range(0, len(paths), _CHUNK):
            chunk = paths[start : start + _CHUNK]
            results = pool.map(lambda p: _try_read(read, p), chunk)
            for index, result in enumerate(results, start):
                if isinstance(result, CorruptImageError):
                    if not skip_corrupt:
                        raise result
                    log.warning("skipping unreadable image: %s", result)
                    skipped.append(index)
                    continue
                for image in expand(result) if expand else (result,):
                    out[row] = image
                    row += 1
            bar.update(len(chunk))
    return skipped


def fingerprint(paths: Sequence[Path], missing: Callable[[Path], str]) -> str:
    """:func:`files_fingerprint`, but a missing file is a :class:`DataError` from ``missing``."""
    try:
        return files_fingerprint(list(paths))
    except FileNotFoundError as exc:
        raise DataError(missing(Path(exc.filename))) from None
    except OSError as exc:  # e.g. a symlink loop, no permission
        raise DataError(f"{exc.filename} cannot be read ({exc.strerror}); fix or remove it") \
            from None
    except ValueError as exc:  # e.g. a NUL byte in a name listed by a CSV
        raise DataError(f"a listed file name is invalid ({exc}); fix the list") from None


def load_image_files(
    *,
    dataset: str,
    split: str,
    paths: Sequence[Path],
    labels: np.ndarray,
    class_names: list[str],
    size: int,
    channels: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    cache_dir: str | None,
    skip_corrupt: bool,
    source: str,
    missing: Callable[[Path], str] | None = None,
    invert: bool = False,
    variants: int = 1,
    expand: Callable[[np.ndarray], list[np.ndarray]] | None = None,
    variant_names: Sequence[str] = ("",),
    resize: str = "",
) -> ImageSplit:
    """Decode ``paths`` (label ``labels[i]`` each) once into the cache; return the split.

    With ``variants > 1``, ``expand`` makes that many images of each file and class ``c``
    becomes classes ``c * variants + v`` named ``class_names[c] + variant_names[v]``.
    """
    name = f"{dataset}/{split}"
    labels = np.asarray(labels, dtype=np.int64)
    if not len(paths):
        raise DataError(f"{name}: no images found under {source}; check data.root")
    fp = fingerprint(paths, missing or (lambda p: f"{p} does not exist; restore it"))
    resize = canonical_resize(resize)
    key = cache_key(
        dataset=dataset, split=split, files=fp, version=FORMAT_VERSION, size=size,
        channels=channels, invert=invert, variants=variants, variant_names=list(variant_names),
        labels=hashlib.sha256(labels.tobytes()).hexdigest()[:16],
        classes=hashlib.sha256("\n".join(class_names).encode(errors="surrogateescape"))
        .hexdigest()[:16],
        **cache_key_policy(resize),
    )
    shape = (len(paths) * variants, size, size, channels)
    steps = Decoding(size, channels, resize, invert)

    def read(path: Path) -> np.ndarray:
        return decode_file(path, steps)

    def fill(out: np.ndarray) -> dict:
        skipped = fill_rows(out, paths, read, skip_corrupt=skip_corrupt, expand=expand,
                            desc=f"decoding {name}")
        return {"skipped": skipped}

    array, meta = cached_uint8(cache_root(cache_dir) / dataset, key, shape, fill)
    skipped = meta.get("skipped", [])
    if skipped and not skip_corrupt:  # cache built with skipping; this caller wants none
        raise CorruptImageError(f"{paths[skipped[0]]} is unreadable ({len(skipped)} such files "
                                f"in {name}); {SKIP_HINT}")
    if skipped:
        log.warning("%s: %d unreadable images skipped (first: %s)", name, len(skipped),
                    paths[skipped[0]])
        labels = np.delete(labels, skipped)
        array = array[: len(labels) * variants]
    if variants > 1:
        labels = (labels[:, None] * variants + np.arange(variants)[None, :]).reshape(-1)
        class_names = [c + v for c in class_names for v in variant_names]
    counts = np.bincount(labels, minlength=len(class_names))
    if (counts == 0).any():
        empty = class_names[int(np.argmin(counts))]
        raise DataError(f"{name}: class '{empty}' has no readable images; replace its files "
                        f"or remove the class")
    return ImageSplit(images=array, labels=labels, class_names=list(class_names), name=name,
                      mean=mean, std=std, source=source, decoding=steps,
                      meta={"skipped": [str(paths[i]) for i in skipped], "cache_key": key})


def require_root(dataset: str, root: str | None, layout: str) -> Path:
    """The dataset root as a Path, or a :class:`DataError` saying what belongs there."""
    if not root:
        raise DataError(f"{dataset}: data.root is not set; pass --set data.root=PATH, a folder "
                        f"with {layout}")
    if root.startswith(DATA_PLACEHOLDER):  # a preset's root that no searched folder holds
        name = root[len(DATA_PLACEHOLDER):].lstrip("/\\")
        where = " or ".join(str(p) for p in data_search_path())
        raise DataError(f"{dataset}: no {name}/ in {where}; set {DATA_ENV} to the folder "
                        f"that holds {name}/ ({layout}), or pass --set data.root=PATH")
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"{dataset}: root {path} does not exist; put the dataset there "
                        f"({layout}) or fix data.root")
    if not path.is_dir():
        raise DataError(f"{dataset}: root {path} is a file, not a folder; set data.root to the "
                        f"folder with {layout}")
    return path


def packaged_split(folder: str, filename: str) -> str | None:
    """Text of a standard split list shipped in ``metatransfer/data/splits``, or None."""
    path = resources.files("metatransfer") / "data" / "splits" / folder / filename
    return path.read_text(encoding="utf-8") if path.is_file() else None
