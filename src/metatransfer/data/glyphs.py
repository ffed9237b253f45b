"""The built-in ``glyphs`` dataset: characters rendered from fonts that ship with matplotlib.

It exists so that ``mtl run`` works offline with no download: one class per Unicode
character, each image the character in a random font and style with a random affine
distortion, stroke width, contrast and noise. It is a synthetic demo set, not a benchmark.

Design choices:

* Only the fonts bundled with matplotlib are used, never system fonts: the data is a
  pure function of the installed packages and the seed, so installing a package that
  adds fonts cannot change it. A character needs at least 3 bundled font files covering
  it, in at least 2 style families. The fonts' names and sizes are hashed into
  :func:`glyph_font_fingerprint`, which is part of the cache key and of every
  ``results.json`` on this dataset (``data_fingerprint``).
* Characters that look alike once size and position are randomised (Latin ``A``, Greek
  ``Α``, Cyrillic ``А``; ``o`` and ``O``) are dropped by comparing normalised renderings.
* Each image has its own RNG seeded from ``(seed, codepoint, index)``, so pixels do not
  depend on generation order, the number of classes requested or threading.
* Everything is rendered once into one uint8 cache entry (all splits, classes laid out
  train, val, test); every later load is a memory-mapped read.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
import unicodedata
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, ImageDraw, ImageFilter, ImageFont, features
from tqdm import tqdm

from ..config import DataConfig
from ..errors import ConfigError, DataError
from ..preprocessing import Decoding
from .base import ImageSplit
from .cache import cache_key, cache_root, cached_uint8
from .images import decoding_args
from .registry import register_dataset

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump whenever class selection or rendering changes the pixels
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
DEFAULT_SIZE = 32
MIN_FONT_FILES = 3  # a character must be in this many bundled font files ...
MIN_FAMILIES = 2  # ... from this many style families, so its images vary
# Normalised renderings closer than this count as the same glyph (A, Greek Α, Cyrillic А).
_DUPLICATE_RMS = 0.15
_CASE_RMS = 0.3  # the same between an upper- and a lower-case letter

# Unicode groups the classes are drawn from, in priority order. Classes are taken
# round-robin across groups, base characters before accented ones, so a small
# ``glyph_classes`` still mixes scripts and symbols. Ranges may overlap; the first wins.
_GROUPS: tuple[tuple[str, tuple[tuple[int, int], ...]], ...] = (
    ("latin", ((0x41, 0x5A), (0x61, 0x7A), (0xC0, 0x24F))),
    ("digits", ((0x30, 0x39),)),
    ("greek", ((0x391, 0x3C9), (0x370, 0x3FF))),  # core letters first
    ("cyrillic", ((0x410, 0x44F), (0x400, 0x4FF))),
    ("arrows", ((0x2190, 0x21FF),)),
    ("math", ((0x2200, 0x22FF),)),
    ("armenian", ((0x531, 0x58A),)),
    ("georgian", ((0x10A0, 0x10FF),)),
    ("shapes", ((0x25A0, 0x25FF),)),
    ("letterlike", ((0x2100, 0x214F),)),
    ("symbols", ((0x21, 0x2F), (0x3A, 0x40), (0x5B, 0x60), (0x7B, 0x7E), (0xA1, 0xBF))),
    ("currency", ((0x20A0, 0x20CF),)),
    ("technical", ((0x2300, 0x23FF),)),
    ("misc", ((0x2600, 0x26FF), (0x2700, 0x27BF))),
)
_CATEGORIES = {"Lu", "Ll", "Lt", "Lo", "Nd", "Sm", "So", "Sc", "Po"}

# matplotlib's Computer Modern fonts use TeX encodings: only ASCII letters (and, for
# the text fonts, digits) sit at their Unicode positions.
_ASCII_LETTERS = frozenset([*range(0x41, 0x5B), *range(0x61, 0x7B)])
_CM_COVERAGE = {
    "cmr10.ttf": _ASCII_LETTERS | frozenset(range(0x30, 0x3A)),
    "cmb10.ttf": _ASCII_LETTERS | frozenset(range(0x30, 0x3A)),
    "cmss10.ttf": _ASCII_LETTERS | frozenset(range(0x30, 0x3A)),
    "cmti10.ttf": _ASCII_LETTERS | frozenset(range(0x30, 0x3A)),
    "cmtt10.ttf": _ASCII_LETTERS | frozenset(range(0x30, 0x3A)),
    "cmmi10.ttf": _ASCII_LETTERS,
}


@dataclass(frozen=True)
class FontFile:
    """A font file and the codepoints it may be used for."""

    path: Path
    family: str  # style family ("DejaVu Sans", "STIXGeneral", ...), for the variety rule
    coverage: frozenset[int]

    @property
    def fingerprint(self) -> tuple[str, int]:
        """Name and size: stable across install paths, changes when the font does."""
        return self.path.name, self.path.stat().st_size


def _mpl_font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _charmap(path: Path) -> tuple[str, set[int]] | None:
    """Family name and Unicode coverage of a font, or None if it can't be used."""
    from matplotlib.ft2font import FT2Font

    try:
        font = FT2Font(str(path))
        cmap = set(font.get_charmap())
        ImageFont.truetype(str(path), 48)  # e.g. fixed-size colour emoji fonts fail here
    except (OSError, RuntimeError, ValueError):
        return None
    if len(cmap) > 60_000:  # a last-resort font draws a box for every codepoint
        return None
    return font.family_name, cmap


