"""Build a folder of photos shaped like a user's own data, from the shared miniImageNet.

    python examples/make_photo_folder.py my_data [--classes 20] [--photos 30]

writes ``my_data/photos/<class>/*.jpg`` (a flat folder: ``--classes`` classes x
``--photos`` photos, what `mtl run --preset folder-lite0` trains on), and, from photos of
five of those classes that are *not* in ``photos/``, ``my_data/support/<class>/`` (5 each,
for `mtl adapt`, `mtl serve` and `mtl export --support`) and ``my_data/query/`` (3 each,
named ``<class>_<file>`` so the right answer can be read off the name). The README's
walk-through and the tests use it. The images are read from ``$METATRANSFER_DATA`` or the
shared data folder the presets use; they are copied, never modified.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from metatransfer.config import data_search_path

SUPPORT, QUERY, ADAPT_CLASSES = 5, 3, 5


def photos_by_class(mini: Path) -> dict[str, list[Path]]:
    """``{wnid: image paths}`` of the miniImageNet CSVs in ``mini`` (train, then val)."""
    out: dict[str, list[Path]] = {}
    for csv in ("train.csv", "val.csv"):
        if (mini / csv).is_file():
            for line in (mini / csv).read_text().splitlines()[1:]:
                name, label = line.split(",")
                out.setdefault(label, []).append(mini / "images" / name)
    return out


def build(out: Path, classes: int, photos: int, mini: Path) -> None:
    by_class = photos_by_class(mini)
    names = sorted(by_class)[:classes]
    if len(names) < classes or any(len(by_class[c]) < photos + SUPPORT + QUERY for c in names):
        raise SystemExit(f"error: {mini} has too few classes or photos for {classes} x {photos}")
    if out.exists():
        raise SystemExit(f"error: {out} already exists; choose a new folder")
    for i, c in enumerate(names):
        files = by_class[c]
        copy(files[:photos], out / "photos" / c)
        if i < ADAPT_CLASSES:
            copy(files[photos:photos + SUPPORT], out / "support" / c)
            copy(files[photos + SUPPORT:photos + SUPPORT + QUERY], out / "query", f"{c}_")


def copy(files: list[Path], folder: Path, prefix: str = "") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy(f, folder / f"{prefix}{f.name}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the folder to create")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--photos", type=int, default=30, help="photos per class")
    parser.add_argument("--source", type=Path, help="a miniImageNet folder (images/, "
                        "train.csv); default: miniimagenet/ in the shared data folder")
    args = parser.parse_args(argv)
    mini = args.source or next((p / "miniimagenet" for p in data_search_path()
                                if (p / "miniimagenet" / "train.csv").is_file()), None)
    if mini is None:
        sys.exit("error: no miniimagenet/ found; set METATRANSFER_DATA or pass --source")
    build(args.out, args.classes, args.photos, mini)
    print(f"{args.out}/photos: {args.classes} classes x {args.photos} photos; "
          f"{args.out}/support, {args.out}/query: {ADAPT_CLASSES} classes")


if __name__ == "__main__":
    main()
