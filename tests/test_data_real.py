"""The loaders on the real offline data (``$METATRANSFER_DATA``, else ``../shared/data``;
skipped when it is absent).

Decoding is the slow part (28,800 JPEGs, 19,280 PNGs on 2 cores), so one cache directory
serves the whole module and each split is decoded once.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import NO_DATA_HINT, SHARED_DATA

from metatransfer.config import DataConfig
from metatransfer.data import load_split
from metatransfer.data.omniglot import VAL_ALPHABETS, _lake
from metatransfer.data.verify import verify_dataset
from metatransfer.errors import DataError

MINI = SHARED_DATA / "miniimagenet"
OMNI = SHARED_DATA / "omniglot"

needs_mini = pytest.mark.skipif(not (MINI / "train.csv").is_file(),
                                reason=f"real miniImageNet not found at {MINI}; {NO_DATA_HINT}")
needs_omni = pytest.mark.skipif(not (OMNI / "images_background").is_dir(),
                                reason=f"real Omniglot not found at {OMNI}; {NO_DATA_HINT}")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("real-cache"))


@pytest.fixture(autouse=True)
def _no_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METATRANSFER_CACHE", str(tmp_path / "env-cache"))


@needs_mini
def test_miniimagenet_train_40_classes_and_cached_reload(cache_dir):
    cfg = DataConfig(name="miniimagenet", root=str(MINI), cache_dir=cache_dir)
    start = time.perf_counter()
    train = load_split(cfg, "train")
    first = time.perf_counter() - start
    assert train.images.shape == (24000, 84, 84, 3) and train.images.dtype == np.uint8
    assert train.num_classes == 40 and set(train.class_sizes) == {600}
    assert train.class_names == sorted(train.class_names)
    assert train.class_names[0] == "n01532829"
    start = time.perf_counter()
    again = load_split(cfg, "train")
    second = time.perf_counter() - start
    assert isinstance(again.images, np.memmap)
    np.testing.assert_array_equal(again.images[::997], train.images[::997])
    assert second * 10 <= first, (first, second)


@needs_mini
def test_miniimagenet_val_and_absent_test(cache_dir):
    cfg = DataConfig(name="miniimagenet", root=str(MINI), cache_dir=cache_dir)
    val = load_split(cfg, "val")
    assert val.images.shape == (4800, 84, 84, 3) and val.num_classes == 8
    assert set(val.class_sizes) == {600}
    assert 60 < val.images[:50].mean() < 200  # real photos, not zeros
    with pytest.raises(DataError, match=r"test\.csv is absent") as info:
        load_split(cfg, "test")
    assert "\n" not in str(info.value)
    report, ok = verify_dataset(cfg)
    assert not ok
    assert "train: 40 classes, 24000 images, 600-600 per class, 84x84x3" in report
    assert "val: 8 classes, 4800 images, 600-600 per class, 84x84x3" in report
    assert "test.csv is absent" in report


@needs_omni
def test_omniglot_background_964_characters(cache_dir):
    cfg = DataConfig(name="omniglot", root=str(OMNI), cache_dir=cache_dir)
    data = load_split(cfg, "background")
    assert data.images.shape == (964 * 20, 28, 28, 1)
    assert data.num_classes == 964 and set(data.class_sizes) == {20}
    assert len({n.split("/")[0] for n in data.class_names}) == 30
    ink = data.images.mean() / 255
    assert 0.03 < ink < 0.2  # inverted: mostly dark background, bright strokes
    # lake train/val partition the background alphabets (checked without decoding again)
    train, val = _lake(OMNI, "train"), _lake(OMNI, "val")
    assert (len(train), len(val)) == (792, 172)
    assert not set(train) & set(val) and sorted({**train, **val}) == data.class_names
    assert {n.split("/")[0] for n in val} == set(VAL_ALPHABETS)
    with pytest.raises(DataError, match="images_evaluation is absent"):
        load_split(cfg, "test")
