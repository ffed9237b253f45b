"""Ink polarity: recorded in checkpoints, overridable, and a one-line warning when a user's
images look like negatives of the training images (real Omniglot PNGs both ways; real
miniImageNet photos never warn)."""

from __future__ import annotations

import io
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from PIL import Image, ImageOps
from safetensors.torch import save_file

from metatransfer import FewShotClassifier
from metatransfer.checkpoints import METADATA_KEY, ModelInfo, read_info, save_model
from metatransfer.cli import main
from metatransfer.config import DataConfig
from metatransfer.data import miniimagenet, omniglot
from metatransfer.data.images import read_image
from metatransfer.models import create_backbone
from metatransfer.preprocessing import Decoding, for_checkpoint, polarity_warning

OMNIGLOT = SHARED_DATA / "omniglot" / "images_background"
MINI = SHARED_DATA / "miniimagenet" / "images"
needs_omniglot = pytest.mark.skipif(not OMNIGLOT.is_dir(),
                                    reason=f"shared Omniglot data not found at {OMNIGLOT}")
needs_mini = pytest.mark.skipif(not MINI.is_dir(),
                                reason=f"shared miniImageNet data not found at {MINI}")


def checkpoint(path: Path, *, channels: int, size: int, mean, std, invert: bool,
               source: str) -> Path:
    torch.manual_seed(0)
    backbone = create_backbone("conv4", in_channels=channels, width=8).eval()
    save_model(path, ModelInfo(backbone="conv4", backbone_args={"width": 8},
                               in_channels=channels, image_size=size, invert=invert,
                               mean=list(mean), std=list(std), inner_steps=5, inner_lr=0.1,
                               source=source), backbone)
    return path


@pytest.fixture
def omniglot_model(tmp_path) -> Path:
    """A model with the Omniglot loader's preprocessing: 28 px grey, inverted."""
    return checkpoint(tmp_path / "omniglot.safetensors", channels=1, size=28,
                      mean=omniglot.MEAN, std=omniglot.STD, invert=True, source="omniglot")


def characters(count: int = 5, per: int = 2) -> dict[str, list[Path]]:
    """The first drawings of ``count`` characters of the val alphabets (held back)."""
    out = {}
    for alphabet in omniglot.VAL_ALPHABETS[:count]:
        char = sorted((OMNIGLOT / alphabet).iterdir())[0]
        out[f"{alphabet}/{char.name}"] = sorted(char.glob("*.png"))[:per]
    return out


def negatives(support: dict[str, list[Path]], folder: Path) -> dict[str, list[Path]]:
    """White-on-black copies, as a user's scans of light ink on dark paper would be."""
    out = {}
    for name, paths in support.items():
        out[name] = []
        for p in paths:
            target = folder / name.replace("/", "_") / p.name
            target.parent.mkdir(parents=True, exist_ok=True)
            ImageOps.invert(Image.open(p).convert("L")).save(target)
            out[name].append(target)
    return out


# ----------------------------------------------------------------------------- the rule


def test_polarity_rule():
    dark, bright = np.full((4, 8, 8, 1), 20, np.uint8), np.full((4, 8, 8, 1), 235, np.uint8)
    grey = np.full((4, 8, 8, 1), 140, np.uint8)
    inverted_training = (0.08,)
    assert polarity_warning(dark, inverted_training, True) is None  # same side
    message = polarity_warning(bright, inverted_training, True)
    assert message and "\n" not in message and "look inverted" in message
    # in the files' own terms: the user's are dark, the training files were bright
    assert "yours are mostly dark (mean brightness 0.08)" in message
    assert "training files were mostly bright (0.92, before its loader inverted them)" in message
    assert polarity_warning(grey, inverted_training, True) is None  # not clearly one way
    assert polarity_warning(bright, (0.45, 0.45, 0.42), False) is None  # photos: never
    assert polarity_warning(dark, (0.9,), False) is not None
    assert polarity_warning(dark[:0], (0.9,), False) is None


@needs_omniglot
def test_real_omniglot_pngs_warn_only_when_inverted(omniglot_model, tmp_path, caplog):
    clf = FewShotClassifier.from_checkpoint(omniglot_model, "protonet", "cpu")
    support = characters()
    with caplog.at_level(logging.WARNING, logger="metatransfer"):
        clf.fit(support)
    assert clf.warnings == [] and "inverted" not in caplog.text
    clf.fit(negatives(support, tmp_path / "neg"))
    assert len(clf.warnings) == 1 and "look inverted" in clf.warnings[0]
    assert "yours are mostly dark" in clf.warnings[0]
    assert caplog.text.count("look inverted") == 1


