"""Every bad input gives one ``DataError`` line naming the file and the fix."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metatransfer.config import DataConfig
from metatransfer.data import load_split
from metatransfer.errors import ConfigError, DataError


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Never touch the user's cache from tests."""
    monkeypatch.setenv("METATRANSFER_CACHE", str(tmp_path / "env-cache"))


def cfg_for(name: str, root, tmp_path: Path, **kw) -> DataConfig:
    return DataConfig(name=name, root=None if root is None else str(root),
                      cache_dir=str(tmp_path / "cache"), **kw)


def fails(cfg: DataConfig, split: str, *needles: str) -> str:
    """Load, expect a one-line DataError containing every needle; return the message."""
    with pytest.raises(DataError) as info:
        load_split(cfg, split)
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def image(path: Path, seed: int = 0, size: int = 84, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(array).save(path, fmt)
    return path


def folder_dataset(root: Path, classes=("a", "b"), per: int = 2, split: str = "train") -> Path:
    for c in classes:
        for i in range(per):
            image(root / split / c / f"{i}.jpg", seed=i)
    return root


def mini_csv(root: Path, rows: list[str], header: str = "filename,label",
             split: str = "train") -> Path:
    for i, row in enumerate(rows):
        name = row.split(",")[0]
        if not (root / "images" / name).exists() and "missing" not in name:
            image(root / "images" / name, seed=i)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / f"{split}.csv").write_text("\n".join([header, *rows]) + "\n")
    return root


# ----------------------------------------------------------------------------- roots, splits


@pytest.mark.parametrize("name", ["miniimagenet", "tieredimagenet", "fc100", "cifarfs",
                                  "omniglot", "folder"])
def test_missing_root(tmp_path, name):
    fails(cfg_for(name, tmp_path / "nowhere", tmp_path), "train", str(tmp_path / "nowhere"),
          "does not exist")
    fails(cfg_for(name, None, tmp_path), "train", "data.root is not set")
    (tmp_path / "file").write_text("x")
    fails(cfg_for(name, tmp_path / "file", tmp_path), "train", "is a file, not a folder")


def test_missing_split_csv_says_absent(tmp_path):
    root = mini_csv(tmp_path / "m", ["n01a.jpg,n01", "n02a.jpg,n02"])
    fails(cfg_for("miniimagenet", root, tmp_path), "test",
          f"{root / 'test.csv'} is absent", "train.csv")
    fails(cfg_for("miniimagenet", root, tmp_path, layout="csv"), "val", "val.csv is absent")


def test_missing_split_folder_lists_existing(tmp_path):
    root = folder_dataset(tmp_path / "f")
    fails(cfg_for("folder", root, tmp_path), "val", f"{root / 'val'} is absent", "found: train")
    fails(cfg_for("miniimagenet", root, tmp_path, layout="folder"), "val", "is absent")


def test_unknown_split_names(tmp_path):
    (tmp_path / "o" / "images_background").mkdir(parents=True)
    fails(cfg_for("omniglot", tmp_path / "o", tmp_path), "nope", "lake scheme has splits")
    fails(cfg_for("omniglot", tmp_path / "o", tmp_path, split_scheme="vinyals"), "nope",
          "vinyals scheme has splits")
    write_cifar_archive(tmp_path / "c")
    fails(cfg_for("fc100", tmp_path / "c", tmp_path), "nope", "not 'nope'")
    with pytest.raises(ConfigError):
        load_split(cfg_for("omniglot", tmp_path / "o", tmp_path, split_scheme="x"), "train")
    with pytest.raises(ConfigError):
        load_split(cfg_for("miniimagenet", tmp_path / "o", tmp_path, layout="x"), "train")


# ----------------------------------------------------------------------------- CSV


def test_csv_naming_missing_file(tmp_path):
    root = mini_csv(tmp_path / "m", ["n01a.jpg,n01", "n01missing.jpg,n01", "n02a.jpg,n02"])
    fails(cfg_for("miniimagenet", root, tmp_path), "train",
          f"{root / 'train.csv'} line 3 names n01missing.jpg", "restore the file")


@pytest.mark.parametrize("header", ["file,label", "filename;label", "n01a.jpg,n01", ""])
def test_wrong_csv_header(tmp_path, header):
    root = mini_csv(tmp_path / "m", ["n01a.jpg,n01"], header=header)
    fails(cfg_for("miniimagenet", root, tmp_path), "train", str(root / "train.csv"),
          "'filename,label' is expected")


