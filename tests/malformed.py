"""Files that look like images and are not: what a user's upload or folder may hold.

Shared by the `mtl serve` load test and the ONNX example's checks, so both face the same
inputs: an empty file, a JPEG cut short, text named ``.png``, and a PNG whose header
claims 30,000 x 30,000 pixels (900 M: Pillow's decompression-bomb guard refuses it).
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def jpeg(seed: int = 0, size: int = 48) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png_header(width: int = 30_000, height: int = 30_000) -> bytes:
    """A well-formed PNG whose header declares ``width`` x ``height`` RGB pixels, with one
    row of pixel data: a few hundred bytes that would decode to gigabytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = zlib.compress(b"\x00" + bytes(3 * width))
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", row)
            + _chunk(b"IEND", b""))


def malformed_files() -> dict[str, bytes]:
    """``{file name: bytes}`` of the four kinds of broken image."""
    return {"empty.jpg": b"", "truncated.jpg": jpeg(1)[:200],
            "notes.png": b"shopping list: milk, eggs\n", "huge.png": huge_png_header()}
