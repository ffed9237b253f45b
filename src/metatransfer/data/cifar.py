"""FC100 and CIFAR-FS, built from the CIFAR-100 python archive ``cifar-100-python/``.

``data.root`` is the folder holding ``cifar-100-python/`` (or that folder itself) with the
``train``, ``test`` and ``meta`` pickles of the official archive. Each few-shot class
takes all 600 images of a CIFAR-100 class (500 from ``train``, then 100 from ``test``).

- ``fc100`` (Oreshkin et al. 2018): classes grouped by superclass, 12/4/4 superclasses
  = 60/20/20 classes, from ``data/splits/fc100``.
- ``cifarfs`` (Bertinetto et al. 2019): 64/16/20 classes, from ``data/splits/cifarfs``.

Splits ``train``, ``val``, ``test`` and ``trainval``. Class names are the CIFAR-100 fine
names, labels in sorted name order; 32x32 RGB by default (resized with Lanczos when
``data.image_size`` differs). Pickles are read with an unpickler that only builds plain
containers and numpy arrays, so a hostile file cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..errors import DataError
from ..preprocessing import DIRECT, Decoding, canonical_resize
from .base import ImageSplit
from .cache import cache_key, cache_root, cached_shape, cached_uint8, files_fingerprint
from .images import FORMAT_VERSION, decoding_args, packaged_split, require_root
from .registry import register_dataset

DEFAULT_SIZE = 32
MEAN = (0.5071, 0.4865, 0.4409)
STD = (0.2673, 0.2564, 0.2762)
LAYOUT = "cifar-100-python/ with the train, test and meta pickles"
FIX = "re-extract cifar-100-python.tar.gz"
SPLITS = ("train", "val", "test", "trainval")

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def archive_dir(root: Path) -> Path:
    """The folder with the pickles: ``root/cifar-100-python`` or ``root`` itself."""
    inner = root / "cifar-100-python"
    if inner.is_dir():
        return inner
    if (root / "meta").exists() or (root / "train").exists():
        return root
    raise DataError(f"cifar: {inner} is absent; unpack cifar-100-python.tar.gz into {root}")


def read_pickle(path: Path) -> dict:
    """A CIFAR pickle as a dict with str keys, or a one-line :class:`DataError`."""
    if not path.exists():
        raise DataError(f"{path} is absent; {FIX} so that train, test and meta are there")
    if path.is_dir():
        raise DataError(f"{path} is a folder where the CIFAR-100 pickle file is expected; {FIX}")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty (0 bytes); {FIX}")
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # truncated or foreign files fail in many ways, all the same fix
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise DataError(f"{path} is not a readable CIFAR-100 pickle ({reason}); {FIX}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} holds a {type(obj).__name__}, not the CIFAR-100 dict; {FIX}")
    return {k.decode() if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _names(meta: dict, key: str, count: int, path: Path) -> list[str]:
    names = meta.get(key)
    if not isinstance(names, list) or len(names) != count:
        raise DataError(f"{path}: '{key}' should list {count} names; {FIX}")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def read_images(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``data`` (n, 3072) uint8, fine and coarse labels of a train/test pickle, checked."""
    batch = read_pickle(path)
    for key in ("data", "fine_labels", "coarse_labels"):
        if key not in batch:
            raise DataError(f"{path} has no '{key}' entry, so it is not a CIFAR-100 pickle; {FIX}")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072 \
            or data.dtype != np.uint8:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise DataError(f"{path}: 'data' is {dtype} of shape {shape}, expected (n, 3072) uint8 "
                        f"(32x32 RGB); {FIX}")
    fine = np.asarray(batch["fine_labels"], dtype=np.int64)
    coarse = np.asarray(batch["coarse_labels"], dtype=np.int64)
    if fine.shape != (len(data),) or coarse.shape != (len(data),):
        raise DataError(f"{path}: {len(data)} images but {fine.size} fine and {coarse.size} "
                        f"coarse labels; {FIX}")
    if len(data) and (fine.min() < 0 or fine.max() >= 100 or coarse.min() < 0
                      or coarse.max() >= 20):
        raise DataError(f"{path}: labels out of range (fine 0-99, coarse 0-19); {FIX}")
    return data, fine, coarse


def _split_list(dataset: str, split: str) -> list:
    if split not in SPLITS:
        raise DataError(f"{dataset}: splits are {', '.join(SPLITS)}, not '{split}'; choose one")
    parts = ("train", "val") if split == "trainval" else (split,)
    return [item for p in parts for item in json.loads(packaged_split(dataset, f"{p}.json"))]


