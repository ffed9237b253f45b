"""The method registry: names to classes, with no torch import (the CLI lists names fast).

A method registers itself with ``@register_method("name")`` when its module is imported;
:mod:`metatransfer.methods.catalog` imports the built-in ones. The names of the built-ins
are also written here, so that the config and the CLI can check and list them without
importing torch; a test checks these lists against the classes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ..errors import ConfigError

#: the built-in methods, in the order tables list them and comparisons pair them
BUILTIN_METHODS = ("mtl", "ft", "protonet", "ft-all")
#: what meta-test runs by default and ``mtl adapt`` / ``mtl serve`` may use: the built-ins
#: that embed each image once (``ft-all`` fine-tunes the backbone per episode)
EMBED_ONCE_METHODS = ("mtl", "ft", "protonet")

_CLASSES: dict[str, type] = {}


def register_method(name: str) -> Callable[[type], type]:
    """Class decorator: make a :class:`~metatransfer.methods.base.FewShotMethod` known
    under ``name`` to every tool (meta-test, adapt, serve, benchmarks, comparisons)."""

    def register(cls: type) -> type:
        known = _CLASSES.get(name)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise ValueError(f"method '{name}' is already registered ({known.__qualname__})")
        cls.name = name
        _CLASSES[name] = cls
        return cls

    return register


def method_names() -> list[str]:
    """Every method name: the built-ins, then the others in the order they registered."""
    return [*BUILTIN_METHODS, *(n for n in _CLASSES if n not in BUILTIN_METHODS)]


def registered(name: str) -> type | None:
    """The class registered under ``name``, or None (built-ins register on import)."""
    return _CLASSES.get(name)


def check_methods(names: Iterable[str]) -> None:
    """Every method named must exist (checked before any training starts)."""
    known = method_names()
    unknown = [m for m in names if m not in known]
    if unknown:
        raise ConfigError(f"unknown method '{unknown[0]}'; choose from {', '.join(known)}")


def comparison_pairs(names: Iterable[str]) -> list[tuple[str, str]]:
    """The paired comparisons ``a - b`` of the methods evaluated: every two of them, ``a``
    the one that comes first in :func:`method_names` (so ``mtl`` is compared with each
    baseline, and a newly registered method with every method before it)."""
    order = method_names()
    present = sorted(dict.fromkeys(names), key=order.index)
    return [(a, b) for i, a in enumerate(present) for b in present[i + 1:]]