@needs_omniglot
def test_mtl_adapt_warns_in_one_line(omniglot_model, tmp_path, caplog, capsys):
    support = negatives(characters(3, 1), tmp_path / "support")
    query = next(iter(characters(1, 3).values()))[2]
    args = ["adapt", "--checkpoint", str(omniglot_model), "--device", "cpu",
            "--support", str(tmp_path / "support"), "--query", str(query)]
    with caplog.at_level(logging.WARNING, logger="metatransfer"):
        main(args)
    warned = [r for r in caplog.records if "look inverted" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    assert "\n" not in warned[0].getMessage() and len(support) == 3
    assert "prediction" in capsys.readouterr().out  # and it still answers
    caplog.clear()
    # the same drawings as stored: no warning
    for folder in (tmp_path / "support").iterdir():
        for png in folder.iterdir():
            ImageOps.invert(Image.open(png).convert("L")).save(png)
    with caplog.at_level(logging.WARNING, logger="metatransfer"):
        main(args)
    assert "look inverted" not in caplog.text


@needs_mini
def test_miniimagenet_photos_never_warn(tmp_path):
    """Photos average about 0.45: a model trained on them never takes them for negatives,
    whatever few photos a user gives."""
    files = sorted(MINI.glob("*.jpg"))
    rows = np.stack([read_image(p, 84, 3) for p in random.Random(0).sample(files, 300)])
    for row in rows:  # 1-shot supports, the most extreme case
        assert polarity_warning(row[None], miniimagenet.MEAN, False) is None
    model = checkpoint(tmp_path / "mini.safetensors", channels=3, size=84,
                       mean=miniimagenet.MEAN, std=miniimagenet.STD, invert=False,
                       source="miniimagenet")
    clf = FewShotClassifier.from_checkpoint(model, "protonet", "cpu")
    darkest = [files[i] for i in np.argsort(rows.reshape(len(rows), -1).mean(1))[:3]]
    clf.fit({"a": darkest[:1], "b": darkest[1:]})
    assert clf.warnings == []


@needs_omniglot
def test_serve_returns_the_warning(omniglot_model, tmp_path):
    pytest.importorskip("flask", reason="Flask is not installed (pip install flask)")
    from metatransfer.serve import create_app

    client = create_app(omniglot_model, device="cpu").test_client()

    def post(support):
        data = {"classes": json.dumps(list(support))}
        for i, paths in enumerate(support.values()):
            data[f"support-{i}"] = [(io.BytesIO(p.read_bytes()), p.name) for p in paths]
        data["query"] = [(io.BytesIO(p.read_bytes()), p.name) for p in support["a"][:1]]
        res = client.post("/api/predict", data=data, content_type="multipart/form-data")
        assert res.status_code == 200, res.get_json()
        return res.get_json()["warnings"]

    raw = list(characters(2, 1).values())
    assert post({"a": raw[0], "b": raw[1]}) == []
    neg = list(negatives(characters(2, 1), tmp_path / "neg").values())
    warnings = post({"a": neg[0], "b": neg[1]})
    assert len(warnings) == 1 and "look inverted" in warnings[0] and "mtl-serve" not in warnings[0]


# ----------------------------------------------------------------------------- records


def test_checkpoints_written_before_polarity_was_recorded(tmp_path):
    """Omniglot's loader has always inverted: an old Omniglot checkpoint is read as such."""
    for source, expected in (("omniglot", True), ("miniimagenet", False), ("", False)):
        info = ModelInfo(backbone="conv4", source=source).__dict__.copy()
        del info["invert"]
        path = tmp_path / f"old-{source or 'none'}.safetensors"
        save_file({"backbone.x": torch.zeros(1)}, str(path),
                  metadata={METADATA_KEY: json.dumps(info)})
        assert read_info(path).invert is expected, source
    assert Decoding(28, 1, invert=True).cache_parts() == {"invert": True}
    assert Decoding(28, 1).cache_parts() == {}  # old caches keep their keys


def test_data_invert_overrides_the_checkpoint_and_says_so(caplog):
    info = ModelInfo(backbone="conv4", in_channels=1, image_size=28, invert=True,
                     mean=[0.08], std=[0.27], source="omniglot")
    data, prep = for_checkpoint(DataConfig(name="folder"), info)
    assert (data.invert, data.channels, prep.invert, prep.overridden) == (True, 1, True, [])
    with caplog.at_level(logging.WARNING):
        data, prep = for_checkpoint(DataConfig(name="folder", invert=False), info, "meta-test: ")
    assert data.invert is False and prep.overridden == ["invert"]
    assert "meta-test: ink polarity invert=False overrides the checkpoint's invert=True" \
        in caplog.text
    assert prep.as_dict()["invert"] is False and prep.as_dict()["channels"] == 1
    with pytest.raises(Exception, match="data.channels=3.*1-channel"):
        for_checkpoint(DataConfig(name="folder", channels=3), info)


def test_training_on_inverted_files_records_flipped_statistics(tmp_path):
    """``data.invert`` on a dataset of its own: the loader's statistics follow the pixels."""
    from metatransfer.data import load_split

    for name in ("a", "b"):
        (tmp_path / "d" / "train" / name).mkdir(parents=True)
        Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / "d" / "train" /
                                                                 name / "x.png")
    plain = load_split(DataConfig(name="folder", root=str(tmp_path / "d")), "train")
    flipped = load_split(DataConfig(name="folder", root=str(tmp_path / "d"), invert=True,
                                    channels=1), "train")
    assert plain.decoding == Decoding(84, 3) and flipped.decoding == Decoding(84, 1, invert=True)
    assert int(flipped.images[0, 0, 0, 0]) == 55 and int(plain.images[0, 0, 0, 0]) == 200
    assert flipped.mean[0] == pytest.approx(1 - (0.299 * 0.485 + 0.587 * 0.456 + 0.114 * 0.406))
