"""The built-in glyphs dataset: class list, splits, determinism and the on-disk cache."""

from __future__ import annotations

import numpy as np
import pytest

from metatransfer.config import DataConfig
from metatransfer.data import glyphs, load_split
from metatransfer.errors import ConfigError, DataError


def small(tmp_path, **kw) -> DataConfig:
    args = dict(glyph_classes=10, glyph_images=4, image_size=20, cache_dir=str(tmp_path))
    return DataConfig(**{**args, **kw})


def load_all(cfg: DataConfig) -> dict:
    return {split: glyphs.load_glyphs(cfg, split) for split in glyphs.SPLITS}


def test_default_settings_have_enough_distinct_classes():
    available = glyphs.candidate_codepoints()
    assert len(available) >= 400
    assert len(set(available)) == len(available)
    chars = {chr(cp) for cp in available}
    assert "A" in chars and "\u0391" not in chars and "\u0410" not in chars  # homoglyphs
    splits = glyphs.split_classes(DataConfig().glyph_classes, seed=0)
    sizes = [len(splits[s]) for s in glyphs.SPLITS]
    assert sizes == [288, 96, 96]
    assert set().union(*splits.values()) == set(available[:480])


def test_every_class_is_in_three_bundled_fonts():
    fonts = glyphs.bundled_fonts()
    for cp in glyphs.candidate_codepoints():
        assert sum(cp in f.coverage for f in fonts) >= glyphs.MIN_FONT_FILES


def test_splits_are_disjoint_and_cover_the_classes(tmp_path):
    data = load_all(small(tmp_path))
    sets = [set(data[s].meta["codepoints"]) for s in glyphs.SPLITS]
    assert sum(map(len, sets)) == 10
    assert set().union(*sets) == set(glyphs.candidate_codepoints()[:10])
    assert all(len(s) >= 1 for s in sets)


def test_shapes_labels_and_names(tmp_path):
    data = load_all(small(tmp_path))
    for split in data.values():
        n = split.num_classes
        assert split.images.shape == (4 * n, 20, 20, 1)
        assert split.images.dtype == np.uint8
        assert split.labels.dtype == np.int64
        assert sorted(set(split.labels.tolist())) == list(range(n))
        assert all("U+" in name for name in split.class_names)
        assert 0 < split.mean[0] < 1 and 0 < split.std[0] < 1
    assert glyphs.class_name(0x41) == "A U+0041 LATIN CAPITAL LETTER A"


def test_images_are_not_blank_and_vary_within_a_class(tmp_path):
    split = glyphs.load_glyphs(small(tmp_path), "train")
    images = np.asarray(split.images, dtype=np.float32)
    assert (images.reshape(len(images), -1).std(axis=1) > 10).all()
    for idx in split.indices_by_class:
        first = images[idx[0]]
        assert all(np.abs(images[i] - first).mean() > 5 for i in idx[1:])


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = load_all(small(tmp_path / "a"))
    b = load_all(small(tmp_path / "b"))
    c = load_all(small(tmp_path / "c", glyph_seed=1))
    for s in glyphs.SPLITS:
        assert np.array_equal(a[s].images, b[s].images)
        assert a[s].class_names == b[s].class_names
    assert not all(np.array_equal(a[s].images, c[s].images) for s in glyphs.SPLITS)


def test_an_image_depends_only_on_seed_character_and_index(tmp_path):
    """The per-image RNG makes pixels independent of how many classes were asked for."""
    few = load_all(small(tmp_path / "few", glyph_classes=6))
    many = load_all(small(tmp_path / "many", glyph_classes=9))

    def by_codepoint(data):
        out = {}
        for split in data.values():
            for label, cp in enumerate(split.meta["codepoints"]):
                out[cp] = np.asarray(split.images[split.labels == label])
        return out

    few_images, many_images = by_codepoint(few), by_codepoint(many)
    assert set(few_images) <= set(many_images)
    for cp, images in few_images.items():
        assert np.array_equal(images, many_images[cp])