@lru_cache(maxsize=1)
def bundled_fonts() -> tuple[FontFile, ...]:
    """The fonts shipped in matplotlib's mpl-data (DejaVu, STIXGeneral, Computer Modern)."""
    fonts = []
    for path in sorted(_mpl_font_dir().glob("*.ttf")):
        name = path.name
        usable = (
            name.startswith(("DejaVuSans", "DejaVuSerif", "STIXGeneral")) and "Display" not in name
        ) or name in _CM_COVERAGE
        if not usable:  # LastResort, STIX size/non-Unicode variants, cmsy/cmex
            continue
        info = _charmap(path)
        if info is None:
            continue
        family, cmap = info
        if name in _CM_COVERAGE:
            cmap &= _CM_COVERAGE[name]
        fonts.append(FontFile(path, family, frozenset(cmap)))
    if not fonts:
        raise DataError(f"glyphs: no usable fonts found in {_mpl_font_dir()}; reinstall matplotlib")
    return tuple(fonts)


@lru_cache(maxsize=1)
def glyph_font_fingerprint() -> str:
    """A short hash of the names and sizes of the fonts the glyphs are rendered from.

    Two machines with the same fingerprint (and the same Pillow and FreeType) render the
    same images for the same seed; it is stored in the cache key and in ``results.json``.
    """
    names = sorted(f.fingerprint for f in bundled_fonts())
    return "fonts-" + hashlib.sha256(repr(names).encode()).hexdigest()[:16]


def _style_family(font: FontFile) -> str:
    """Sans, serif, mono and STIX count as different families for the variety rule."""
    name = font.path.name
    if name.startswith("DejaVuSansMono"):
        return "mono"
    if name.startswith("DejaVuSans"):
        return "sans"
    if name.startswith("DejaVuSerif"):
        return "serif"
    return font.family


@lru_cache(maxsize=512)
def _pil_font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


_ZOOMS = (1.0, 1.5, 2.0, 3.0)  # few font sizes, so that few font objects are cached


@cache
def _ink_extent(path: str, cp: int) -> float:
    """The glyph's larger ink side as a fraction of the em (0 if it draws nothing)."""
    glyph = _ink(chr(cp), _pil_font(path, 48))
    return max(glyph.size) / 48 if glyph else 0.0


def _ink(ch: str, font: ImageFont.FreeTypeFont, stroke: int = 0) -> Image.Image | None:
    """The character drawn white on black, cropped to its ink (None if it draws nothing).

    ``getbbox`` spans the advance width and line box, not the ink, hence the crop.
    """
    box = font.getbbox(ch, stroke_width=stroke)
    w, h = box[2] - box[0], box[3] - box[1]
    if w <= 0 or h <= 0:
        return None
    im = Image.new("L", (w, h))
    ImageDraw.Draw(im).text(
        (-box[0], -box[1]), ch, font=font, fill=255, stroke_width=stroke, stroke_fill=255
    )
    ink = im.getbbox()
    return im.crop(ink) if ink else None