def test_bad_csv_rows_and_empty_csv(tmp_path):
    root = mini_csv(tmp_path / "m", ["n01a.jpg,n01", "n01b.jpg"])
    fails(cfg_for("miniimagenet", root, tmp_path), "train", "line 3", "fix that line")
    (root / "train.csv").write_text("")
    fails(cfg_for("miniimagenet", root, tmp_path), "train", "train.csv is empty")
    (root / "train.csv").write_text("filename,label\n")
    fails(cfg_for("miniimagenet", root, tmp_path), "train", "lists no images")


def test_csv_without_images_folder(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "train.csv").write_text("filename,label\na.jpg,n01\n")
    fails(cfg_for("miniimagenet", tmp_path / "m", tmp_path), "train", "images is absent")


# ----------------------------------------------------------------------------- images


def test_corrupt_image_raises_or_is_skipped(tmp_path, caplog):
    root = folder_dataset(tmp_path / "f", per=3)
    bad = root / "train" / "a" / "1.jpg"
    bad.write_bytes(b"\x89PNG this is not really an image")
    fails(cfg_for("folder", root, tmp_path), "train", str(bad), "data.skip_corrupt=true")
    with caplog.at_level(logging.WARNING):
        data = load_split(cfg_for("folder", root, tmp_path, skip_corrupt=True), "train")
    assert str(bad) in caplog.text
    assert len(data) == 5 and list(data.class_sizes) == [2, 3]
    np.testing.assert_array_equal(data.labels, [0, 0, 1, 1, 1])
    assert data.meta["skipped"] == [str(bad)]
    # the cache built while skipping does not hide the file from a strict load
    fails(cfg_for("folder", root, tmp_path), "train", str(bad), "unreadable")


def test_truncated_images(tmp_path):
    root = folder_dataset(tmp_path / "f")
    for name, fmt in (("0.jpg", "JPEG"), ("1.png", "PNG")):
        path = image(root / "train" / "b" / name, fmt=fmt)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        fails(cfg_for("folder", root, tmp_path), "train", str(path), "cannot be decoded")
        path.unlink()


def test_zero_size_files(tmp_path, caplog):
    root = folder_dataset(tmp_path / "f", per=3)
    empty = root / "train" / "b" / "2.jpg"
    empty.write_bytes(b"")
    fails(cfg_for("folder", root, tmp_path), "train", str(empty), "empty (0 bytes)")
    with caplog.at_level(logging.WARNING):
        assert len(load_split(cfg_for("folder", root, tmp_path, skip_corrupt=True), "train")) == 5


def test_empty_class(tmp_path):
    root = folder_dataset(tmp_path / "f")
    (root / "train" / "c").mkdir()
    (root / "train" / "c" / "readme.txt").write_text("no images")
    fails(cfg_for("folder", root, tmp_path), "train", str(root / "train" / "c"), "has no images")
    # a class whose only images are all unreadable is empty too
    (root / "train" / "c" / "x.jpg").write_bytes(b"garbage")
    fails(cfg_for("folder", root, tmp_path, skip_corrupt=True), "train", "class 'c'",
          "no readable images")


def test_directories_where_files_are_expected(tmp_path):
    root = mini_csv(tmp_path / "m", ["n01a.jpg,n01", "n01dir.jpg,n01"])
    (root / "images" / "n01dir.jpg").unlink()
    (root / "images" / "n01dir.jpg").mkdir()
    fails(cfg_for("miniimagenet", root, tmp_path), "train", str(root / "images" / "n01dir.jpg"),
          "is a directory")
    (root / "val.csv").mkdir()
    fails(cfg_for("miniimagenet", root, tmp_path), "val", "val.csv is a folder")
    froot = folder_dataset(tmp_path / "f")
    (froot / "train" / "a" / "nested").mkdir()
    fails(cfg_for("folder", froot, tmp_path), "train", "nested", "is a folder inside class")
    (froot / "train" / "a" / "nested").rmdir()
    image(froot / "train" / "loose.jpg")
    fails(cfg_for("folder", froot, tmp_path), "train", "loose.jpg", "class")


def test_too_few_images_for_episode(tmp_path):
    data = load_split(cfg_for("folder", folder_dataset(tmp_path / "f"), tmp_path), "train")
    with pytest.raises(DataError, match="lower shots or queries"):
        data.require(2, 6)


def test_too_many_ways_names_the_ways_once(tmp_path):
    data = load_split(cfg_for("folder", folder_dataset(tmp_path / "f"), tmp_path), "train")
    with pytest.raises(DataError) as exc:
        data.require(200, 1, "200-way 1-shot test episodes")
    assert str(exc.value).count("200-way") == 1
    with pytest.raises(DataError, match="200-way validation episodes need 200 classes"):
        data.require(200, 1, "validation episodes")


