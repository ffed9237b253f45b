"""A checkpoint's preprocessing is part of the model.

What an image goes through before the backbone — its colour mode, size, how it is resized,
its ink polarity (:class:`Decoding`, everything done to a decoded file), the channel
statistics it is standardised with — and what the features go through after it (feature
normalisation) are stored in every checkpoint (:class:`~metatransfer.checkpoints.ModelInfo`)
and applied by every path that runs the model: ``meta-test``, ``meta-train`` from a
pre-trained checkpoint, ``adapt``, ``serve`` and :class:`~metatransfer.adapt.FewShotClassifier`.
A user may override the geometry, the polarity or the statistics explicitly
(``data.image_size``, ``data.resize``, ``data.invert``, ``data.stats=dataset``); the
override is logged and recorded with the results.

The rule for raw files: every loader decodes them with the :class:`Decoding` it is asked
for (``data.channels``, ``data.image_size``, ``data.resize``, ``data.invert``) and declares
it with the split (``ImageSplit.decoding``). Without a checkpoint a loader uses its
dataset's own (Omniglot: inverted, bright strokes on a dark background; everything else:
as stored); with one, :func:`for_checkpoint` asks for the checkpoint's. So a checkpoint
trained on Omniglot inverts a folder of raw Omniglot PNGs in meta-test exactly as
``adapt`` inverts a user's files, and a model trained on images as stored never sees
inverted ones.

Resize policies (``resize``):

- ``direct``: the whole image straight to ``size x size`` (Lanczos), what the usual
  84x84 miniImageNet files were made with, and what this project trains with;
- ``crop:N``: the shorter side to ``N`` (bilinear, aspect kept), then the central
  ``size x size`` crop: torchvision's ``Resize(N)`` then ``CenterCrop(size)``, the test
  transform of the MTL authors' PyTorch code (``N=92``, 80 px) and of FEAT (92, 84 px);
- either with ``:<interpolation>`` appended (``lanczos``, ``bilinear``, ``bicubic``) to
  resample otherwise: ``crop:256:bicubic`` at 224 px is timm's ImageNet test transform
  of EfficientNet-Lite (bicubic, crop fraction 0.875).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .errors import ConfigError, MTLError

log = logging.getLogger(__name__)

DIRECT = "direct"
INTERPOLATIONS = {"lanczos": Image.Resampling.LANCZOS, "bilinear": Image.Resampling.BILINEAR,
                  "bicubic": Image.Resampling.BICUBIC}
_DEFAULT_INTERPOLATION = {DIRECT: "lanczos", "crop": "bilinear"}


def _split_policy(policy: str) -> tuple[int, str]:
    """``(N, interpolation)`` of a policy: N = 0 for ``direct``; ConfigError if malformed."""
    parts = (policy or DIRECT).split(":")
    kind = parts[0]
    if kind == DIRECT and len(parts) <= 2:
        size, rest = 0, parts[1:]
    elif kind == "crop" and len(parts) in (2, 3) and parts[1].isdigit() and int(parts[1]) > 0:
        size, rest = int(parts[1]), parts[2:]
    else:
        raise ConfigError(f"unknown resize policy '{policy}'; use 'direct' (whole image to the "
                          "input size) or 'crop:N' (shorter side to N, then the centre crop), "
                          "optionally with ':bicubic', ':bilinear' or ':lanczos'")
    interpolation = rest[0] if rest else _DEFAULT_INTERPOLATION[kind]
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f"resize policy '{policy}': unknown interpolation '{interpolation}'; "
                          f"use one of {', '.join(INTERPOLATIONS)}")
    return size, interpolation


def resize_steps(policy: str) -> tuple[int, str]:
    """``(N, interpolation)`` of a policy, its default interpolation filled in: N = 0 for
    ``direct`` (the whole image to the input size), else ``crop:N``'s shorter side."""
    return _split_policy(policy)


def parse_resize(policy: str) -> int:
    """The ``N`` of ``crop:N[:interp]``, 0 for ``direct[:interp]``; else a ConfigError."""
    return _split_policy(policy)[0]


