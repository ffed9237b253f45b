"""What a loader does to an image travels with the checkpoint, for every dataset format.

For each format, small files in the real format are written here; a checkpoint is made the
way the phases make one (``model_info`` of a split the loader returned: its colour mode,
size, resize policy, ink polarity and statistics). ``mtl meta-test`` scores seeded
episodes; :class:`FewShotClassifier` and ``mtl adapt``, given the dataset's *raw* files (or,
for the pickled and generated formats, the raw arrays), must reproduce every episode's
accuracy and each other's predictions. Omniglot's loader inverts its files, so a model
trained there must invert a user's raw Omniglot PNGs — in ``adapt`` and in meta-test on a
plain ``folder`` copy of them — and a control shows that not inverting changes the answers.
One test runs the real ``mtl pretrain`` on Omniglot files, so the phase's copy into the
checkpoint is covered too.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from PIL import Image

from metatransfer import FewShotClassifier
from metatransfer.checkpoints import read_info, save_model
from metatransfer.cli import main
from metatransfer.config import DataConfig, RunConfig
from metatransfer.data import load_split
from metatransfer.data.episodes import EpisodeSampler
from metatransfer.data.omniglot import VAL_ALPHABETS
from metatransfer.models import create_backbone
from metatransfer.phases.pretrain import model_info
from metatransfer.preprocessing import for_checkpoint

EPISODES, WAYS, SHOTS, QUERIES = 6, 3, 1, 2
STEPS, LR = 10, 0.5
SPLITS = resources.files("metatransfer") / "data" / "splits"
LOADER_MODULES = ("folder", "miniimagenet", "tieredimagenet", "omniglot")


# ----------------------------------------------------------------------------- writers


def class_picture(cls: int, i: int, h: int = 30, w: int = 24) -> np.ndarray:
    """RGB: a class colour in the middle, noise around it (resizing and cropping matter)."""
    rng = np.random.default_rng([cls, i, 7])
    image = rng.integers(0, 256, (h, w, 3)).astype(np.float64)
    colour = np.random.default_rng([cls, 99]).integers(30, 226, 3)
    y0, y1, x0, x1 = h // 4, 3 * h // 4, w // 4, 3 * w // 4
    image[y0:y1, x0:x1] = colour + rng.normal(0, 40, (y1 - y0, x1 - x0, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def drawing(cls: int, i: int, size: int = 105) -> np.ndarray:
    """An Omniglot-like 1-bit drawing, black ink on white: a few strokes fixed per
    character, jittered per drawing."""
    strokes = np.random.default_rng([cls, 5]).integers(10, size - 30, (3, 2))
    jitter = np.random.default_rng([cls, i, 6]).integers(-4, 5, (3, 2))
    bits = np.ones((size, size), dtype=bool)
    for k, ((y, x), (dy, dx)) in enumerate(zip(strokes, jitter, strict=True)):
        y, x = y + dy, x + dx
        if k % 2:
            bits[y: y + 20, x: x + 6] = False
        else:
            bits[y: y + 6, x: x + 20] = False
    return bits


def write_omniglot(root: Path, alphabets: dict[str, int], drawings: int = 4,
                   size: int = 105) -> None:
    """``images_background/<Alphabet>/characterNN/*.png`` as in the Omniglot archive."""
    cls = 0
    for alphabet, chars in alphabets.items():
        for c in range(1, chars + 1):
            folder = root / "images_background" / alphabet / f"character{c:02d}"
            folder.mkdir(parents=True)
            for i in range(drawings):
                Image.fromarray(drawing(cls, i, size)).save(folder / f"{cls:04d}_{i + 1:02d}.png")
            cls += 1


def write_classes(folder: Path, names: list[str], per: int = 3, suffix: str = ".png") -> None:
    for cls, name in enumerate(names):
        (folder / name).mkdir(parents=True)
        for i in range(per):
            Image.fromarray(class_picture(cls, i)).save(folder / name / f"{name}_{i}{suffix}",
                                                        quality=95)


def write_cifar(root: Path, per_train: int = 3, per_test: int = 1) -> None:
    """A ``cifar-100-python/`` archive with the real keys and class names."""
    pairs = [p for s in ("train", "val", "test")
             for p in json.loads((SPLITS / "cifarfs" / f"{s}.json").read_text())]
    fine_names = sorted(c for _, c in pairs)
    coarse_names = sorted({s for s, _ in pairs})
    coarse_of = {c: coarse_names.index(s) for s, c in pairs}
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for part, per in (("train", per_train), ("test", per_test)):
        fine = [f for f in range(100) for _ in range(per)]
        data = np.stack([class_picture(f, i + 10 * (part == "test"), 32, 32)
                         .transpose(2, 0, 1).reshape(-1) for i, f in enumerate(fine)])
        batch = {b"filenames": [f"{i}.png".encode() for i in range(len(fine))],
                 b"batch_label": part.encode(), b"fine_labels": fine,
                 b"coarse_labels": [coarse_of[fine_names[f]] for f in fine], b"data": data}
        (folder / part).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"fine_label_names": [n.encode() for n in fine_names],
            b"coarse_label_names": [n.encode() for n in coarse_names]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))


# ----------------------------------------------------------------------------- formats


def make_format(kind: str, root: Path) -> tuple[dict, str]:
    """Write a small dataset of ``kind``; ``(data config fields, evaluated split)``."""
    wnids = ["n01532829", "n01558993", "n01704323", "n01749939"]
    if kind == "folder":
        write_classes(root / "test", ["cat", "dog", "fox", "owl"])
        return {"name": "folder", "image_size": 16}, "test"
    if kind == "folder-crop":  # the resize-then-centre-crop policy of imported models
        write_classes(root / "test", ["cat", "dog", "fox", "owl"])
        return {"name": "folder", "image_size": 16, "resize": "crop:22"}, "test"
    if kind == "miniimagenet-csv":
        (root / "images").mkdir(parents=True)
        lines = ["filename,label"]
        for cls, wnid in enumerate(wnids):
            for i in range(3):
                name = f"{wnid}{i:08d}.jpg"
                Image.fromarray(class_picture(cls, i, 84, 84)).save(root / "images" / name,
                                                                   quality=95)
                lines.append(f"{name},{wnid}")
        (root / "test.csv").write_text("\n".join(lines) + "\n")
        return {"name": "miniimagenet", "image_size": 16}, "test"
    if kind == "miniimagenet-folder":
        write_classes(root / "test", wnids, suffix=".jpg")
        return {"name": "miniimagenet", "image_size": 16}, "test"
    if kind == "tieredimagenet":  # a split without a standard class list: not checked
        write_classes(root / "novel", wnids, suffix=".jpg")
        return {"name": "tieredimagenet", "image_size": 16}, "novel"
    if kind == "omniglot":  # 105 px files, resized to 28 and inverted by the loader
        write_omniglot(root, {a: 1 for a in VAL_ALPHABETS})
        return {"name": "omniglot"}, "val"
    if kind == "cifarfs":
        write_cifar(root)
        return {"name": "cifarfs"}, "test"
    if kind == "glyphs":
        return {"name": "glyphs", "glyph_classes": 20, "glyph_images": 3,
                "image_size": 16}, "test"
    raise ValueError(kind)


FORMATS = ["folder", "folder-crop", "miniimagenet-csv", "miniimagenet-folder",
           "tieredimagenet", "omniglot", "cifarfs", "glyphs"]


@pytest.fixture
def file_spy(monkeypatch):
    """Records the files behind each split's rows (the loaders' ``paths``, in row order)."""
    import importlib

    seen: dict[str, list[Path]] = {}
    for module_name in LOADER_MODULES:
        module = importlib.import_module(f"metatransfer.data.{module_name}")
        real = module.load_image_files

        def spy(*, real=real, **kw):
            seen[f"{kw['dataset']}/{kw['split']}"] = list(kw["paths"])
            return real(**kw)

        monkeypatch.setattr(module, "load_image_files", spy)
    return seen


def raw_sources(kind: str, split, root: Path, spy: dict) -> list:
    """What a user holds for each row of ``split``: its file, or for CIFAR the pickle's
    RGB array and for the generated glyphs the rendered array."""
    if kind == "cifarfs":
        cfg = DataConfig(name="cifarfs", root=str(root))  # the dataset's own decoding
        return list(load_split(cfg, split.name.split("/")[1]).images)
    if kind == "glyphs":
        return list(split.images)  # rendered once, as stored: nothing else to hold
    return spy[split.name]


def make_checkpoint(path: Path, split, data: DataConfig, seed: int = 0) -> None:
    """A random Conv-4 (with non-trivial BN statistics) saved as pre-training saves one:
    ``model_info`` of the split the loader returned."""
    torch.manual_seed(seed)
    backbone = create_backbone("conv4", in_channels=split.channels, width=8)
    with torch.no_grad():
        backbone.train()
        sample = torch.from_numpy(np.array(split.images[:32])).permute(0, 3, 1, 2)
        mean = torch.tensor(split.mean).view(1, -1, 1, 1)
        std = torch.tensor(split.std).view(1, -1, 1, 1)
        backbone((sample.float() / 255 - mean) / std)
    cfg = RunConfig(data=data)
    cfg.model.backbone_args = {"width": 8}
    cfg.eval.inner_steps, cfg.eval.inner_lr = STEPS, LR
    save_model(path, model_info(cfg, split, backbone, "pretrain"), backbone.eval())


def meta_test(checkpoint: Path, data: dict, split: str, out: Path) -> dict:
    args = ["meta-test", "--quiet", "--checkpoint", str(checkpoint), "--method", "protonet,ft",
            "--out", str(out), "--set", "device=cpu", "--set", "amp=off",
            "--set", f"eval.episodes={EPISODES}", "--set", f"eval.ways=[{WAYS}]",
            "--set", f"eval.shots=[{SHOTS}]", "--set", f"eval.queries={QUERIES}",
            "--set", f"eval.inner_steps={STEPS}", "--set", f"eval.inner_lr={LR}",
            # ft on the checkpoint's loop, not the default preset's own tuned one
            "--set", "eval.ft_inner_steps=null", "--set", "eval.ft_inner_lr=null",
            "--set", f"eval.split={split}"]
    for key, value in data.items():
        args += ["--set", f"data.{key}={value}"]
    main(args)
    return {"results": json.loads((out / "results.json").read_text()),
            "episodes": json.loads((out / "episodes.json").read_text())}


def adapt_episodes(clf: FewShotClassifier, split, sources: list) -> tuple[list, list]:
    """Per-episode accuracy and predictions of ``clf`` fitted on each episode's raw support."""
    sampler = EpisodeSampler(split.indices_by_class, WAYS, SHOTS, QUERIES, seed=1234,
                             name=split.name)
    accs, predictions = [], []
    for ep in range(EPISODES):
        batch = sampler.episode(ep)
        names = [split.class_names[c] for c in batch.classes[0]]
        support = {n: [sources[i] for i in batch.support[0, j * SHOTS:(j + 1) * SHOTS]]
                   for j, n in enumerate(names)}
        truth = [names[j] for j in batch.query_labels()]
        predicted = clf.fit(support).predict([sources[i] for i in batch.query[0]])
        predictions.append(predicted)
        accs.append(float(np.mean([p == t for p, t in zip(predicted, truth, strict=True)])))
    return accs, predictions


def adapt_cli(checkpoint: Path, method: str, split, sources: list[Path], tmp: Path) -> list[str]:
    """``mtl adapt`` on episode 0, from folders of copies of the raw files."""
    sampler = EpisodeSampler(split.indices_by_class, WAYS, SHOTS, QUERIES, seed=1234,
                             name=split.name)
    batch = sampler.episode(0)
    for j in range(WAYS):
        folder = tmp / "support" / f"class{j}"
        folder.mkdir(parents=True)
        for i in batch.support[0, j * SHOTS:(j + 1) * SHOTS]:
            shutil.copy(sources[i], folder / f"{i}{sources[i].suffix}")
    (tmp / "query").mkdir()
    names = []
    for k, i in enumerate(batch.query[0]):
        names.append(f"{k:03d}{sources[i].suffix}")
        shutil.copy(sources[i], tmp / "query" / names[-1])
    main(["adapt", "--checkpoint", str(checkpoint), "--method", method, "--device", "cpu",
          "--amp", "off", "--inner-steps", str(STEPS), "--inner-lr", str(LR),
          "--support", str(tmp / "support"), "--query", str(tmp / "query"),
          "--output", str(tmp / "preds.json")])
    doc = json.loads((tmp / "preds.json").read_text())
    by_label = {f"class{j}": split.class_names[c] for j, c in enumerate(batch.classes[0])}
    return [by_label[p["prediction"]] for p in doc["predictions"]]


# ----------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("kind", FORMATS)
def test_adapt_on_raw_files_gives_meta_tests_answers(kind, tmp_path, file_spy):
    fields, split_name = make_format(kind, tmp_path / "data")
    data = DataConfig(root=None if kind == "glyphs" else str(tmp_path / "data"), **fields)
    split = load_split(data, split_name)
    checkpoint = tmp_path / "model.safetensors"
    make_checkpoint(checkpoint, split, data)
    info = read_info(checkpoint)
    assert info.invert is (kind == "omniglot")  # the loader's polarity, recorded
    assert info.in_channels == split.channels and info.resize == split.decoding.resize
    cli_data = {k: v for k, v in fields.items() if k not in ("image_size", "resize")}
    if kind != "glyphs":
        cli_data["root"] = str(tmp_path / "data")
    result = meta_test(checkpoint, cli_data, split_name, tmp_path / "eval")
    prep = result["results"]["preprocessing"]
    assert prep["invert"] is info.invert and prep["channels"] == info.in_channels
    assert prep["overridden"] == []
    sources = raw_sources(kind, split, tmp_path / "data", file_spy)
    assert len(sources) == len(split)
    for method in ("protonet", "ft"):
        clf = FewShotClassifier.from_checkpoint(checkpoint, method, "cpu", amp="off")
        accs, predictions = adapt_episodes(clf, split, sources)
        np.testing.assert_allclose(accs, result["episodes"][f"{method}/{WAYS}w{SHOTS}s"],
                                   atol=1e-4, err_msg=f"{kind} {method}")
        if isinstance(sources[0], Path):
            assert adapt_cli(checkpoint, method, split, sources, tmp_path / method) \
                == predictions[0]


def omniglot_world(tmp_path: Path) -> dict:
    """Omniglot files (train and val alphabets), a checkpoint trained on them by the real
    `mtl pretrain`, and a plain folder dataset holding the very same raw val PNGs."""
    root = tmp_path / "omniglot"
    write_omniglot(root, {"Latin": 3, "Greek": 3, **{a: 1 for a in VAL_ALPHABETS}})
    run = tmp_path / "run"
    main(["pretrain", "--quiet", "--out", str(run), "--set", "data.name=omniglot",
          "--set", f"data.root={root}", "--set", "device=cpu", "--set", "amp=off",
          "--set", "model.backbone_args={width: 8}", "--set", "pretrain.epochs=1",
          "--set", "pretrain.batch_size=8", "--set", "pretrain.val_episodes=4",
          "--set", "pretrain.val_ways=3", "--set", "pretrain.val_queries=2",
          "--set", f"eval.inner_steps={STEPS}", "--set", f"eval.inner_lr={LR}"])
    folder = tmp_path / "folder"
    for char in sorted((root / "images_background").glob("*/*")):
        if char.parent.name in VAL_ALPHABETS:
            shutil.copytree(char, folder / "test" / f"{char.parent.name}_{char.name}")
    return {"root": root, "checkpoint": run / "pretrain_best.safetensors", "folder": folder}


