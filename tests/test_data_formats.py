"""Every on-disk format, on small files written here in the real format, checked exactly."""

from __future__ import annotations

import json
import logging
import pickle
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metatransfer.config import DataConfig
from metatransfer.data import images as images_mod
from metatransfer.data import load_split
from metatransfer.data.verify import verify_dataset

SPLITS = resources.files("metatransfer") / "data" / "splits"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Never touch the user's cache from tests."""
    monkeypatch.setenv("METATRANSFER_CACHE", str(tmp_path / "env-cache"))


def cfg_for(name: str, root: Path, tmp_path: Path, **kw) -> DataConfig:
    return DataConfig(name=name, root=str(root), cache_dir=str(tmp_path / "cache"), **kw)


# ----------------------------------------------------------------------------- writers


def write_cifar(root: Path, per_train: int = 3, per_test: int = 1, seed: int = 0):
    """A ``cifar-100-python/`` archive with the real keys, dtypes and class names."""
    pairs = [p for s in ("train", "val", "test")
             for p in json.loads((SPLITS / "cifarfs" / f"{s}.json").read_text())]
    fine_names = sorted(c for _, c in pairs)
    coarse_names = sorted({s for s, _ in pairs})
    coarse_of = {c: coarse_names.index(s) for s, c in pairs}
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    batches = {}
    for part, per in (("train", per_train), ("test", per_test)):
        fine = [f for f in range(100) for _ in range(per)]
        order = rng.permutation(len(fine))  # real pickles interleave classes
        fine = [fine[i] for i in order]
        data = rng.integers(0, 256, (len(fine), 3072), dtype=np.uint8)
        batch = {b"filenames": [f"{i}.png".encode() for i in range(len(fine))],
                 b"batch_label": f"{part} batch".encode(), b"fine_labels": fine,
                 b"coarse_labels": [coarse_of[fine_names[f]] for f in fine], b"data": data}
        (folder / part).write_bytes(pickle.dumps(batch, protocol=2))
        batches[part] = (data, np.array(fine))
    meta = {b"fine_label_names": [n.encode() for n in fine_names],
            b"coarse_label_names": [n.encode() for n in coarse_names]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return fine_names, coarse_names, batches


def write_png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def write_omniglot_char(folder: Path, rng, n: int = 2, size: int = 105) -> None:
    """``n`` 1-bit PNG drawings (black ink on white), like the Omniglot files."""
    for i in range(n):
        bits = np.ones((size, size), dtype=bool)
        y, x = rng.integers(0, size - 20, 2)
        bits[y : y + 20, x : x + 3] = False  # a stroke of ink
        Image.fromarray(bits).save(folder / f"{i:04d}_{i + 1:02d}.png")
        assert Image.open(folder / f"{i:04d}_{i + 1:02d}.png").mode == "1"


def rgb(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- CIFAR


def _expected_cifar(batches, fine_names, wanted_names):
    wanted = sorted(wanted_names)
    ids = [fine_names.index(n) for n in wanted]
    rows, labels = [], []
    for part in ("train", "test"):
        data, fine = batches[part]
        for row, f in zip(data, fine, strict=True):
            if f in ids:
                rows.append(row.reshape(3, 32, 32).transpose(1, 2, 0))
                labels.append(ids.index(f))
    return wanted, np.stack(rows), np.array(labels)


def test_fc100_superclass_splits_exact(tmp_path):
    fine_names, coarse_names, batches = write_cifar(tmp_path / "c")
    table = json.loads((SPLITS / "fc100" / "superclasses.json").read_text())
    pairs = [p for s in ("train", "val", "test")
             for p in json.loads((SPLITS / "cifarfs" / f"{s}.json").read_text())]
    seen = set()
    for split, n_classes in (("train", 60), ("val", 20), ("test", 20)):
        # the shipped coarse ids agree with CIFAR-100's alphabetical superclass order
        assert [coarse_names[i] for i in table[split]["coarse_ids"]] == table[split]["coarse_names"]
        supers = set(json.loads((SPLITS / "fc100" / f"{split}.json").read_text()))
        names, rows, labels = _expected_cifar(batches, fine_names,
                                              [c for s, c in pairs if s in supers])
        data = load_split(cfg_for("fc100", tmp_path / "c", tmp_path), split)
        assert data.num_classes == n_classes and data.class_names == names
        assert data.images.shape == (n_classes * 4, 32, 32, 3)
        np.testing.assert_array_equal(data.images, rows)
        np.testing.assert_array_equal(data.labels, labels)
        assert data.labels.dtype == np.int64 and data.mean == pytest.approx((0.5071, 0.4865,
                                                                              0.4409))
        assert not seen & set(names)
        seen |= set(names)
    assert len(seen) == 100


def test_cifarfs_class_splits_and_resize(tmp_path):
    fine_names, _, batches = write_cifar(tmp_path)  # root holding cifar-100-python/
    for split, n in (("train", 64), ("val", 16), ("test", 20), ("trainval", 80)):
        parts = ("train", "val") if split == "trainval" else (split,)
        wanted = [c for p in parts
                  for _, c in json.loads((SPLITS / "cifarfs" / f"{p}.json").read_text())]
        names, rows, labels = _expected_cifar(batches, fine_names, wanted)
        data = load_split(cfg_for("cifarfs", tmp_path, tmp_path), split)
        assert data.class_names == names and data.num_classes == n
        np.testing.assert_array_equal(data.images, rows)
        np.testing.assert_array_equal(data.labels, labels)
    big = load_split(cfg_for("cifarfs", tmp_path / "cifar-100-python", tmp_path, image_size=40),
                     "val")
    assert big.images.shape == (16 * 4, 40, 40, 3)


def test_cifar_second_load_reads_no_pickle(tmp_path, monkeypatch):
    write_cifar(tmp_path / "c")
    cfg = cfg_for("fc100", tmp_path / "c", tmp_path)
    first = load_split(cfg, "val")
    from metatransfer.data import cifar

    monkeypatch.setattr(cifar, "read_pickle", lambda path: pytest.fail("pickle re-read"))
    second = load_split(cfg, "val")
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.labels, second.labels)
    assert first.class_names == second.class_names


# ----------------------------------------------------------------------------- Omniglot


def make_omniglot(root: Path, rng, size: int = 105, n: int = 2) -> None:
    from metatransfer.data.omniglot import VAL_ALPHABETS

    bg = root / "images_background"
    for alphabet, chars in [("Latin", 2), ("Greek", 1)] + [(a, 1) for a in VAL_ALPHABETS]:
        for c in range(1, chars + 1):
            (bg / alphabet / f"character{c:02d}").mkdir(parents=True)
            write_omniglot_char(bg / alphabet / f"character{c:02d}", rng, n, size)
    (root / "images_evaluation" / "Tengwar" / "character01").mkdir(parents=True)
    write_omniglot_char(root / "images_evaluation" / "Tengwar" / "character01", rng, n, size)


def test_omniglot_lake_splits_105px(tmp_path):
    rng = np.random.default_rng(1)
    make_omniglot(tmp_path / "o", rng)
    cfg = cfg_for("omniglot", tmp_path / "o", tmp_path)
    train = load_split(cfg, "train")
    assert train.class_names == ["Greek/character01", "Latin/character01", "Latin/character02"]
    assert train.images.shape == (6, 28, 28, 1)
    np.testing.assert_array_equal(train.labels, [0, 0, 1, 1, 2, 2])
    first = tmp_path / "o/images_background/Greek/character01/0000_01.png"
    expected = 255 - np.asarray(
        Image.open(first).convert("L").resize((28, 28), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(train.images[0, :, :, 0], expected)
    assert train.images[0].mean() < 128  # ink bright on a dark background
    val = load_split(cfg, "val")
    assert [n.split("/")[0] for n in val.class_names] == sorted(
        ["Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)"])
    test = load_split(cfg, "test")
    assert test.class_names == ["Tengwar/character01"] and len(test) == 2
    assert load_split(cfg, "background").num_classes == 8
    # at full size nothing is resampled: the inverted bits exactly
    full = load_split(cfg_for("omniglot", tmp_path / "o", tmp_path, image_size=105), "test")
    bits = np.asarray(Image.open(tmp_path / "o/images_evaluation/Tengwar/character01/0000_01.png"))
    np.testing.assert_array_equal(full.images[0, :, :, 0], np.where(bits, 0, 255))


def test_omniglot_rotations_make_four_classes(tmp_path):
    make_omniglot(tmp_path / "o", np.random.default_rng(2), size=28)
    cfg = cfg_for("omniglot", tmp_path / "o", tmp_path, rotations=True, train_split="test")
    data = load_split(cfg, "test")
    assert data.class_names == [f"Tengwar/character01/rot{d:03d}" for d in (0, 90, 180, 270)]
    assert data.images.shape == (8, 28, 28, 1)
    for k in range(4):
        rows = data.indices_by_class[k]
        assert len(rows) == 2
        np.testing.assert_array_equal(data.images[rows[1]],
                                      np.rot90(data.images[data.indices_by_class[0][1]], k))
    # evaluation splits keep the characters as drawn
    plain = load_split(cfg_for("omniglot", tmp_path / "o", tmp_path, rotations=True), "test")
    assert plain.class_names == ["Tengwar/character01"]


def test_omniglot_vinyals_val_list(tmp_path):
    names = (SPLITS / "omniglot_vinyals" / "val.txt").read_text().split()
    rng = np.random.default_rng(3)
    for name in names:
        folder = tmp_path / "o" / "images_background" / name
        folder.mkdir(parents=True)
        write_omniglot_char(folder, rng, n=1, size=28)
    data = load_split(cfg_for("omniglot", tmp_path / "o", tmp_path, split_scheme="vinyals"), "val")
    assert data.class_names == sorted(names) and data.num_classes == 172
    assert data.images.shape == (172, 28, 28, 1)


# ----------------------------------------------------------------------------- folders


def test_tiered_folder_checked_against_standard_list(tmp_path, caplog):
    wnids = [line.split(",")[0] for line in
             (SPLITS / "tieredimagenet" / "val.csv").read_text().split()]
    assert len(wnids) == 97
    rng = np.random.default_rng(4)
    originals = {}
    for w in wnids:
        for i in range(2):
            array = rgb(rng, 84, 84)
            write_png(tmp_path / "t" / "val" / w / f"{w}_{i}.png", array)
            originals[(w, i)] = array
    write_png(tmp_path / "t" / "val" / "n99999999" / "x.png", rgb(rng, 84, 84))  # not standard
    with caplog.at_level(logging.WARNING):
        data = load_split(cfg_for("tieredimagenet", tmp_path / "t", tmp_path), "val")
    assert "n99999999" in caplog.text
    assert data.class_names == sorted(wnids) and data.images.shape == (194, 84, 84, 3)
    np.testing.assert_array_equal(data.labels, np.repeat(np.arange(97), 2))
    np.testing.assert_array_equal(data.images[2 * 5 + 1], originals[(sorted(wnids)[5], 1)])
    # a non-standard split folder is read as it is
    write_png(tmp_path / "t" / "extra" / "a" / "1.png", rgb(rng, 84, 84))
    assert load_split(cfg_for("tieredimagenet", tmp_path / "t", tmp_path), "extra").class_names \
        == ["a"]


def test_user_folder_mixed_types(tmp_path):
    rng = np.random.default_rng(5)
    root = tmp_path / "mine"
    cat_png, cat_grey = rgb(rng, 84, 84), rng.integers(0, 256, (84, 84), dtype=np.uint8)
    write_png(root / "novel" / "cat" / "a.png", cat_png)
    write_png(root / "novel" / "cat" / "b.PNG", cat_grey)
    smooth = np.repeat(np.repeat(rgb(rng, 21, 21), 4, 0), 4, 1)  # JPEG keeps it close
    (root / "novel" / "dog").mkdir(parents=True)
    Image.fromarray(smooth).save(root / "novel" / "dog" / "a.jpg", quality=95, subsampling=0)
    Image.fromarray(rgb(rng, 50, 120)).save(root / "novel" / "dog" / "b.jpeg")  # not square
    rgba = np.dstack([rgb(rng, 84, 84), np.full((84, 84), 255, np.uint8)])
    write_png(root / "novel" / "dog" / "c.png", rgba)
    (root / "novel" / "eel").mkdir()
    Image.fromarray(rgb(rng, 84, 84)).convert("P").save(root / "novel" / "eel" / "a.gif")
    (root / "novel" / "dog" / "notes.txt").write_text("not an image")  # ignored
    data = load_split(cfg_for("folder", root, tmp_path), "novel")
    assert data.class_names == ["cat", "dog", "eel"]
    np.testing.assert_array_equal(data.labels, [0, 0, 1, 1, 1, 2])
    assert data.images.shape == (6, 84, 84, 3)
    np.testing.assert_array_equal(data.images[0], cat_png)
    np.testing.assert_array_equal(data.images[1], np.repeat(cat_grey[:, :, None], 3, 2))
    assert np.abs(data.images[2].astype(int) - smooth).mean() < 4
    np.testing.assert_array_equal(data.images[4], rgba[:, :, :3])
    small = load_split(cfg_for("folder", root, tmp_path, image_size=32), "novel")
    assert small.images.shape == (6, 32, 32, 3)


def make_mini(root: Path, rng, classes=("n02", "n01", "n03"), per=3) -> dict:
    """miniImageNet CSV layout, rows listed class by class in the given order."""
    (root / "images").mkdir(parents=True)
    arrays = {}
    for split in ("train", "val"):
        lines = ["filename,label"]
        for c in classes:
            for i in range(per):
                name = f"{c}{split}{i:08d}.jpg"
                arrays[name] = np.repeat(np.repeat(rgb(rng, 21, 21), 4, 0), 4, 1)
                Image.fromarray(arrays[name]).save(root / "images" / name, quality=95,
                                                   subsampling=0)
                lines.append(f"{name},{c}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return arrays


def test_miniimagenet_csv_and_folder_layouts(tmp_path):
    rng = np.random.default_rng(6)
    arrays = make_mini(tmp_path / "m", rng)
    data = load_split(cfg_for("miniimagenet", tmp_path / "m", tmp_path), "val")
    assert data.class_names == ["n01", "n02", "n03"]
    np.testing.assert_array_equal(data.labels, [1, 1, 1, 0, 0, 0, 2, 2, 2])  # CSV order kept
    assert data.images.shape == (9, 84, 84, 3)
    assert np.abs(data.images[0].astype(int) - arrays["n02val00000000.jpg"]).mean() < 4
    assert load_split(cfg_for("miniimagenet", tmp_path / "m", tmp_path, image_size=80),
                      "val").images.shape == (9, 80, 80, 3)
    # the authors' folder layout, chosen automatically when no CSV exists
    for c in ("n05", "n04"):
        write_png(tmp_path / "m" / "test" / c / "x.png", rgb(rng, 84, 84))
    folder = load_split(cfg_for("miniimagenet", tmp_path / "m", tmp_path), "test")
    assert folder.class_names == ["n04", "n05"] and len(folder) == 2


# ----------------------------------------------------------------------------- cache


def test_second_load_uses_cache_and_change_invalidates(tmp_path, monkeypatch):
    rng = np.random.default_rng(7)
    root = tmp_path / "f"
    for c in ("a", "b"):
        for i in range(3):
            write_png(root / "train" / c / f"{i}.png", rgb(rng, 84, 84))
    cfg = cfg_for("folder", root, tmp_path)
    first = load_split(cfg, "train")
    real_read = images_mod.read_image
    monkeypatch.setattr(images_mod, "read_image", lambda *a: pytest.fail("decoded again"))
    second = load_split(cfg, "train")
    assert isinstance(second.images, np.memmap) and not second.images.flags.writeable
    np.testing.assert_array_equal(first.images, second.images)
    new = rgb(rng, 84, 84)
    write_png(root / "train" / "a" / "0.png", new)  # same name, new bytes
    monkeypatch.setattr(images_mod, "read_image", real_read)
    third = load_split(cfg, "train")
    np.testing.assert_array_equal(third.images[0], new)
    assert list((tmp_path / "cache" / "folder").glob("*.npy"))
    assert not (tmp_path / "env-cache").exists()


def test_verify_reports_sizes_and_problems(tmp_path):
    rng = np.random.default_rng(8)
    root = tmp_path / "f"
    for split, classes in (("train", "ab"), ("val", "c"), ("test", "d")):
        for c in classes:
            for i in range(2):
                write_png(root / split / c / f"{i}.png", rgb(rng, 84, 84))
    report, ok = verify_dataset(cfg_for("folder", root, tmp_path))
    assert ok, report
    assert "train: 2 classes, 4 images, 2-2 per class, 84x84x3" in report
    (root / "test" / "d" / "bad.jpg").write_bytes(b"not a jpeg at all")
    write_png(root / "test" / "a" / "0.png", rgb(rng, 84, 84))  # class shared with train
    report, ok = verify_dataset(cfg_for("folder", root, tmp_path))
    assert not ok
    assert "1 unreadable images, first " in report and "bad.jpg" in report
    assert "train and test share 1 classes (first: a)" in report
    report, ok = verify_dataset(cfg_for("folder", root, tmp_path), ["nope"])
    assert not ok and "nope: cannot be read" in report and "split folder" in report
    seen = []
    report, ok = verify_dataset(cfg_for("folder", tmp_path / "missing", tmp_path),
                                progress=seen.append)
    assert not ok and report.count("does not exist") == 1, report  # once, not per split
    assert "1 problem:" in report and "train, val, test: folder: root" in report
    assert [s.split()[1] for s in seen] == ["folder/train", "folder/val", "folder/test"]


def test_verify_omniglot_background_only_says_how(tmp_path, capsys):
    """The shared data's layout (images_background/ only, what the presets read): the
    report names the splits that can be read and the --splits that checks them."""
    import shutil

    from metatransfer.cli import main

    make_omniglot(tmp_path / "data" / "omniglot", np.random.default_rng(3), size=28)
    root = tmp_path / "data" / "omniglot"
    shutil.rmtree(root / "images_evaluation")
    cache = ["--set", f"data.cache_dir={tmp_path / 'cache'}"]
    with pytest.raises(SystemExit) as exc:
        main(["data", "verify", "omniglot", "--root", str(root), *cache])
    out = capsys.readouterr().out
    assert exc.value.code == 1
    assert "readable: train, val (check only those with --splits train,val)" in out
    assert "images_evaluation is absent" in out and "--splits train,val" in out
    assert "eval.split=val" in out
    fits = [f"--set={key}" for key in (  # episodes these 2 images per class can hold
        "meta.ways=2", "pretrain.val_ways=2", "eval.ways=[2]", "eval.shots=[1]",
        "meta.queries=1", "pretrain.val_queries=1", "eval.queries=1")]
    main(["data", "verify", "omniglot", "--root", str(root), "--splits", "train,val", *cache,
          *fits])
    assert "ok: no problems found" in capsys.readouterr().out
    # a wrong root is not told to choose another split
    with pytest.raises(SystemExit):
        main(["data", "verify", "omniglot", "--root", str(tmp_path / "data"), *cache])
    out = capsys.readouterr().out
    assert "holds neither images_background/ nor images_evaluation/" in out
    assert f"did you mean {root}?" in out and "another split" not in out
    assert "readable" not in out