def _fine_classes(dataset: str, split: str, fine_names: list[str], coarse_names: list[str],
                  fine_to_coarse: dict[int, int], meta_path: Path) -> list[int]:
    """Fine label ids of a split's classes, in sorted class-name order."""
    wanted = _split_list(dataset, split)
    if dataset == "fc100":
        ids = []
        for name in wanted:
            if name not in coarse_names:
                raise DataError(f"fc100: the {split} list names superclass '{name}', which "
                                f"{meta_path} does not have; {FIX}")
            coarse = coarse_names.index(name)
            ids += [f for f, c in fine_to_coarse.items() if c == coarse]
    else:
        ids = []
        for _, name in wanted:
            if name not in fine_names:
                raise DataError(f"cifarfs: the {split} list names class '{name}', which "
                                f"{meta_path} does not have; {FIX}")
            ids.append(fine_names.index(name))
    return sorted(set(ids), key=lambda i: fine_names[i])


def _decode(images: np.ndarray, steps: Decoding) -> np.ndarray:
    """``(n, 32, 32, 3)`` uint8 RGB rows decoded with ``steps`` (mode, size, polarity)."""
    if steps.channels == 3 and steps.size == images.shape[1] and steps.resize == DIRECT:
        return steps.pixels(images)
    return np.stack([steps.decode_array(im) for im in images])


def load_cifar(cfg: DataConfig, split: str, dataset: str) -> ImageSplit:
    """One split of FC100 or CIFAR-FS, decoded once into the uint8 cache."""
    root = require_root(dataset, cfg.root, LAYOUT)
    folder = archive_dir(root)
    sources = [folder / "train", folder / "test", folder / "meta"]
    for path in sources:  # clear messages before fingerprinting
        if not path.is_file():
            kind = "a folder" if path.is_dir() else "absent"
            raise DataError(f"{path} is {kind}, where the CIFAR-100 pickle file is expected; "
                            f"{FIX}")
    size = cfg.image_size or DEFAULT_SIZE
    args = decoding_args(cfg, channels=3, mean=MEAN, std=STD)
    steps = Decoding(size, args["channels"], canonical_resize(cfg.resize), args["invert"])
    lists = hashlib.sha256(json.dumps(_split_list(dataset, split)).encode()).hexdigest()[:16]
    key = cache_key(dataset=dataset, split=split, files=files_fingerprint(sources), lists=lists,
                    size=size, version=FORMAT_VERSION, **steps.cache_parts(),
                    **({"channels": steps.channels} if steps.channels != 3 else {}))
    directory = cache_root(cfg.cache_dir) / dataset
    shape = cached_shape(directory, key)

    def build() -> tuple[list[np.ndarray], np.ndarray, list[str]]:
        """Images (one part per pickle), labels and class names of the split."""
        meta = read_pickle(sources[2])
        fine_names = _names(meta, "fine_label_names", 100, sources[2])
        coarse_names = _names(meta, "coarse_label_names", 20, sources[2])
        loaded = [read_images(p) for p in sources[:2]]
        fine_to_coarse: dict[int, int] = {}
        for _, fine, coarse in loaded:
            fine_to_coarse.update(zip(fine.tolist(), coarse.tolist(), strict=True))
        ids = _fine_classes(dataset, split, fine_names, coarse_names, fine_to_coarse, sources[2])
        names = [fine_names[i] for i in ids]
        lookup = np.full(100, -1, dtype=np.int64)
        lookup[ids] = np.arange(len(ids))
        parts, label_parts = [], []
        for data, fine, _ in loaded:
            keep = lookup[fine] >= 0
            parts.append(data[keep].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            label_parts.append(lookup[fine[keep]])
        labels = np.concatenate(label_parts)
        counts = np.bincount(labels, minlength=len(names))
        if (counts == 0).any():
            empty = names[int(np.argmin(counts))]
            raise DataError(f"{dataset}: class '{empty}' has no images in {sources[0]} or "
                            f"{sources[1]}; {FIX}")
        return parts, labels, names

    built = None
    if shape is None:  # no cache yet: read the pickles once to learn the row count
        built = build()
        shape = (len(built[1]), size, size, steps.channels)

    def fill(out: np.ndarray) -> dict:
        parts, labels, names = built or build()
        rows = 0
        for batch in parts:
            for start in range(0, len(batch), 1000):
                chunk = _decode(batch[start : start + 1000], steps)
                out[rows : rows + len(chunk)] = chunk
                rows += len(chunk)
        return {"labels": labels.tolist(), "class_names": names}

    array, meta = cached_uint8(directory, key, shape, fill)
    return ImageSplit(images=array, labels=np.asarray(meta["labels"], dtype=np.int64),
                      class_names=list(meta["class_names"]), name=f"{dataset}/{split}",
                      mean=args["mean"], std=args["std"], source=str(folder),
                      decoding=steps, meta={"cache_key": key})


@register_dataset("fc100")
def load_fc100(cfg: DataConfig, split: str) -> ImageSplit:
    """FC100: CIFAR-100 split by superclass (see module docstring)."""
    return load_cifar(cfg, split, "fc100")


@register_dataset("cifarfs")
def load_cifarfs(cfg: DataConfig, split: str) -> ImageSplit:
    """CIFAR-FS: CIFAR-100 split by class (see module docstring)."""
    return load_cifar(cfg, split, "cifarfs")