def canonical_resize(policy: str) -> str:
    """``direct`` or ``crop:N`` with the interpolation named only when it is not the
    policy's default (validated), so existing policies and cache keys stay as they were."""
    n, interpolation = _split_policy(policy)
    base = f"crop:{n}" if n else DIRECT
    default = _DEFAULT_INTERPOLATION["crop" if n else DIRECT]
    return base if interpolation == default else f"{base}:{interpolation}"


def cache_key_policy(policy: str) -> dict[str, str]:
    """The cache-key entries of a canonical resize policy: none for ``direct``, so that
    direct caches keep the keys they had before resize policies existed."""
    return {} if policy == DIRECT else {"resize": policy}


def check_policy(policy: str, size: int) -> None:
    """A crop policy must resize to at least the crop size."""
    n = parse_resize(policy)
    if n and n < size:
        raise ConfigError(f"resize policy '{policy}' resizes to {n} px, smaller than the "
                          f"{size} px input; use crop:N with N >= {size}")


def resize_pil(image: Image.Image, size: int, policy: str = DIRECT) -> Image.Image:
    """Resize a decoded image to ``size x size`` under ``policy`` (see module docstring)."""
    n, interpolation = _split_policy(policy)
    if not n:
        if image.size != (size, size):
            image = image.resize((size, size), INTERPOLATIONS[interpolation])
        return image
    check_policy(policy, size)
    from .versions import torchvision_module

    tv = torchvision_module("torchvision.transforms")
    tvf = torchvision_module("torchvision.transforms.functional")
    image = tvf.resize(image, n, interpolation=tv.InterpolationMode(interpolation))
    return tvf.center_crop(image, [size, size])


# ----------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class Decoding:
    """Everything done to a decoded image before it becomes a ``(size, size, channels)``
    uint8 row, in this order: colour mode, resize, ink polarity.

    The one list of these steps. Dataset loaders build one and declare it with each split
    (``ImageSplit.decoding``); training copies it into the checkpoint (``ModelInfo``:
    ``in_channels``, ``image_size``, ``resize``, ``invert``); ``adapt``, ``serve``,
    :class:`~metatransfer.adapt.FewShotClassifier` and meta-test rebuild it from there
    (:func:`decoding_of`, :func:`for_checkpoint`). A new step is a field here, in
    ``ModelInfo``, ``DataConfig`` and those two functions.
    """

    size: int
    channels: int  # 1: grayscale (PIL "L"), 3: RGB (grey images replicated)
    resize: str = DIRECT  # see the module docstring
    invert: bool = False  # ink polarity: every value v becomes 255 - v

    @property
    def mode(self) -> str:
        return "RGB" if self.channels == 3 else "L"

    def decode(self, image: Image.Image) -> np.ndarray:
        """A decoded (PIL) image as a ``(size, size, channels)`` uint8 row."""
        if image.mode == "P":  # palette (often GIF/PNG with transparency): go through RGBA
            image = image.convert("RGBA")
        image = resize_pil(image.convert(self.mode), self.size, self.resize)
        array = np.asarray(image, dtype=np.uint8).reshape(self.size, self.size, self.channels)
        return self.pixels(array)

    def decode_array(self, array: np.ndarray) -> np.ndarray:
        """An already-decoded ``(h, w)`` / ``(h, w, 1|3|4)`` uint8 array as a row; an array
        already in the row's shape is only given the value steps (no resampling)."""
        have = 1 if array.ndim == 2 else array.shape[2]
        if have == self.channels and array.shape[:2] == (self.size, self.size) \
                and parse_resize(self.resize) == 0:
            return self.pixels(array.reshape(self.size, self.size, self.channels))
        if array.ndim == 3 and have == 1:
            array = array[:, :, 0]
        return self.decode(Image.fromarray(array))

    def pixels(self, array: np.ndarray) -> np.ndarray:
        """The value steps on rows already at the right size and mode (any leading shape)."""
        return 255 - array if self.invert else array

    def cache_parts(self) -> dict:
        """Cache-key entries of the steps that are not the default, so caches made before a
        step existed keep their keys."""
        return {**cache_key_policy(self.resize), **({"invert": True} if self.invert else {})}


def polarity(setting: bool | None, native: bool = False) -> bool:
    """Whether to invert: ``data.invert`` when set (a checkpoint's, or the user's), else
    the dataset's own polarity ``native`` (Omniglot: True)."""
    return native if setting is None else bool(setting)


