"""Malformed input, systematically: every case ends in one clear error line (the CLI exits
2 with one ``error: ...`` line on stderr and no traceback) or a documented skip.

Data layer (folder format, miniImageNet CSV): random bytes as an image, truncated PNG and
JPEG, zero-size files, a folder where an image file is expected, a symlink loop, a dangling
symlink, non-UTF-8 file and class names, wrong CSV headers, malformed CSV rows, a folder
where the CSV is expected, a CSV naming a missing file, duplicate file names in a CSV.
CLI: unknown keys (with the nearest valid key), negative/zero/NaN numbers, huge
ways/shots (rejected before any training), bad paths for --config/--resume/data.root.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_overrides
from PIL import Image

from metatransfer.cli import main
from metatransfer.config import DataConfig
from metatransfer.data import load_split
from metatransfer.data.miniimagenet import read_split_csv
from metatransfer.errors import DataError


def png(size: int = 8, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def jpeg(size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), 128, np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def folder_dataset(root: Path) -> Path:
    """root/train/{a,b}/*.png, three good images per class."""
    for cls in ("a", "b"):
        d = root / "train" / cls
        d.mkdir(parents=True)
        for i in range(3):
            (d / f"{i}.png").write_bytes(png(seed=i))
    return root


def load_folder(root: Path, skip: bool = False):
    return load_split(DataConfig(name="folder", root=str(root), image_size=8,
                                 skip_corrupt=skip), "train")


def _nonutf8(d: Path) -> None:
    with open(os.path.join(os.fsencode(d), b"\xff\xfe.png"), "wb") as fh:
        fh.write(png())


# name -> (how to damage class folder 'a', message expected, skippable with skip_corrupt)
CORRUPT = {
    "random bytes": (lambda d: (d / "x.jpg").write_bytes(os.urandom(500)),
                     "x.jpg is not a readable image; replace the file, or set "
                     "data.skip_corrupt=true", True),
    "truncated png": (lambda d: (d / "x.png").write_bytes(png(64)[:100]),
                      "x.png cannot be decoded (image file is truncated)", True),
    "truncated jpeg": (lambda d: (d / "x.jpg").write_bytes(jpeg()[:300]),
                       "x.jpg cannot be decoded", True),
    "zero-size file": (lambda d: (d / "x.png").write_bytes(b""), "x.png is empty (0 bytes)", True),
    "folder named like an image": (lambda d: (d / "x.png").mkdir(),
                                   "x.png is a folder inside class folder a", False),
    "symlink loop": (lambda d: os.symlink(d / "x.png", d / "x.png"),
                     "x.png cannot be read (Too many levels of symbolic links)", False),
    "dangling symlink": (lambda d: os.symlink(d / "gone", d / "x.png"),
                         "x.png does not exist", False),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_files_give_one_clear_error(tmp_path, case):
    damage, message, skippable = CORRUPT[case]
    root = folder_dataset(tmp_path / "data")
    damage(root / "train" / "a")
    with pytest.raises(DataError) as exc:
        load_folder(root)
    assert message in str(exc.value) and "\n" not in str(exc.value)
    if skippable:  # the documented skip: a warning, and the good images
        split = load_folder(root, skip=True)
        assert len(split) == 6 and len(split.meta["skipped"]) == 1


def test_non_utf8_file_and_class_names_load(tmp_path):
    root = folder_dataset(tmp_path / "data")
    _nonutf8(root / "train" / "a")
    cls = os.path.join(os.fsencode(root / "train"), b"c\xff")
    os.mkdir(cls)
    with open(os.path.join(cls, b"1.png"), "wb") as fh:
        fh.write(png())
    split = load_folder(root)
    assert len(split) == 8 and split.num_classes == 3


# ----------------------------------------------------------------------------- CSV


def mini_root(tmp_path: Path, csv_text: str | None) -> Path:
    root = tmp_path / "mini"
    (root / "images").mkdir(parents=True)
    for i in range(4):
        (root / "images" / f"{i}.jpg").write_bytes(jpeg(8))
    if csv_text is not None:
        (root / "train.csv").write_text(csv_text)
    return root


CSV_CASES = {
    "wrong header": ("file,cls\n0.jpg,n1\n", "header is 'file,cls' but 'filename,label'"),
    "no header": ("0.jpg,n1\n1.jpg,n1\n", "but 'filename,label' is expected"),
    "empty": ("", "is empty"),
    "three columns": ("filename,label\n0.jpg,n1,x\n", "line 2: expected 'filename,label'"),
    "header only": ("filename,label\n", "lists no images"),
    "missing file": ("filename,label\n9.jpg,n1\n", "line 2 names 9.jpg, which is not in"),
    "NUL bytes": ("filename,label\n0.jpg\x00,n1\n", "file name is invalid (embedded null byte)"),
}


@pytest.mark.parametrize("case", list(CSV_CASES))
def test_bad_csv_gives_one_clear_error(tmp_path, case):
    text, message = CSV_CASES[case]
    root = mini_root(tmp_path, text)
    with pytest.raises(DataError) as exc:
        load_split(DataConfig(name="miniimagenet", root=str(root), image_size=8), "train")
    assert message in str(exc.value)


def test_folder_where_the_csv_should_be(tmp_path):
    root = mini_root(tmp_path, None)
    (root / "train.csv").mkdir()
    with pytest.raises(DataError, match="is a folder where the split CSV file is expected"):
        read_split_csv(root / "train.csv")


def test_non_utf8_csv(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b"filename,label\n\xff\xfe.jpg,n1\n")
    with pytest.raises(DataError, match="cannot be read"):
        read_split_csv(path)


def test_duplicate_file_names_in_csv(tmp_path):
    root = mini_root(tmp_path, "filename,label\n0.jpg,n1\n1.jpg,n1\n2.jpg,n2\n0.jpg,n2\n")
    with pytest.raises(DataError, match="0.jpg"):
        load_split(DataConfig(name="miniimagenet", root=str(root), image_size=8), "train")


# ----------------------------------------------------------------------------- CLI


def cli_error(capsys, args: list[str]) -> str:
    """Run the CLI; require exit 2 and exactly one 'error:' line, no traceback."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def run_args(tmp_path: Path, *extra: str) -> list[str]:
    args = ["run", "--quiet"]
    for item in [*tiny_overrides(tmp_path / "run"), *extra]:
        args += ["--set", item]
    return args


CLI_CASES = {
    "unknown key": (["meta.wyas=3"], "unknown config key 'meta.wyas' (did you mean 'meta.ways'?)"),
    "unknown section": (["meat.ways=3"], "unknown config key 'meat' (did you mean 'meta'?)"),
    "negative shots": (["meta.shots=-1"], "'meta.shots' must be positive, got -1"),
    "zero episodes": (["eval.episodes=0"], "'eval.episodes' must be positive, got 0"),
    "negative epochs": (["pretrain.epochs=-2"], "'pretrain.epochs' must not be negative"),
    "negative checkpoint steps": (["checkpoint_every_steps=-1"],
                                  "'checkpoint_every_steps' must not be negative"),
    "NaN learning rate": (["pretrain.lr=.nan"], "'pretrain.lr' must be a finite number"),
    "one-way eval": (["eval.ways=[1]"], "'eval.ways' must be at least 2"),
    "empty shots": (["eval.shots=[]"], "'eval.shots' must not be empty"),
    "text for a number": (["meta.inner_lr=fast"], "'meta.inner_lr' must be a number"),
    "bad choice": (["nan_policy=ignore"], "'nan_policy' must be one of stop | skip"),
    "backbone_args not a mapping": (["model.backbone_args=5"],
                                    "'model.backbone_args' must be a mapping"),
    "huge ways": (["meta.ways=1000000"], "1000000-way meta-training validation episodes need "
                                         "1000000 classes but the split has 6"),
    "huge shots": (["meta.shots=1000000000000"], "need 1000000000005 images per class"),
    "huge eval shots": (["eval.shots=[100000]"], "5-way 100000-shot test episodes"),
    "root is a file": (["data.name=folder", f"data.root={__file__}"], "is a file, not a folder"),
    "root missing": (["data.name=folder", "data.root=/nonexistent/x"], "does not exist"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_bad_config_one_line(tmp_path, capsys, case):
    extra, message = CLI_CASES[case]
    line = cli_error(capsys, run_args(tmp_path, *extra))
    assert message in line
    assert not (tmp_path / "run" / "state").exists(), "nothing ran before the error"


def test_cli_bad_paths(tmp_path, capsys):
    (tmp_path / "cfg").mkdir()
    assert "not found" in cli_error(capsys, ["run", "--config", str(tmp_path / "cfg")])
    assert "not a run directory" in cli_error(capsys, ["run", "--resume", __file__])
    assert "not a run directory" in cli_error(capsys, ["run", "--resume", str(tmp_path)])


def test_cli_corrupt_dataset_one_line(tmp_path, capsys):
    root = folder_dataset(tmp_path / "data")
    shutil.copytree(root / "train", root / "val")  # the split pre-training validates on
    (root / "train" / "a" / "x.jpg").write_bytes(os.urandom(300))
    line = cli_error(capsys, ["pretrain", "--quiet", "--set", "data.name=folder",
                              "--set", f"data.root={root}", "--set", f"out={tmp_path / 'r'}",
                              "--set", "pretrain.val_ways=2", "--set", "pretrain.val_queries=2"])
    assert "x.jpg is not a readable image" in line
    assert not (tmp_path / "r").exists()  # found before the run directory is made


def test_unknown_backbone_argument(tmp_path, capsys):
    line = cli_error(capsys, ["pretrain", "--quiet", "--set", "data.name=toy", "--set",
                              f"out={tmp_path / 'r'}", "--set", "model.backbone_args={foo: 1}"])
    assert "foo" in line


def test_single_phase_commands_check_the_data_before_writing(tmp_path, capsys, monkeypatch):
    """`mtl pretrain --preset omniglot-conv4 --set data.root=/missing` used to write
    runs/omniglot-conv4-<time>/environment.json before failing; like `mtl run`, every
    phase command now checks its data first and leaves nothing behind."""
    from metatransfer.checkpoints import ModelInfo, save_model
    from metatransfer.models import create_backbone

    monkeypatch.chdir(tmp_path)
    missing = ["--set", "data.root=/missing/omniglot"]
    line = cli_error(capsys, ["pretrain", "--quiet", "--preset", "omniglot-conv4", *missing])
    assert "root /missing/omniglot does not exist" in line
    line = cli_error(capsys, ["pretrain", "--quiet", "--set", "data.root=/does-not-exist"])
    assert "glyphs dataset is built in" in line  # no preset: the demo set, refusing a root
    model = tmp_path / "model.safetensors"
    save_model(model, ModelInfo(backbone="conv4", backbone_args={"width": 8}, in_channels=1,
                                image_size=28, invert=True, mean=[0.08], std=[0.27],
                                source="omniglot"),
               create_backbone("conv4", in_channels=1, width=8))
    line = cli_error(capsys, ["meta-train", "--quiet", "--preset", "omniglot-conv4",
                              "--pretrained", str(model), *missing])
    assert "does not exist" in line
    (tmp_path / "evals").mkdir()  # an explicit, empty --out: still nothing written into it
    line = cli_error(capsys, ["meta-test", "--quiet", "--checkpoint", str(model),
                              "--method", "protonet", "--out", str(tmp_path / "evals"),
                              "--set", "data.name=omniglot", *missing])
    assert "does not exist" in line
    assert not (tmp_path / "runs").exists() and not any((tmp_path / "evals").iterdir())
