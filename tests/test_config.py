"""Config: defaults, presets, overrides, validation and clear errors."""

from __future__ import annotations

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
