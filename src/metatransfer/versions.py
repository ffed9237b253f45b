"""Installed-package checks that turn a broken install into one line a user can act on.

``pip install torch torchvision --index-url …/whl/cpu`` where that index cannot be
reached lets pip pair a torch and a torchvision from different builds; importing
torchvision then fails with ``RuntimeError: operator torchvision::nms does not exist``
(its compiled operators do not load into that torch), in every command and test module.
Every import of torchvision in the package goes through :func:`torchvision_module`, which
names both versions and the reinstall command instead. No heavy import at module level:
the CLI imports this module only inside commands.
"""

from __future__ import annotations

import importlib
import sys
from importlib import metadata
from types import ModuleType

from .errors import MTLError

INDEX = "https://download.pytorch.org/whl"


def installed(package: str) -> str | None:
    """The installed distribution version of ``package`` (read without importing it)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def torch_version() -> str | None:
    """torch's version with its build tag (``2.14.1+cpu``): from the imported module when
    there is one (the distribution metadata may lack the tag)."""
    module = sys.modules.get("torch")
    return str(getattr(module, "__version__", "") or "") or installed("torch")


def matching_torchvision(torch_version: str) -> str | None:
    """The torchvision release series built for a torch version: 0.(minor + 15) for torch
    2.x (2.0 -> 0.15, ..., 2.14 -> 0.29), as a pip specifier; None when unknown."""
    parts = torch_version.split("+")[0].split(".")
    if len(parts) < 2 or parts[0] != "2" or not parts[1].isdigit():
        return None
    return f"0.{int(parts[1]) + 15}.*"


def reinstall_command(torch_version: str | None) -> str:
    """``pip install --force-reinstall torch==X torchvision==Y`` from the index torch came
    from (its local version tag: ``+cpu`` -> ``…/whl/cpu``; none: PyPI)."""
    if not torch_version:
        return "pip install --force-reinstall torch torchvision"
    base, _, local = torch_version.partition("+")
    vision = matching_torchvision(torch_version)
    spec = f"torchvision=={vision}" if vision else "torchvision"
    index = f" --index-url {INDEX}/{local}" if local else ""
    return f"pip install --force-reinstall torch=={base} '{spec}'{index}"


def mismatch_message(cause: str) -> str:
    version, vision_version = torch_version(), installed("torchvision")
    first = (cause.strip().splitlines() or ["import failed"])[0]
    return (f"torch {version} and torchvision {vision_version} come from different "
            f"builds (importing torchvision fails: {first}); reinstall them together from "
            f"one index: {reinstall_command(version)}")


def torchvision_module(name: str = "torchvision") -> ModuleType:
    """``import name`` (torchvision or one of its modules), a broken pairing with torch
    raised as one :class:`~metatransfer.errors.MTLError` line."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != "torchvision":
            raise MTLError(mismatch_message(str(exc))) from None
        raise MTLError("torchvision is not installed; install the build that matches torch "
                       f"{torch_version()}: {reinstall_command(torch_version())}") from None
    except (RuntimeError, OSError, ImportError, AttributeError) as exc:
        raise MTLError(mismatch_message(str(exc))) from None
