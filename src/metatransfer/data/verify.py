"""``mtl data verify``: load each split once and report what a run would find.

Loading decodes every image (into the same cache a run uses, so verifying is never
wasted work) with ``skip_corrupt`` on, so *all* unreadable files are counted instead of
stopping at the first. A problem is anything that stops a run or silently changes what it
measures: a split that cannot be read, unreadable images, classes shared by splits, or a
split too small for the episodes the config draws from it (:func:`episode_needs`, the
same checks ``mtl run`` makes before it starts). A flat folder's classes are split first,
as a run splits them, and each split's line says which classes it gets.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from ..config import DataConfig, RunConfig, eval_split
from ..errors import MTLError
from .base import ImageSplit
from .registry import load_split

EPISODE_IMAGES = 20  # 5 shots + 15 queries, the largest standard episode per class
SHOWN_CLASSES = 8  # class names listed per split of a flat folder

#: An episode shape a run draws from a split: ways, images per class (shots + queries)
#: and what the episodes are for, in words.
Need = tuple[int, int, str]


def episode_needs(cfg: RunConfig) -> dict[str, list[Need]]:
    """``{split name: episode shapes}`` that ``mtl run`` with ``cfg`` checks before it
    starts (:func:`metatransfer.runs.preflight`): selection episodes of both training
    phases, meta-training tasks and every test setting. Splits carved out of the train
    split (``data.selection_holdout``, ``data.meta_holdout``) are left to the run."""
    dc, pc, mc, ec = cfg.data, cfg.pretrain, cfg.meta, cfg.eval
    needs: dict[str, list[Need]] = {}

    def add(split: str, ways: int, per_class: int, what: str) -> None:
        shapes = needs.setdefault(split, [])
        if all((w, n) != (ways, per_class) for w, n, _ in shapes):
            shapes.append((ways, per_class, what))

    if dc.selection_holdout <= 0:
        add(dc.val_split, pc.val_ways, pc.val_shots + pc.val_queries,
            "pre-training selection episodes")
        add(dc.val_split, mc.ways, mc.shots + mc.queries, "meta-training selection episodes")
        if dc.meta_holdout <= 0:
            add(dc.train_split, mc.ways, mc.shots + mc.queries, "meta-training episodes")
    reported = eval_split(cfg)
    if reported == "selection":  # eval.split=selection: the classes selection draws on
        if dc.selection_holdout > 0:
            return needs
        reported = dc.val_split
    for ways in ec.ways:
        for shots in ec.shots:
            add(reported, ways, shots + ec.queries, f"{ways}-way {shots}-shot test episodes")
    return needs


def _flat_split(cfg: DataConfig) -> tuple[DataConfig, list[str]]:
    """A flat folder's config with its classes split as a run splits them, and a line
    saying how; other data as it is. Errors surface when the splits are loaded."""
    if cfg.name != "folder":
        return cfg, []
    from .folder import describe_class_split, frozen_class_split

    try:
        frozen = frozen_class_split(cfg)
    except MTLError:
        return cfg, []  # reported per split, when each fails to load
    if not frozen.class_split:
        return cfg, []
    given = "as saved in data.class_split" if cfg.class_split else describe_class_split(frozen)
    return frozen, [f"  one folder per class: {given}"]


def _roles(cfg: DataConfig) -> dict[str, str]:
    if not cfg.class_split:
        return {}
    from .class_split import ROLES, split_names

    return dict(zip(split_names(cfg), ROLES, strict=True))


def _too_small(data: ImageSplit, needs: list[Need]) -> list[str]:
    """One line per episode shape ``data`` cannot hold; too few classes for some ways is
    said once for them, whatever the shots."""
    lines, short_ways = [], set()
    for ways, per_class, what in needs:
        if ways in short_ways:
            continue
        problem = data.shortfall(ways, per_class, what)
        if problem:
            lines.append(f"too small: {problem}")
            if ways > data.num_classes:
                short_ways.add(ways)
    return lines


def _describe(split: str, data: ImageSplit, role: str = "",
              note: bool = True) -> tuple[list[str], list[str]]:
    sizes = data.class_sizes
    h, w = data.image_size
    names = ""
    if role:
        shown = ", ".join(data.class_names[:SHOWN_CLASSES])
        more = f", … {data.num_classes - SHOWN_CLASSES} more" \
            if data.num_classes > SHOWN_CLASSES else ""
        names = f" ({shown}{more})"
    label = f"{split} ({role} classes)" if role else split
    lines = [f"  {label}: {data.num_classes} classes{names}, {len(data)} images, "
             f"{sizes.min()}-{sizes.max()} per class, {h}x{w}x{data.channels}"]
    problems = []
    skipped = data.meta.get("skipped", [])
    if skipped:
        problems.append(f"{split}: {len(skipped)} unreadable images, first {skipped[0]}; "
                        f"replace them or run with data.skip_corrupt=true")
    small = int((sizes < EPISODE_IMAGES).sum())
    if small and note:  # without the run's own episode shapes (see _too_small)
        lines.append(f"    note: {small} classes have fewer than {EPISODE_IMAGES} images "
                     f"(5 shots + 15 queries)")
    return lines, problems


def verify_dataset(cfg: DataConfig, splits: list[str] | None = None,
                   progress: Callable[[str], None] | None = None,
                   needs: dict[str, list[Need]] | None = None) -> tuple[str, bool]:
    """A printable report on ``splits`` (default: the train/val/test splits of ``cfg``).

    Returns ``(report, ok)``; ``ok`` is False when any problem was found. ``progress`` is
    told which split is being read (decoding a large split takes a while). An error
    shared by several splits (e.g. a missing root) is reported once, naming them all.
    ``needs``: the episodes each split must hold (:func:`episode_needs`); each one it
    cannot is a problem line of its own.
    """
    splits = splits or list(dict.fromkeys([cfg.train_split, cfg.val_split, cfg.test_split]))
    cfg, header = _flat_split(cfg)
    roles = _roles(cfg)
    probe = dataclasses.replace(cfg, skip_corrupt=True)
    lines = [f"{cfg.name} at {cfg.root}", *header]
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
            split_lines, split_problems = _describe(split, data, roles.get(split, ""),
                                                    note=needs is None)
            lines += split_lines
            problems += split_problems + _too_small(data, (needs or {}).get(split, []))
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