def test_second_load_reads_the_cache(tmp_path, monkeypatch):
    cfg = small(tmp_path)
    glyphs.load_glyphs(cfg, "train")

    def fail(*args, **kw):
        raise AssertionError("rendered again instead of reading the cache")

    monkeypatch.setattr(glyphs, "render_glyph", fail)
    for split in glyphs.SPLITS:
        assert isinstance(glyphs.load_glyphs(cfg, split).images, np.memmap)
    with pytest.raises(AssertionError):  # a different parameter is a different cache entry
        glyphs.load_glyphs(small(tmp_path, glyph_images=5), "train")


def test_registered_under_its_name(tmp_path):
    split = load_split(small(tmp_path, name="glyphs"), "val")
    assert split.name == "glyphs/val"


def test_bad_split_and_sizes_fail_clearly(tmp_path):
    with pytest.raises(DataError, match="train, val, test"):
        glyphs.load_glyphs(small(tmp_path), "validation")
    too_many = len(glyphs.candidate_codepoints()) + 1
    with pytest.raises(ConfigError, match="glyph_classes"):
        glyphs.load_glyphs(small(tmp_path, glyph_classes=too_many), "train")
    with pytest.raises(ConfigError, match="glyph_images"):
        glyphs.load_glyphs(small(tmp_path, glyph_images=0), "train")


def _clear_font_caches() -> None:
    for value in vars(glyphs).values():
        if hasattr(value, "cache_clear"):
            value.cache_clear()


def _fake_system_font(folder) -> None:
    """A copy of a bundled font under a new family name, as a font package would add."""
    from fontTools.ttLib import TTFont

    font = TTFont(str(glyphs._mpl_font_dir() / "DejaVuSans.ttf"))
    for record in font["name"].names:
        if record.nameID in (1, 4, 6, 16):
            record.string = "Fake Sans" if record.nameID != 6 else "FakeSans"
    folder.mkdir(parents=True)
    font.save(str(folder / "FakeSans.ttf"))


def test_rendering_does_not_depend_on_system_fonts(tmp_path, monkeypatch):
    """Fonts a user installs (in ~/.fonts, ~/.local/share/fonts) must not change the data."""
    before = load_all(small(tmp_path / "before"))
    fingerprint = glyphs.glyph_font_fingerprint()
    home = tmp_path / "home"
    _fake_system_font(home / ".fonts")
    _fake_system_font(home / ".local" / "share" / "fonts")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local" / "share"))
    _clear_font_caches()
    try:
        after = load_all(small(tmp_path / "after"))
        assert glyphs.glyph_font_fingerprint() == fingerprint
    finally:
        monkeypatch.undo()
        _clear_font_caches()
    for s in glyphs.SPLITS:
        assert np.array_equal(before[s].images, after[s].images)
        assert after[s].meta["fonts"] == before[s].meta["fonts"]


def test_only_bundled_fonts_are_used_and_fingerprinted(tmp_path):
    split = glyphs.load_glyphs(small(tmp_path), "train")
    bundled = sorted(p.name for p in glyphs._mpl_font_dir().glob("*.ttf"))
    assert split.meta["fonts"] and set(split.meta["fonts"]) <= set(bundled)
    fingerprint = glyphs.glyph_font_fingerprint()
    assert split.meta["data_fingerprint"] == fingerprint
    assert fingerprint.startswith("fonts-") and len(fingerprint) == len("fonts-") + 16


def test_a_data_root_is_refused_not_ignored(tmp_path):
    """`mtl pretrain --set data.root=/does-not-exist` (no preset) used to train on the
    built-in set without a word."""
    with pytest.raises(ConfigError, match=r"data.root=/does-not-exist .*built in.*"
                                          r"data.root=null.*mtl data list"):
        glyphs.load_glyphs(small(tmp_path, root="/does-not-exist"), "train")


def test_first_generation_says_so_once(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="metatransfer"):
        glyphs.load_glyphs(small(tmp_path), "train")
        glyphs.load_glyphs(small(tmp_path), "val")
    lines = [r.getMessage() for r in caplog.records if "generating" in r.getMessage()]
    assert len(lines) == 1 and "10 characters x 4 images" in lines[0]
    assert str(tmp_path) in lines[0]  # where the cache goes
