"""Every method, by name: imports the built-ins (so they register) and builds instances."""

from __future__ import annotations

from ..config import EvalConfig
from ..errors import ConfigError
from . import ft, ft_all, mtl, protonet  # noqa: F401  (register the built-in methods)
from .base import FewShotMethod
from .registry import method_names, registered


def method_class(name: str) -> type[FewShotMethod]:
    """The class registered as ``name``; an unknown name is a one-line ConfigError."""
    cls = registered(name)
    if cls is None:
        raise ConfigError(f"unknown method '{name}'; choose from {', '.join(method_names())}")
    return cls


def create_method(name: str, ec: EvalConfig, head=None) -> FewShotMethod:
    """Method ``name`` with its settings from ``ec`` (and θ_0 ``head`` when it needs it)."""
    return method_class(name).from_config(ec, head)


def offered(names) -> list[str]:
    """``names`` in the order ``mtl adapt`` / ``mtl serve`` offer them (the default first)."""
    return sorted(names, key=lambda n: (method_class(n).offer_rank, method_names().index(n)))
