"""A flat folder (``root/<class>/*``): seeded class split, saved by a run, checked by verify."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from metatransfer.cli import main
from metatransfer.config import CONFIG_NAME, DataConfig, load_config
from metatransfer.data import load_split
from metatransfer.data.class_split import shared_images, split_sizes
from metatransfer.errors import ConfigError, DataError


def flat_folder(root: Path, classes: int = 12, per: int = 4, size: int = 16) -> Path:
    """``root/c00 .. c<classes>/<i>.png``: a noisy colour per class, every file distinct."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        colour = rng.integers(0, 256, 3)
        for i in range(per):
            (root / f"c{c:02d}").mkdir(parents=True, exist_ok=True)
            pixels = np.clip(colour + rng.normal(0, 25, (size, size, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / f"c{c:02d}" / f"{i}.png")
    return root


def data_cfg(root: Path, tmp_path: Path, **kw) -> DataConfig:
    return DataConfig(name="folder", root=str(root), cache_dir=str(tmp_path / "cache"),
                      image_size=16, **kw)


def classes_of(cfg: DataConfig) -> dict[str, list[str]]:
    return {s: load_split(cfg, s).class_names for s in ("train", "val", "test")}


def test_split_sizes_from_shares_or_counts():
    assert split_sizes(20, [0.5, 0.25, 0.25], []) == (10, 5, 5)
    assert split_sizes(10, [0.6, 0.2, 0.2], []) == (6, 2, 2)
    assert split_sizes(7, [0.6, 0.2, 0.2], []) == (4, 2, 1)  # largest remainder, sums to 7
    assert split_sizes(4, [0.9, 0.05, 0.05], []) == (2, 1, 1)  # every role gets a class
    assert split_sizes(20, [0.5, 0.25, 0.25], [8, 4, 4]) == (8, 4, 4)  # 4 left out
    with pytest.raises(DataError, match="at least 3"):
        split_sizes(2, [0.5, 0.25, 0.25], [])
    with pytest.raises(DataError, match="asks for 12 classes"):
        split_sizes(10, [0.5, 0.25, 0.25], [4, 4, 4])
    for bad in ("data.split_fractions=[0.5,0.5]", "data.split_fractions=[0.6,0.6,-0.2]",
                "data.split_fractions=[0.5,0.3,0.3]", "data.split_counts=[4,0,4]"):
        with pytest.raises(ConfigError):
            load_config(overrides=[bad])


def test_flat_folder_is_split_by_seed_into_disjoint_classes(tmp_path):
    root = flat_folder(tmp_path / "photos")
    cfg = data_cfg(root, tmp_path)
    got = classes_of(cfg)
    assert [len(got[s]) for s in ("train", "val", "test")] == [6, 3, 3]
    assert sorted(sum(got.values(), [])) == [f"c{c:02d}" for c in range(12)]
    assert classes_of(cfg) == got  # the same draw every time
    assert classes_of(data_cfg(root, tmp_path, split_seed=1)) != got
    counted = classes_of(data_cfg(root, tmp_path, split_counts=[4, 4, 4]))
    assert [len(counted[s]) for s in ("train", "val", "test")] == [4, 4, 4]
    train = load_split(cfg, "train")
    assert len(train) == 24 and train.images.shape[1:] == (16, 16, 3)
    with pytest.raises(DataError, match="no split 'novel'"):
        load_split(cfg, "novel")


def test_the_same_image_never_lands_in_two_splits(tmp_path):
    root = flat_folder(tmp_path / "photos")
    cfg = data_cfg(root, tmp_path)
    got = classes_of(cfg)
    copy = root / got["test"][0] / "copy.png"
    shutil.copy(root / got["train"][0] / "0.png", copy)
    for split in ("train", "test"):
        with pytest.raises(DataError, match="same image in two splits") as exc:
            load_split(cfg, split)
        assert "copy.png" in str(exc.value)
    # byte-identical only: a copy inside one split is not a split leak
    copy.unlink()
    shutil.copy(root / got["train"][0] / "0.png", root / got["train"][1] / "copy.png")
    assert shared_images({"train": sorted(root.glob("*/*.png"))}) == []
    assert len(load_split(cfg, "train")) == 25


def test_mixed_layouts_and_loose_files_are_errors(tmp_path):
    root = flat_folder(tmp_path / "photos", classes=4)
    (root / "train" / "x").mkdir(parents=True)
    shutil.copy(root / "c00" / "0.png", root / "train" / "x" / "0.png")
    with pytest.raises(DataError, match="mixes class folders"):
        load_split(data_cfg(root, tmp_path), "train")
    shutil.rmtree(root / "train")
    shutil.copy(root / "c00" / "0.png", root / "loose.png")
    with pytest.raises(DataError, match="loose.png lies directly in"):
        load_split(data_cfg(root, tmp_path), "train")


def test_a_run_saves_its_split_and_resume_reuses_it(tmp_path, capsys):
    """The split goes into the run's config.yaml; a class added to the folder afterwards
    changes a fresh draw but not the resumed run, nor a meta-test of it."""
    root = flat_folder(tmp_path / "photos", per=6)
    out = tmp_path / "run"
    sets = [f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", "data.image_size=16",
            f"out={out}", "device=cpu", "model.backbone_args={width: 8}",
            "pretrain.epochs=1", "pretrain.batch_size=8", "pretrain.val_ways=3",
            "pretrain.val_episodes=4", "pretrain.val_queries=2", "meta.ways=3",
            "meta.queries=2", "eval.ways=[3]", "eval.shots=[1]", "eval.queries=2"]
    args = ["pretrain", "--quiet", "--set", "data.name=folder"]
    for item in sets:
        args += ["--set", item]
    main(args)
    saved = yaml.safe_load((out / CONFIG_NAME).read_text())["data"]["class_split"]
    assert saved == classes_of(data_cfg(root, tmp_path))
    for c in range(12, 15):  # new classes: a fresh draw of 15 classes differs
        flat_folder(tmp_path / "more", classes=15, per=6)
        shutil.copytree(tmp_path / "more" / f"c{c:02d}", root / f"c{c:02d}")
    assert classes_of(data_cfg(root, tmp_path)) != saved
    main(["pretrain", "--resume", str(out), "--quiet"])  # done: reads the saved split
    assert yaml.safe_load((out / CONFIG_NAME).read_text())["data"]["class_split"] == saved
    main(["meta-test", "--checkpoint", str(out), "--out", str(tmp_path / "eval"), "--quiet",
          "--episodes", "4", "--method", "protonet"])
    capsys.readouterr()
    tested = yaml.safe_load((tmp_path / "eval" / CONFIG_NAME).read_text())["data"]
    assert tested["class_split"] == saved


def test_verify_says_what_each_split_gets_and_what_is_too_small(tmp_path, capsys):
    root = flat_folder(tmp_path / "photos", per=6)
    cache = ["--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "data.image_size=16"]
    with pytest.raises(SystemExit) as exc:  # the defaults: 5-way episodes, 16-20 per class
        main(["data", "verify", "folder", "--root", str(root), *cache])
    out = capsys.readouterr().out
    assert exc.value.code == 1
    assert "classes split 6 / 3 / 3 into training / selection / report classes" in out
    got = classes_of(data_cfg(root, tmp_path))
    for split, role in (("train", "training"), ("val", "selection"), ("test", "report")):
        line = next(x for x in out.splitlines() if x.strip().startswith(f"{split} ("))
        assert f"{split} ({role} classes): {len(got[split])} classes ({got[split][0]}," in line
    too_small = [x for x in out.splitlines() if "too small" in x]
    assert len(too_small) == 3, out  # one line each: train, val, test (1- and 5-shot alike)
    assert "folder/train: meta-training episodes need 16 images per class" in too_small[0]
    assert all("need 5 classes but the split has 3" in x for x in too_small[1:])
    fits = ["--set", "pretrain.val_ways=3", "--set", "meta.ways=3", "--set", "eval.ways=[3]",
            "--set", "meta.queries=2", "--set", "pretrain.val_queries=2",
            "--set", "eval.queries=1", "--set", "eval.shots=[1,5]"]
    main(["data", "verify", "folder", "--root", str(root), *cache, *fits])
    assert "ok: no problems found" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["data", "verify", "folder", "--root", str(root), *cache, *fits,
              "--set", "eval.shots=[1,8]"])
    out = capsys.readouterr().out
    assert "too small: folder/test: 3-way 8-shot test episodes need 9 images per class" in out
