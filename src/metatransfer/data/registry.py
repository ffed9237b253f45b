"""Dataset registry: every on-disk format registers a loader ``(cfg, split) -> ImageSplit``."""

from __future__ import annotations

from collections.abc import Callable

from ..config import DataConfig
from ..errors import ConfigError
from .base import ImageSplit

Loader = Callable[[DataConfig, str], ImageSplit]
_LOADERS: dict[str, Loader] = {}


def register_dataset(name: str):
    """Decorator adding a loader for dataset ``name``."""

    def wrap(loader: Loader) -> Loader:
        _LOADERS[name] = loader
        return loader

    return wrap


def dataset_names() -> list[str]:
    return sorted(_LOADERS)


def dataset_layouts() -> dict[str, str]:
    """``{name: what data.root must hold}``, from each loader module's ``LAYOUT``."""
    import sys

    layouts = {}
    for name in dataset_names():
        module = sys.modules.get(_LOADERS[name].__module__)
        layouts[name] = getattr(module, "LAYOUT", "built in: no data.root needed")
    return layouts


def load_split(cfg: DataConfig, split: str) -> ImageSplit:
    """Load split ``split`` (e.g. ``train``, ``val``, ``test``) of the dataset ``cfg.name``."""
    if cfg.name not in _LOADERS:
        raise ConfigError(
            f"unknown dataset '{cfg.name}'; choose one of {', '.join(dataset_names())}"
        )
    return _LOADERS[cfg.name](cfg, split)