def _normalised_bitmap(cp: int, font: FontFile, side: int = 16) -> np.ndarray | None:
    """The glyph cropped to its ink, padded square and shrunk: size and position removed."""
    glyph = _ink(chr(cp), _pil_font(str(font.path), 48))
    if glyph is None:
        return None
    w, h = glyph.size
    n = max(w, h)
    im = Image.new("L", (n, n))
    im.paste(glyph, ((n - w) // 2, (n - h) // 2))
    return np.asarray(im.resize((side, side), Image.Resampling.BOX), dtype=np.float32) / 255.0


def _eligible(cp: int, fonts: tuple[FontFile, ...]) -> bool:
    if unicodedata.category(chr(cp)) not in _CATEGORIES:
        return False
    covering = [f for f in fonts if cp in f.coverage]
    return (
        len(covering) >= MIN_FONT_FILES
        and len({_style_family(f) for f in covering}) >= MIN_FAMILIES
    )


@lru_cache(maxsize=1)
def candidate_codepoints() -> tuple[int, ...]:
    """Every usable class, in priority order; depends only on matplotlib's fonts.

    A character is kept if enough bundled fonts cover it, its ink is not tiny (dots and
    commas would become blobs once scaled up) and its rendering differs from every
    higher-priority character (homoglyphs across scripts, case pairs like ``o``/``O``).
    """
    fonts = bundled_fonts()
    by_name = {f.path.name: f for f in fonts}
    refs = [by_name[n] for n in ("DejaVuSans.ttf", "DejaVuSerif.ttf") if n in by_name]
    refs = refs or list(fonts[:2])

    tiers: list[list[list[int]]] = [[], []]  # [tier][group] -> codepoints
    seen: set[int] = set()
    for _, ranges in _GROUPS:
        groups = ([], [])
        for lo, hi in ranges:
            for cp in range(lo, hi + 1):
                if cp not in seen and _eligible(cp, fonts):
                    seen.add(cp)
                    accented = unicodedata.decomposition(chr(cp)) != ""
                    groups[int(accented)].append(cp)
        tiers[0].append(groups[0])
        tiers[1].append(groups[1])
    # Deduplicate in group order, so the Latin letter wins over its Greek and Cyrillic
    # look-alikes, then interleave the survivors round-robin for the priority order.
    canonical = [cp for tier in tiers for group in tier for cp in group]
    feats, usable = [], []
    for cp in canonical:
        maps = []
        for ref in refs:
            font = ref if cp in ref.coverage else next(f for f in fonts if cp in f.coverage)
            bitmap = _normalised_bitmap(cp, font)
            if bitmap is None:
                break
            maps.append(bitmap.ravel())
        if len(maps) == len(refs) and _big_enough(cp, fonts):
            feats.append(np.concatenate(maps))
            usable.append(cp)
    x = np.stack(feats)
    sq = (x * x).sum(1)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0) / x.shape[1])
    # Upper- and lower-case letters differ mostly in size, which the random scaling
    # erases (o/O, s/S, x/X, ж/Ж, and Cyrillic р against Latin P), so they need a
    # larger distance than two letters of the same case.
    case = np.array([unicodedata.category(chr(cp)) for cp in usable])
    upper, lower = case == "Lu", case == "Ll"
    chosen: list[int] = []
    for i in range(len(usable)):
        if chosen:
            mixed = (upper[i] & lower[chosen]) | (lower[i] & upper[chosen])
            limit = np.where(mixed, _CASE_RMS, _DUPLICATE_RMS)
            if (dist[i, chosen] < limit).any():
                continue
        chosen.append(i)
    keep = {usable[i] for i in chosen}
    ordered = []
    for tier in tiers:
        groups = [[cp for cp in g if cp in keep] for g in tier]
        for i in range(max(map(len, groups))):
            ordered.extend(g[i] for g in groups if i < len(g))
    return tuple(ordered)


def _big_enough(cp: int, fonts: tuple[FontFile, ...]) -> bool:
    font = next(f for f in fonts if cp in f.coverage)
    return _ink_extent(str(font.path), cp) >= 0.3


def class_name(cp: int) -> str:
    """Readable class name, e.g. ``"A U+0041 LATIN CAPITAL LETTER A"``."""
    return f"{chr(cp)} U+{cp:04X} {unicodedata.name(chr(cp), 'UNNAMED')}"