def channel_count(setting: int, native: int) -> int:
    """``data.channels`` when set (1 or 3), else the dataset's own ``native`` count."""
    if setting in (0, None):
        return native
    if setting not in (1, 3):
        raise ConfigError(f"data.channels must be 1 (grayscale) or 3 (RGB), got {setting}")
    return int(setting)


# ITU-R 601-2 luma, PIL's "L" conversion
_LUMA = (0.299, 0.587, 0.114)


def stats_for(mean: Sequence[float], std: Sequence[float], channels: int,
              inverted: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """A dataset's channel statistics (given for its own mode and polarity) for images
    decoded with ``channels`` channels, and inverted against its own polarity when
    ``inverted``: 1 - mean, the same std; RGB to grey by PIL's luma weights (the std an
    upper bound), grey to RGB replicated."""
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean) == 3 and channels == 1:
        mean = (sum(w * v for w, v in zip(_LUMA, mean, strict=True)),)
        std = (sum(w * v for w, v in zip(_LUMA, std, strict=True)),)
    elif len(mean) == 1 and channels == 3:
        mean, std = mean * 3, std * 3
    if inverted:
        mean = tuple(1.0 - v for v in mean)
    return mean, std


# ----------------------------------------------------------------------------- a model's


@dataclass
class Preprocessing:
    """The preprocessing one model is run with (its checkpoint's, unless overridden)."""

    image_size: int
    resize: str = DIRECT
    channels: int = 3
    invert: bool = False
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    feature_norm: str = "none"
    bn: str = "running"  # running | batch (per-call batch statistics)
    overridden: list[str] = field(default_factory=list)

    @property
    def decoding(self) -> Decoding:
        return Decoding(self.image_size, self.channels, self.resize, self.invert)

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["mean"] = [round(float(v), 6) for v in self.mean]
        out["std"] = [round(float(v), 6) for v in self.std]
        return out


def bn_mode_of(info) -> str:
    """``batch`` when the checkpoint's BN uses per-call batch statistics, else ``running``."""
    return "batch" if info.backbone_args.get("bn_stats") == "batch" else "running"


def decoding_of(info) -> Decoding:
    """What a checkpoint's training data loader did to every decoded image."""
    return Decoding(int(info.image_size), int(info.in_channels),
                    canonical_resize(info.resize or DIRECT), bool(info.invert))


def from_info(info) -> Preprocessing:
    """The preprocessing stored in a checkpoint's metadata."""
    steps = decoding_of(info)
    return Preprocessing(image_size=steps.size, resize=steps.resize, channels=steps.channels,
                         invert=steps.invert, mean=list(info.mean), std=list(info.std),
                         feature_norm=info.feature_norm, bn=bn_mode_of(info))


def for_checkpoint(data, info, what: str = "",
                   quiet: bool = False) -> tuple[object, Preprocessing]:
    """``(data config, preprocessing)`` to run checkpoint ``info`` on dataset ``data``.

    The checkpoint's colour mode, image size, resize policy, ink polarity and statistics,
    unless ``data`` overrides one explicitly (``data.image_size`` not 0 and different,
    ``data.resize`` set and different, ``data.invert`` set and different,
    ``data.stats=dataset``): then the override wins, is logged (unless ``quiet``), and is
    listed in ``overridden``. The returned data config makes the loader decode every file
    with those steps. ``data.channels`` cannot differ: the network's input has its count.
    """
    warn = (lambda *args: None) if quiet else log.warning
    prep = from_info(info)
    if data.channels and int(data.channels) != prep.channels:
        raise ConfigError(f"data.channels={data.channels}, but the checkpoint's network takes "
                          f"{prep.channels}-channel images; drop data.channels")
    if data.image_size and int(data.image_size) != prep.image_size:
        warn("%simage size %d overrides the checkpoint's %d (data.image_size)",
             what, data.image_size, prep.image_size)
        prep.image_size = int(data.image_size)
        prep.overridden.append("image_size")
    wanted = data.resize
    if wanted and canonical_resize(wanted) != prep.resize:
        warn("%sresize policy %s overrides the checkpoint's %s (data.resize)",
             what, canonical_resize(wanted), prep.resize)
        prep.resize = canonical_resize(wanted)
        prep.overridden.append("resize")
    if data.invert is not None and bool(data.invert) != prep.invert:
        warn("%sink polarity invert=%s overrides the checkpoint's invert=%s (data.invert)",
             what, bool(data.invert), prep.invert)
        prep.invert = bool(data.invert)
        prep.overridden.append("invert")
    stats = data.stats
    if stats not in ("", "checkpoint", "dataset"):
        raise ConfigError(f"data.stats must be 'checkpoint' or 'dataset', got '{stats}'")
    if stats == "dataset":
        prep.overridden.append("stats")
    check_policy(prep.resize, prep.image_size)
    return dataclasses.replace(data, image_size=prep.image_size, resize=prep.resize,
                               channels=prep.channels, invert=prep.invert), prep


