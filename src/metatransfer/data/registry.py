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


def _loader_module(name: str):
    """The module that registered dataset ``name``'s loader (its LAYOUT, DEFAULT_SIZE)."""
    import sys

    return sys.modules.get(_LOADERS[name].__module__)


def dataset_layouts() -> dict[str, str]:
    """``{name: what data.root must hold}``, from each loader module's ``LAYOUT``."""
    return {name: getattr(_loader_module(name), "LAYOUT", "built in: no data.root needed")
            for name in dataset_names()}


def input_size(cfg: DataConfig) -> int:
    """The side images are resized to: ``data.image_size``, or when it is 0 the loader
    module's own ``DEFAULT_SIZE`` (0 if it has none), so what is measured for a run (the
    ``amp=auto`` probe) is measured at the run's size."""
    if cfg.image_size or cfg.name not in _LOADERS:
        return cfg.image_size
    return int(getattr(_loader_module(cfg.name), "DEFAULT_SIZE", 0))


def load_split(cfg: DataConfig, split: str) -> ImageSplit:
    """Load split ``split`` (e.g. ``train``, ``val``, ``test``) of the dataset ``cfg.name``."""
    if cfg.name not in _LOADERS:
        raise ConfigError(
            f"unknown dataset '{cfg.name}'; choose one of {', '.join(dataset_names())}"
        )
    return _LOADERS[cfg.name](cfg, split)