def test_omniglot_polarity_travels_to_folder_data_and_adapt(tmp_path, file_spy):
    """The acceptance path: train on Omniglot, then run on its raw PNGs anywhere."""
    world = omniglot_world(tmp_path)
    info = read_info(world["checkpoint"])
    assert info.invert is True and info.in_channels == 1 and info.source == "omniglot"
    on_omniglot = meta_test(world["checkpoint"], {"name": "omniglot", "root": world["root"]},
                            "val", tmp_path / "eval-omniglot")
    # a folder of the raw PNGs (RGB by default, not inverted by default) is read in the
    # checkpoint's mode and polarity: the very same images, so the very same accuracies
    on_folder = meta_test(world["checkpoint"], {"name": "folder", "root": world["folder"]},
                          "test", tmp_path / "eval-folder")
    assert on_folder["results"]["preprocessing"]["invert"] is True
    assert on_folder["episodes"] == on_omniglot["episodes"]
    folder_split = load_split(for_checkpoint(DataConfig(name="folder",
                                                        root=str(world["folder"])),
                                             info)[0], "test")
    assert folder_split.channels == 1 and folder_split.decoding.invert
    sources = file_spy["folder/test"]
    clf = FewShotClassifier.from_checkpoint(world["checkpoint"], "protonet", "cpu", amp="off")
    accs, predictions = adapt_episodes(clf, folder_split, sources)
    np.testing.assert_allclose(accs, on_omniglot["episodes"][f"protonet/{WAYS}w{SHOTS}s"],
                               atol=1e-4)
    assert clf.warnings == []  # raw Omniglot PNGs are what the model was trained on
    # control: reading the raw files as stored gives other answers
    clf.model.preprocessing = dataclasses.replace(clf.model.preprocessing, invert=False)
    _, uninverted = adapt_episodes(clf, folder_split, sources)
    assert uninverted != predictions
    assert clf.warnings  # and the user is told why


@pytest.mark.skipif(not (SHARED_DATA / "omniglot" / "images_background").is_dir(),
                    reason=f"shared Omniglot data not found at {SHARED_DATA}")
def test_real_omniglot_pngs_adapt_equals_meta_test(tmp_path, file_spy):
    """The dataset's own PNGs (held-back val alphabets), an Omniglot-preprocessing model."""
    root = SHARED_DATA / "omniglot"
    data = DataConfig(name="omniglot", root=str(root))
    split = load_split(data, "val")
    checkpoint = tmp_path / "model.safetensors"
    make_checkpoint(checkpoint, split, data, seed=3)
    result = meta_test(checkpoint, {"name": "omniglot", "root": root}, "val", tmp_path / "eval")
    clf = FewShotClassifier.from_checkpoint(checkpoint, "protonet", "cpu", amp="off")
    accs, _ = adapt_episodes(clf, split, file_spy["omniglot/val"])
    np.testing.assert_allclose(accs, result["episodes"][f"protonet/{WAYS}w{SHOTS}s"], atol=1e-4)
    assert clf.warnings == []
