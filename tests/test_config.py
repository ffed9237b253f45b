"""Config: defaults, presets, overrides, validation and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from metatransfer.config import RunConfig, from_dict, load_config, preset_names, to_dict
from metatransfer.errors import ConfigError


def test_overrides_are_typed():
    cfg = load_config(overrides=["meta.inner_steps=50", "eval.shots=[1,5,10]",
                                 "meta.first_order=true", "pretrain.lr=1e-2",
                                 "model.backbone_args={width: 32}"])
    assert cfg.meta.inner_steps == 50 and cfg.eval.shots == [1, 5, 10]
    assert cfg.meta.first_order is True and cfg.pretrain.lr == 0.01
    assert cfg.model.backbone_args == {"width": 32}


@pytest.mark.parametrize("item,message", [
    ("meta.inner_step=5", "did you mean 'meta.inner_steps'"),
    ("mета.x=1", "unknown config key"),
    ("meta.inner_steps=abc", "must be an integer"),
    ("meta.ht=sometimes", "must be one of off | reuse | resample"),
    ("meta.ways=1", "at least 2"),
    ("eval.episodes=0", "must be positive"),
    ("pretrain.lr=-1", "must not be negative"),
    ("meta.first_order=maybe", "true or false"),
    ("novalue", "key=value"),
])
def test_bad_overrides_fail_clearly(item, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[item])


def test_round_trip_through_dict():
    cfg = load_config(overrides=["meta.ht=reuse", "eval.ways=[5,20]"])
    assert from_dict(to_dict(cfg)) == cfg


def test_every_preset_loads():
    names = preset_names()
    assert names, "presets are shipped with the package"
    for name in names:
        assert isinstance(load_config(preset=name), RunConfig)


def test_unknown_preset_suggests():
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(preset="no-such-preset")


def test_preset_data_root_from_the_variable_or_the_search_path(tmp_path, monkeypatch):
    from metatransfer.config import DATA_ENV, DATA_PLACEHOLDER
    from metatransfer.data import load_split
    from metatransfer.errors import DataError

    (tmp_path / "data" / "miniimagenet").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # the current directory does not matter
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "data"))
    cfg = load_config(preset="mini40-conv4")
    assert cfg.data.root == str(tmp_path / "data" / "miniimagenet")
    assert load_config(preset="mini40-conv4", overrides=["data.root=/x"]).data.root == "/x"
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "elsewhere"))  # set: the only place looked at
    cfg = load_config(preset="omniglot-conv4")
    assert cfg.data.root == f"{DATA_PLACEHOLDER}/omniglot"
    with pytest.raises(DataError, match=f"no omniglot/ in .*elsewhere; set {DATA_ENV}"):
        load_split(cfg.data, "train")


def test_presets_do_not_hard_code_paths():
    for name in preset_names():
        root = load_config(preset=name).data.root
        assert root is None or root.startswith("$METATRANSFER_DATA") or Path(root).is_absolute()


def test_every_preset_can_evaluate_on_its_test_split():
    """--set eval.split=test works for every preset, those that report on val included:
    it names the data's test split (absent offline data is the loader's error to give)."""
    from metatransfer.config import eval_split

    for name in preset_names():
        cfg = load_config(preset=name, overrides=["eval.split=test"])
        assert cfg.eval.split == "test" and eval_split(cfg) == cfg.data.test_split, name


def test_config_keys_lists_every_set_key_with_type_default_and_help():
    from metatransfer.config import apply_override, config_keys

    rows = config_keys()
    keys = [key for key, *_ in rows]
    assert len(keys) == len(set(keys)) and "meta.inner_steps" in keys and "seed" in keys
    cfg = RunConfig()
    for key, kind, default, text in rows:
        assert kind and text, f"{key} needs a type and a comment in config.py"
        assert apply_override(cfg, f"{key}={default}") == cfg, key  # valid --set, as shown
    assert ("model.ss_granularity", "kernel | channel | mixed", '"kernel"',
            "SS per kernel (the paper's), per output channel, or mixed: per kernel on k×k "
            "convs and per channel on 1×1 ones (per kernel on a 1×1 conv is one scale per "
            "weight)") in rows
    assert ("model.ss_scope", "str", '"all"', "which layers get SS: all | last (the last stage) | "
            "glob patterns on layer names, comma-separated (e.g. model.blocks.6*,model.conv_head)"
            ) in rows