def split_classes(num_classes: int, seed: int) -> dict[str, list[int]]:
    """The first ``num_classes`` candidates, shuffled by ``seed`` into disjoint splits."""
    available = candidate_codepoints()
    if not len(SPLITS) <= num_classes <= len(available):
        raise ConfigError(
            f"data.glyph_classes={num_classes} is out of range; the glyphs dataset has "
            f"{len(available)} characters, choose between {len(SPLITS)} and {len(available)}"
        )
    chosen = np.array(available[:num_classes])
    np.random.default_rng([seed, 0]).shuffle(chosen)
    n_train = max(1, round(SPLIT_FRACTIONS[0] * num_classes))
    n_val = max(1, round(SPLIT_FRACTIONS[1] * num_classes))
    n_train = min(n_train, num_classes - n_val - 1)
    parts = np.split(chosen, [n_train, n_train + n_val])
    return {name: sorted(int(c) for c in part) for name, part in zip(SPLITS, parts, strict=True)}


def render_glyph(cp: int, fonts: list[FontFile], rng: np.random.Generator, size: int) -> np.ndarray:
    """One ``(size, size)`` uint8 image of character ``cp`` drawn with ``rng``'s choices.

    Rendering happens at twice the size and is box-filtered down, for anti-aliasing.
    The glyph's ink box is mapped through the affine first and the scale chosen so its
    image fits the canvas, so glyphs are never clipped.
    """
    big = 2 * size
    weight = int(rng.choice(3, p=[0.55, 0.3, 0.15]))
    order = rng.permutation(len(fonts))
    ch = chr(cp)
    for k in order:  # the first font with ink (a font may map a codepoint to an empty glyph)
        path = str(fonts[k].path)
        # Small glyphs (°, ∘) are drawn at a larger size, so that the stroke and the
        # final scaling are similar for every character.
        extent = _ink_extent(path, cp)
        zoom = next((z for z in _ZOOMS if z * extent >= 0.6), _ZOOMS[-1])
        font_size = max(16, round(1.6 * size * zoom))
        stroke = int(weight * extent * font_size / 30)  # relative to the ink, not the em
        glyph = _ink(ch, _pil_font(path, font_size), stroke)
        if glyph is not None:
            break
    else:
        raise DataError(f"glyphs: no font draws {class_name(cp)}; clear the glyphs cache")
    w, h = glyph.size

    angle = math.radians(rng.uniform(-15, 15))
    shear = rng.uniform(-0.3, 0.3)
    aspect = math.exp(rng.uniform(-0.2, 0.2))
    cos, sin = math.cos(angle), math.sin(angle)
    rot = np.array([[cos, -sin], [sin, cos]])
    m = rot @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([aspect**0.5, aspect**-0.5])
    corners = np.array([[-w, -w, w, w], [-h, h, -h, h]]) / 2
    extent = np.ptp(m @ corners, axis=1)
    scale = rng.uniform(0.55, 0.9) * big / extent.max()
    slack = big - scale * extent
    centre = big / 2 + rng.uniform(-0.5, 0.5, size=2) * slack
    inv = np.linalg.inv(scale * m)  # output pixel -> glyph pixel, as PIL expects
    offset = np.array([w / 2, h / 2]) - inv @ centre
    data = (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1])
    canvas = glyph.transform((big, big), Image.Transform.AFFINE, data, Image.Resampling.BILINEAR)
    if rng.random() < 0.3:
        canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    ink_mask = np.asarray(canvas.reduce(2), dtype=np.float32) / 255.0

    background = rng.uniform(0, 100)
    ink = rng.uniform(150, 255)
    if rng.random() < 0.3:  # dark ink on a light background
        background, ink = 255 - background, 255 - ink
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    gx, gy = rng.uniform(-25, 25, size=2)
    shade = background + gx * ramp[None, :] + gy * ramp[:, None]
    image = shade + (ink - shade) * ink_mask
    image += rng.normal(0, rng.uniform(0, 12), size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def glyph_image_size(cfg: DataConfig) -> int:
    """The configured side length, or the dataset default of 32."""
    size = cfg.image_size or DEFAULT_SIZE
    if size < 8:
        raise ConfigError(f"data.image_size={size} is too small for glyphs; use 8 or more")
    return size


def _generation_key(cfg: DataConfig, size: int) -> str:
    return cache_key(
        dataset="glyphs",
        version=FORMAT_VERSION,
        classes=cfg.glyph_classes,
        images=cfg.glyph_images,
        seed=cfg.glyph_seed,
        size=size,
        fonts=glyph_font_fingerprint(),
        pillow=PIL.__version__,
        freetype=features.version("freetype2"),
        numpy=np.__version__,
    )


@register_dataset("glyphs")
def load_glyphs(cfg: DataConfig, split: str) -> ImageSplit:
    """Split ``split`` of the glyphs dataset, generated on first use and then memory-mapped."""
    if cfg.root:  # a root the user gave (or a preset did) would be silently ignored
        raise ConfigError(f"data.root={cfg.root} is set, but the glyphs dataset is built in and "
                          "reads no files; remove data.root (--set data.root=null), or set "
                          "data.name to the dataset that lives there (`mtl data list`)")
    if split not in SPLITS:
        raise DataError(f"glyphs has no split '{split}'; choose one of {', '.join(SPLITS)}")
    if cfg.glyph_images < 1:
        raise ConfigError(f"data.glyph_images={cfg.glyph_images} must be at least 1")
    size = glyph_image_size(cfg)
    fonts = bundled_fonts()
    per_class = cfg.glyph_images
    shape = (cfg.glyph_classes * per_class, size, size, 1)

    def fill(array: np.ndarray) -> dict:
        """Render every class in layout order; mean and std are over all splits."""
        start = time.perf_counter()
        splits = split_classes(cfg.glyph_classes, cfg.glyph_seed)
        layout = [cp for name in SPLITS for cp in splits[name]]
        total, total_sq = 0.0, 0.0
        log.info("generating the built-in glyphs data (%d characters x %d images, %dx%d), "
                 "once: later runs read it from %s", len(layout), per_class, size, size,
                 cache_root(cfg.cache_dir) / "glyphs")
        for c, cp in enumerate(tqdm(layout, desc="rendering glyphs", unit="class",
                                    disable=None, leave=False)):
            covering = [f for f in fonts if cp in f.coverage]
            block = array[c * per_class : (c + 1) * per_class, :, :, 0]
            for i in range(per_class):
                rng = np.random.default_rng([cfg.glyph_seed, 1, cp, i])
                block[i] = render_glyph(cp, covering, rng, size)
            values = block.astype(np.float64) / 255.0
            total += values.sum()
            total_sq += (values * values).sum()
        count = array.size
        mean = total / count
        return {
            "splits": {name: [int(cp) for cp in splits[name]] for name in SPLITS},
            "mean": mean,
            "std": math.sqrt(max(total_sq / count - mean * mean, 0.0)),
            "fonts": [f.path.name for f in fonts],
            "fingerprint": glyph_font_fingerprint(),
            "seconds": round(time.perf_counter() - start, 2),
        }

    key = _generation_key(cfg, size)
    array, meta = cached_uint8(cache_root(cfg.cache_dir) / "glyphs", key, shape, fill)
    start = sum(len(meta["splits"][name]) for name in SPLITS[: SPLITS.index(split)])
    codepoints = meta["splits"][split]
    images = array[start * per_class : (start + len(codepoints)) * per_class]
    labels = np.repeat(np.arange(len(codepoints), dtype=np.int64), per_class)
    # rendered once as grey, bright or dark ink at random; data.channels / data.invert (a
    # checkpoint's, or the user's) replicate or invert the rendered pixels
    args = decoding_args(cfg, channels=1, mean=(float(meta["mean"]),),
                         std=(float(meta["std"]),))
    steps = Decoding(size, args["channels"], invert=args["invert"])
    if steps.channels == 3:
        images = np.repeat(images, 3, axis=3)
    return ImageSplit(
        images=steps.pixels(images),
        labels=labels,
        class_names=[class_name(cp) for cp in codepoints],
        name=f"glyphs/{split}",
        mean=args["mean"],
        std=args["std"],
        decoding=steps,
        source=f"built-in glyphs rendered from {len(meta['fonts'])} fonts",
        meta={"codepoints": list(codepoints), "fonts": meta["fonts"],
              "data_fingerprint": glyph_font_fingerprint()},
    )
