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


def input_size(cfg: DataConfig) -> int:
    """The side images are resized to: ``data.image_size``, or when it is 0 the loader
    module's own default (``DEFAULT_SIZE`` / ``DEFAULT_IMAGE_SIZE``; 0 if it has none), so
    what is measured for a run (the ``amp=auto`` probe) is measured at the run's size."""
    if cfg.image_size or cfg.name not in _LOADERS:
        return cfg.image_size
    import sys

    module = sys.modules.get(_LOADERS[cfg.name].__module__)
    return int(getattr(module, "DEFAULT_SIZE", getattr(module, "DEFAULT_IMAGE_SIZE", 0)))


def load_split(cfg: DataConfig, split: str) -> ImageSplit:
    """Load split ``split`` (e.g. ``train``, ``val``, ``test``) of the dataset ``cfg.name``."""
    if cfg.name not in _LOADERS:
        raise ConfigError(
            f"unknown dataset '{cfg.name}'; choose one of {', '.join(dataset_names())}"
        )
    return _LOADERS[cfg.name](cfg, split)
