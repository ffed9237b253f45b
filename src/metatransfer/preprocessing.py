"""A checkpoint's preprocessing is part of the model.

What an image goes through before the backbone — its size, how it is resized, the channel
statistics it is standardised with — and what the features go through after it (feature
normalisation) are stored in every checkpoint (:class:`~metatransfer.checkpoints.ModelInfo`)
and applied by every path that runs the model: ``meta-test``, ``meta-train`` from a
pre-trained checkpoint, ``adapt``, ``serve`` and :class:`~metatransfer.adapt.FewShotClassifier`.
A user may override the geometry or the statistics explicitly (``data.image_size``,
``data.resize``, ``data.stats=dataset``); the override is logged and recorded with the
results.

Resize policies (``resize``):

- ``direct``: the whole image straight to ``size x size`` (Lanczos), what the usual
  84x84 miniImageNet files were made with, and what this project trains with;
- ``crop:N``: the shorter side to ``N`` (bilinear, aspect kept), then the central
  ``size x size`` crop: torchvision's ``Resize(N)`` then ``CenterCrop(size)``, the test
  transform of the MTL authors' PyTorch code (``N=92``, 80 px) and of FEAT (92, 84 px).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .errors import ConfigError

log = logging.getLogger(__name__)

DIRECT = "direct"


def parse_resize(policy: str) -> int:
    """The ``N`` of ``crop:N``, 0 for ``direct``; anything else is a ConfigError."""
    if policy in ("", DIRECT):
        return 0
    kind, _, size = policy.partition(":")
    if kind == "crop" and size.isdigit() and int(size) > 0:
        return int(size)
    raise ConfigError(f"unknown resize policy '{policy}'; use 'direct' (whole image to the "
                      "input size) or 'crop:N' (shorter side to N, then the centre crop)")


def canonical_resize(policy: str) -> str:
    """``direct`` or ``crop:N`` (validated)."""
    n = parse_resize(policy)
    return f"crop:{n}" if n else DIRECT


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
    n = parse_resize(policy)
    if not n:
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.LANCZOS)
        return image
    check_policy(policy, size)
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as tvf

    image = tvf.resize(image, n, interpolation=InterpolationMode.BILINEAR)
    return tvf.center_crop(image, [size, size])


def resize_array(image: np.ndarray, size: int, policy: str = DIRECT) -> np.ndarray:
    """``(h, w, c)`` or ``(h, w)`` uint8 -> ``(size, size, c)`` uint8 under ``policy``."""
    if policy in ("", DIRECT) and image.shape[:2] == (size, size):
        return image
    squeeze = image.ndim == 3 and image.shape[2] == 1
    pil = Image.fromarray(image[:, :, 0] if squeeze else image)
    out = np.asarray(resize_pil(pil, size, policy), dtype=np.uint8)
    return out[:, :, None] if squeeze else out


@dataclass
class Preprocessing:
    """The preprocessing one model is run with (its checkpoint's, unless overridden)."""

    image_size: int
    resize: str = DIRECT
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    feature_norm: str = "none"
    bn: str = "running"  # running | batch (per-call batch statistics)
    overridden: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["mean"] = [round(float(v), 6) for v in self.mean]
        out["std"] = [round(float(v), 6) for v in self.std]
        return out


def bn_mode_of(info) -> str:
    """``batch`` when the checkpoint's BN uses per-call batch statistics, else ``running``."""
    return "batch" if info.backbone_args.get("bn_stats") == "batch" else "running"


def from_info(info) -> Preprocessing:
    """The preprocessing stored in a checkpoint's metadata."""
    return Preprocessing(image_size=int(info.image_size),
                         resize=canonical_resize(info.resize or DIRECT),
                         mean=list(info.mean), std=list(info.std),
                         feature_norm=info.feature_norm, bn=bn_mode_of(info))


def for_checkpoint(data, info, what: str = "") -> tuple[object, Preprocessing]:
    """``(data config, preprocessing)`` to run checkpoint ``info`` on dataset ``data``.

    The checkpoint's image size, resize policy and statistics, unless ``data`` overrides
    one explicitly (``data.image_size`` not 0 and different, ``data.resize`` set and
    different, ``data.stats=dataset``): then the override wins, is logged, and is listed
    in ``overridden``. The returned data config loads the split at that geometry.
    """
    prep = from_info(info)
    if data.image_size and int(data.image_size) != prep.image_size:
        log.warning("%simage size %d overrides the checkpoint's %d (data.image_size)",
                    what, data.image_size, prep.image_size)
        prep.image_size = int(data.image_size)
        prep.overridden.append("image_size")
    wanted = data.resize
    if wanted and canonical_resize(wanted) != prep.resize:
        log.warning("%sresize policy %s overrides the checkpoint's %s (data.resize)",
                    what, canonical_resize(wanted), prep.resize)
        prep.resize = canonical_resize(wanted)
        prep.overridden.append("resize")
    stats = data.stats
    if stats not in ("", "checkpoint", "dataset"):
        raise ConfigError(f"data.stats must be 'checkpoint' or 'dataset', got '{stats}'")
    if stats == "dataset":
        prep.overridden.append("stats")
    check_policy(prep.resize, prep.image_size)
    return dataclasses.replace(data, image_size=prep.image_size, resize=prep.resize), prep


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


def checkpoint_preprocessing(data, path, what: str = "meta-train: "):
    """:func:`for_checkpoint` for the checkpoint file at ``path`` (header only)."""
    from .checkpoints import read_info

    return for_checkpoint(data, read_info(path), what)