# ----------------------------------------------------------------------------- split lists


def test_tiered_list_names_class_not_on_disk(tmp_path):
    root = folder_dataset(tmp_path / "t", classes=("n01530575",), per=1)
    fails(cfg_for("tieredimagenet", root, tmp_path), "train", "standard train list",
          "n01531178", str(root / "train" / "n01531178"), "is absent")


def test_omniglot_lists_name_missing_characters(tmp_path):
    bg = tmp_path / "o" / "images_background"
    (bg / "Latin" / "character01").mkdir(parents=True)
    Image.new("1", (28, 28), 1).save(bg / "Latin" / "character01" / "a.png")
    fails(cfg_for("omniglot", tmp_path / "o", tmp_path), "val", "validation alphabet",
          str(bg / "Armenian"))
    fails(cfg_for("omniglot", tmp_path / "o", tmp_path, split_scheme="vinyals"), "train",
          "Angelic/character01", "images_evaluation")
    fails(cfg_for("omniglot", tmp_path / "o", tmp_path), "test", "images_evaluation is absent")


# ----------------------------------------------------------------------------- CIFAR


def write_cifar_archive(root: Path, data=None, meta=None, n: int = 200) -> Path:
    """A small CIFAR-100 archive: 2 images per class (fine f has coarse f // 5)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    fine = [i % 100 for i in range(n)]
    batch = {b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine],
             b"data": np.zeros((n, 3072), np.uint8) if data is None else data}
    for part in ("train", "test"):
        (folder / part).write_bytes(pickle.dumps(batch, protocol=2))
    if meta is None:
        meta = {b"fine_label_names": [f"c{i:02d}".encode() for i in range(100)],
                b"coarse_label_names": [f"s{i:02d}".encode() for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


@pytest.mark.parametrize("data", [np.zeros((200, 3000), np.uint8),
                                  np.zeros((200, 3, 32, 32), np.uint8),
                                  np.zeros((200, 3072), np.float32), [[0] * 3072] * 200])
def test_cifar_pickle_wrong_shape(tmp_path, data):
    folder = write_cifar_archive(tmp_path / "c", data=data)
    fails(cfg_for("cifarfs", tmp_path / "c", tmp_path), "train", str(folder / "train"),
          "expected (n, 3072) uint8", "re-extract")


def test_cifar_pickle_damaged(tmp_path):
    folder = write_cifar_archive(tmp_path / "c")
    cfg = cfg_for("cifarfs", tmp_path / "c", tmp_path)
    whole = (folder / "train").read_bytes()
    (folder / "train").write_bytes(whole[: len(whole) // 2])
    fails(cfg, "train", str(folder / "train"), "not a readable CIFAR-100 pickle")
    (folder / "train").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}))
    fails(cfg, "train", "no 'fine_labels' entry")
    (folder / "train").write_bytes(b"")
    fails(cfg, "train", "empty (0 bytes)")
    (folder / "train").unlink()
    (folder / "train").mkdir()
    fails(cfg, "train", str(folder / "train"), "is a folder")
    os.rmdir(folder / "train")
    fails(cfg, "train", str(folder / "train"), "is absent")


def test_cifar_pickle_cannot_run_code(tmp_path):
    folder = write_cifar_archive(tmp_path / "c")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    (folder / "meta").write_bytes(pickle.dumps({b"x": Evil()}))
    fails(cfg_for("fc100", tmp_path / "c", tmp_path), "train", "refusing to load")
    assert not marker.exists()


def test_cifar_split_list_names_missing_class(tmp_path):
    write_cifar_archive(tmp_path / "c")  # class names c00..c99, not CIFAR-100's
    fails(cfg_for("cifarfs", tmp_path / "c", tmp_path), "val", "names class 'beaver'",
          "meta")
    fails(cfg_for("fc100", tmp_path / "c", tmp_path), "val",
          "names superclass 'large_carnivores'")
    meta = {b"fine_label_names": [b"x"] * 3, b"coarse_label_names": [b"y"] * 20}
    write_cifar_archive(tmp_path / "d", meta=meta)
    fails(cfg_for("fc100", tmp_path / "d", tmp_path), "val", "should list 100 names")


def test_cifar_archive_missing(tmp_path):
    (tmp_path / "c").mkdir()
    fails(cfg_for("fc100", tmp_path / "c", tmp_path), "train", "cifar-100-python is absent",
          "unpack")
