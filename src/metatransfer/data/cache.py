"""Decode once: a uint8 ``.npy`` cache per split, memory-mapped on every later load.

The cache key hashes everything that changes the decoded pixels (source files and their
sizes and mtimes, resize settings, format version), so a changed source invalidates it.
Caches go to a user cache directory (``$METATRANSFER_CACHE`` or ``~/.cache/metatransfer``),
never beside the data, which may be read-only.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np


def cache_root(override: str | None = None) -> Path:
    """The cache directory: explicit override, ``$METATRANSFER_CACHE``, or the user cache."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get("METATRANSFER_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "metatransfer"


def cache_key(**parts) -> str:
    """A short stable hash of JSON-serialisable parts."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def files_fingerprint(paths: list[Path]) -> str:
    """Hash of file names, sizes and mtimes: cheap, and changes when any file changes."""
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode(errors="surrogateescape"))
    return h.hexdigest()[:20]


def cached_shape(directory: Path, key: str) -> tuple[int, ...] | None:
    """Shape of a complete cache entry ``directory/key``, or None when there is none.

    For sources whose row count is only known after reading them (e.g. pickles): a hit
    lets the caller skip the read and pass this shape to :func:`cached_uint8`.
    """
    meta_path = directory / f"{key}.json"
    if not (directory / f"{key}.npy").is_file() or not meta_path.is_file():
        return None
    try:
        shape = json.loads(meta_path.read_text()).get("shape")
    except (OSError, ValueError):
        return None
    return tuple(shape) if isinstance(shape, list) else None


def cached_uint8(
    directory: Path,
    key: str,
    shape: tuple[int, ...],
    fill: Callable[[np.ndarray], dict | None],
) -> tuple[np.ndarray, dict]:
    """Return a read-only memmap of ``shape`` cached under ``directory/key``.

    On a miss, ``fill(array)`` writes every row of a fresh writable memmap (so peak memory
    is the array itself, not a list of decoded images) and may return JSON metadata that
    is stored beside it. The files are renamed into place only when complete, so an
    interrupted build never leaves a half-written cache.
    """
    directory.mkdir(parents=True, exist_ok=True)
    array_path = directory / f"{key}.npy"
    meta_path = directory / f"{key}.json"
    if array_path.is_file() and meta_path.is_file():
        try:
            array = np.load(array_path, mmap_mode="r")
            meta = json.loads(meta_path.read_text())
            if array.shape == tuple(shape) or meta.get("shape") == list(array.shape):
                return array, meta
        except (ValueError, OSError, json.JSONDecodeError):
            pass  # a damaged cache is rebuilt below
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".npy.tmp")
    os.close(fd)
    try:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=tuple(shape))
        meta = fill(array) or {}
        array.flush()
        del array
        meta = {**meta, "shape": list(shape)}
        os.replace(tmp, array_path)
        tmp_meta = meta_path.with_suffix(".json.tmp")
        tmp_meta.write_text(json.dumps(meta))
        os.replace(tmp_meta, meta_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return np.load(array_path, mmap_mode="r"), meta