def check_decoding(split, prep: Preprocessing) -> None:
    """The split's ink polarity is the one ``prep`` asks for (a loader that ignores
    ``data.invert``, e.g. one a user registered, would feed the model negatives). A channel
    mismatch is reported by the phases, with their own message."""
    have, want = split.decoding, prep.decoding
    if have.invert != want.invert:
        state = {True: "inverted", False: "as stored"}
        raise MTLError(
            f"{split.name}: its loader read the images {state[have.invert]}, but the "
            f"checkpoint's data was read {state[want.invert]}; make the loader honour "
            "data.invert (see metatransfer.preprocessing.Decoding)")


def apply_stats(split, prep: Preprocessing, what: str = ""):
    """``split`` standardised with the checkpoint's statistics (or, when overridden with
    ``data.stats=dataset``, its own, which ``prep`` then records)."""
    if "stats" in prep.overridden:
        log.warning("%schannel statistics of %s override the checkpoint's (data.stats=dataset)",
                    what, split.name)
        prep.mean, prep.std = list(split.mean), list(split.std)
        return split
    if len(prep.mean) != split.channels:
        return split  # a channel mismatch is reported by the caller with its own message
    return dataclasses.replace(split, mean=tuple(prep.mean), std=tuple(prep.std))


def checkpoint_preprocessing(data, path, what: str = "meta-train: ", quiet: bool = False):
    """:func:`for_checkpoint` for the checkpoint file at ``path`` (header only)."""
    from .checkpoints import read_info

    return for_checkpoint(data, read_info(path), what, quiet)


# ----------------------------------------------------------------------------- polarity

#: How far from mid-grey (0.5) a mean brightness must be to count as one polarity: the
#: training images' (ink on paper: Omniglot's inverted files average 0.08, the raw ones
#: 0.92) and the user's support images'. Photos average about 0.45 (miniImageNet), so a
#: model trained on them never warns.
POLARITY_MARGIN = 0.2


def polarity_warning(images: np.ndarray, mean: Sequence[float], invert: bool) -> str | None:
    """One line when ``images`` (uint8 rows after the model's decoding, e.g. a user's
    support set) look like negatives of the model's training images, else None.

    ``mean``: the channel means the model standardises with (its training data's);
    ``invert``: whether its decoding inverts files. It warns when both the training
    images and ``images`` are clearly of one polarity (mean brightness at least
    :data:`POLARITY_MARGIN` from 0.5) and the two are on opposite sides of 0.5.
    """
    if not len(images) or not len(mean):
        return None
    trained, seen = float(np.mean(mean)), float(np.mean(images)) / 255.0
    if min(abs(trained - 0.5), abs(seen - 0.5)) < POLARITY_MARGIN or \
            (trained > 0.5) == (seen > 0.5):
        return None
    # in the files' own terms, before the model's decoding inverted them
    files, train_files = (1 - seen, 1 - trained) if invert else (seen, trained)

    def tone(value: float) -> str:
        return "bright" if value > 0.5 else "dark"

    how = ", before its loader inverted them" if invert else ""
    return (f"your images look inverted against the model's training images: yours are "
            f"mostly {tone(files)} (mean brightness {files:.2f}), its training files were "
            f"mostly {tone(train_files)} ({train_files:.2f}{how}); invert your images "
            "(e.g. PIL.ImageOps.invert) or expect poor accuracy")
