"""Splitting a flat folder's classes into training, selection and report classes.

A user's photos usually come as ``root/<class>/*`` with no split folders. Few-shot
learning needs three disjoint sets of classes: the *training* classes pre-training and
meta-training fit, the *selection* classes checkpoints are chosen on, and the *report*
classes accuracy is measured on, which nothing before the report may see. The split is
drawn from ``data.split_seed`` (not the run's seed, so every training seed of a benchmark
sees the same classes) with sizes from ``data.split_fractions`` or ``data.split_counts``;
a run saves the result as ``data.class_split`` in its ``config.yaml``, so that resuming or
meta-testing it reads the same classes even after the folder changed.

Classes are disjoint by construction; :func:`shared_images` also makes sure that no
image *file* lies in two splits (a photo copied into two class folders would otherwise be
a training image and a report image at once).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..errors import DataError

ROLES = ("training", "selection", "report")
_SPLIT_TAG = 20240531  # mixed into the seed: this draw is apart from every other one


def split_names(data: DataConfig) -> tuple[str, str, str]:
    """The split names of the three roles: ``data.train_split``, ``val_split``,
    ``test_split`` (``train``, ``val``, ``test`` by default)."""
    return data.train_split, data.val_split, data.test_split


def split_sizes(total: int, fractions: list[float], counts: list[int]) -> tuple[int, int, int]:
    """Classes per role: ``counts`` when given, else ``fractions`` of ``total`` rounded by
    largest remainder (they sum to ``total``), every role with a share > 0 getting at
    least one class."""
    if counts:
        if sum(counts) > total:
            raise DataError(f"data.split_counts {list(counts)} asks for {sum(counts)} classes "
                            f"but the folder has {total}; lower the counts")
        return int(counts[0]), int(counts[1]), int(counts[2])
    wanted = [f > 0 for f in fractions]
    if total < sum(wanted):
        raise DataError(f"the folder has {total} class folder{'s' if total != 1 else ''}; "
                        f"splitting into training, selection and report classes needs at "
                        f"least {sum(wanted)}")
    raw = np.asarray(fractions, dtype=np.float64) * total
    sizes = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - sizes), kind="stable")[: total - int(sizes.sum())]:
        sizes[i] += 1
    for i in range(3):  # a role asked for gets one class, taken from the largest role
        if wanted[i] and sizes[i] == 0:
            sizes[int(np.argmax(sizes))] -= 1
            sizes[i] = 1
    return int(sizes[0]), int(sizes[1]), int(sizes[2])


def draw_class_split(class_names: list[str], data: DataConfig) -> dict[str, list[str]]:
    """``{split name: class names}`` for the three roles, drawn with ``data.split_seed``
    from the sorted class names (classes left over by ``split_counts`` go nowhere)."""
    names = sorted(class_names)
    if len(set(split_names(data))) < 3:
        raise DataError(f"data.train_split, val_split and test_split must differ to split a "
                        f"folder of classes, got {', '.join(split_names(data))}")
    sizes = split_sizes(len(names), data.split_fractions, data.split_counts)
    order = np.random.default_rng([int(data.split_seed), _SPLIT_TAG]).permutation(len(names))
    out, start = {}, 0
    for split, size in zip(split_names(data), sizes, strict=True):
        out[split] = sorted(names[i] for i in order[start:start + size])
        start += size
    return out


def class_split(class_names: list[str], data: DataConfig) -> dict[str, list[str]]:
    """The split in use: ``data.class_split`` (a run's saved one) when set, checked
    against the folder, else a fresh draw (:func:`draw_class_split`)."""
    if not data.class_split:
        return draw_class_split(class_names, data)
    have = set(class_names)
    seen: dict[str, str] = {}
    for split, names in data.class_split.items():
        for name in names:
            if name not in have:
                raise DataError(f"folder: class '{name}' of the saved split '{split}' "
                                f"(data.class_split) has no folder in {data.root}; restore "
                                "it, or start a new run to split the folder afresh")
            if name in seen:
                raise DataError(f"folder: class '{name}' is in both '{seen[name]}' and "
                                f"'{split}' of data.class_split; a class belongs to one split")
            seen[name] = split
    return {split: list(names) for split, names in data.class_split.items()}


def shared_images(files_by_split: dict[str, list[Path]]) -> list[tuple[Path, Path]]:
    """Pairs of byte-identical files that lie in two different splits (first pair per
    content). Only files of equal size are read, so this costs little on real photos."""
    by_size: dict[int, list[tuple[str, Path]]] = defaultdict(list)
    for split, paths in files_by_split.items():
        for path in paths:
            by_size[path.stat().st_size].append((split, path))
    pairs = []
    for group in by_size.values():
        if len({split for split, _ in group}) < 2:
            continue
        copies: dict[str, list[tuple[str, Path]]] = defaultdict(list)
        for split, path in group:
            copies[hashlib.sha256(path.read_bytes()).hexdigest()].append((split, path))
        for (split, path), *rest in copies.values():
            other = next((p for s, p in rest if s != split), None)
            if other is not None:
                pairs.append((path, other))
    return pairs


def require_disjoint_images(files_by_split: dict[str, list[Path]]) -> None:
    """A :class:`DataError` when some image file lies in two splits (see
    :func:`shared_images`)."""
    pairs = shared_images(files_by_split)
    if pairs:
        a, b = pairs[0]
        more = f" ({len(pairs)} such pairs)" if len(pairs) > 1 else ""
        raise DataError(f"folder: {a} and {b} are the same image in two splits{more}; an "
                        "image must belong to one class only: delete one of the copies")
