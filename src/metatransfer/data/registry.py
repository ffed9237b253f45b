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


def load_split(cfg: DataConfig, split: str) -> ImageSplit:
    """Load split ``split`` (e.g. ``train``, ``val``, ``test``) of the dataset ``cfg.name``."""
    if cfg.name not in _LOADERS:
        raise ConfigError(
            f"unknown dataset '{cfg.name}'; choose one of {', '.join(dataset_names())}"
        )
    return _LOADERS[cfg.name](cfg, split)
