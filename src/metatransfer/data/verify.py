"""``mtl data verify``: load each split once and report what a run would find.

Loading decodes every image (into the same cache a run uses, so verifying is never
wasted work) with ``skip_corrupt`` on, so *all* unreadable files are counted instead of
stopping at the first. A problem is anything that stops a run or silently changes what it
measures: a split that cannot be read, unreadable images, or classes shared by splits.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from ..config import DataConfig
from ..errors import MTLError
from .base import ImageSplit
from .registry import load_split

EPISODE_IMAGES = 20  # 5 shots + 15 queries, the largest standard episode per class


def _describe(split: str, data: ImageSplit) -> tuple[list[str], list[str]]:
    sizes = data.class_sizes
    h, w = data.image_size
    lines = [f"  {split}: {data.num_classes} classes, {len(data)} images, "
             f"{sizes.min()}-{sizes.max()} per class, {h}x{w}x{data.channels}"]
    problems = []
    skipped = data.meta.get("skipped", [])
    if skipped:
        problems.append(f"{split}: {len(skipped)} unreadable images, first {skipped[0]}; "
                        f"replace them or run with data.skip_corrupt=true")
    small = int((sizes < EPISODE_IMAGES).sum())
    if small:
        lines.append(f"    note: {small} classes have fewer than {EPISODE_IMAGES} images "
                     f"(5 shots + 15 queries)")
    return lines, problems


def verify_dataset(cfg: DataConfig, splits: list[str] | None = None,
                   progress: Callable[[str], None] | None = None) -> tuple[str, bool]:
    """A printable report on ``splits`` (default: the train/val/test splits of ``cfg``).

    Returns ``(report, ok)``; ``ok`` is False when any problem was found. ``progress`` is
    told which split is being read (decoding a large split takes a while). An error
    shared by several splits (e.g. a missing root) is reported once, naming them all.
    """
    splits = splits or list(dict.fromkeys([cfg.train_split, cfg.val_split, cfg.test_split]))
    probe = dataclasses.replace(cfg, skip_corrupt=True)
    lines = [f"{cfg.name} at {cfg.root}"]
    problems: list[str] = []
    errors: dict[str, list[str]] = {}  # message -> the splits it stopped
    loaded: dict[str, ImageSplit] = {}
    quiet = logging.getLogger("metatransfer.data.images")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # skipped files are summarised in the report instead
    try:
        for split in splits:
            if progress:
                progress(f"reading {cfg.name}/{split} (decodes every image once, then cached)")
            try:
                data = load_split(probe, split)
            except MTLError as exc:
                lines.append(f"  {split}: cannot be read")
                errors.setdefault(str(exc), []).append(split)
                continue
            loaded[split] = data
            split_lines, split_problems = _describe(split, data)
            lines += split_lines
            problems += split_problems
    finally:
        quiet.setLevel(level)
    problems = [f"{', '.join(names)}: {msg}" for msg, names in errors.items()] + problems
    names = list(loaded)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = sorted(set(loaded[a].class_names) & set(loaded[b].class_names))
            if shared:
                problems.append(f"{a} and {b} share {len(shared)} classes (first: {shared[0]}); "
                                f"few-shot splits must be disjoint")
    if errors and names:  # e.g. Omniglot with images_background/ only
        lines.append(f"  readable: {', '.join(names)} (check only those with --splits "
                     f"{','.join(names)})")
    if problems:
        lines.append(f"{len(problems)} problem{'s' if len(problems) > 1 else ''}:")
        lines += [f"  - {p}" for p in problems]
    else:
        lines.append("ok: no problems found")
    return "\n".join(lines), not problems
