"""Import published checkpoints (MTL authors, FEAT, RFS) as metatransfer checkpoints.

Pre-training decides most of the final accuracy and costs days without a GPU, so users
start from the weights released with those papers. Loading is strict: every source tensor
is mapped or reported as ignored (with the reason), every tensor of our model is filled
(only exact no-op values are ever synthesised, and reported), shapes are checked; the first
problem raises :class:`CheckpointError` naming the offending key.

Formats (``IMPORT_FORMATS``):

- ``authors-pretrain``: ``{"params": ResNetMtl(mtl=False) state dict}`` (optionally with
  ``encoder.`` / ``module.`` prefixes) -> ``resnet25``; ``pre_fc.*`` dropped.
- ``authors-meta``: ``{"params": MtlLearner state dict}``: ``encoder.*`` with
  ``mtl_weight``/``mtl_bias`` -> ``resnet25`` with SS, ``base_learner.fc1_w``/``fc1_b``
  (alias ``base_learner.vars.0``/``.1``) -> theta_0 ``head.weight``/``head.bias``.
- ``feat``: ``{"params": {"encoder.<resnet12 key>": ...}}`` -> ``resnet12``; FEAT's other
  modules (``fc.*``, ``slf_attn.*``) dropped.
- ``rfs``: ``{"model": resnet12 state dict, ...}`` -> ``resnet12``; ``classifier.*`` dropped.
- ``authors-tf``: the authors' TensorFlow release (``weights.npy``, ``ss_weights.npy``,
  ``fc_weights.npy``) -> ``resnet12-tf`` with SS and theta_0 (:mod:`.importers_tf`).

Each import stores the source's own test-time preprocessing (:mod:`.preprocessing`): the
authors' PyTorch code and FEAT resize to 92 then centre-crop 80 / 84 px with their channel
statistics; RFS uses its 84 px pickles as they are (32 px and CIFAR statistics for its
CIFAR-FS/FC100 models, read from its stored options or ``--dataset``); the TensorFlow
code feeds 84 px images in [0, 1]. The authors' ResNetMtl is accepted with ``layers``
[4, 4, 4] and their earlier [3, 3, 3]; any other variant is refused by name.
"""

from __future__ import annotations

import argparse
import pickle
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoints import ModelInfo, save_model
from .errors import CheckpointError, ConfigError
from .models import create_backbone
from .models.ss import enable_ss

# Normalisation of each source's data pipeline (pixel values in [0, 1]).
AUTHORS_MEAN = [x / 255.0 for x in (125.3, 123.0, 113.9)]
AUTHORS_STD = [x / 255.0 for x in (63.0, 62.1, 66.7)]
MINI_RES12_MEAN = [x / 255.0 for x in (120.39586422, 115.59361427, 104.54012653)]
MINI_RES12_STD = [x / 255.0 for x in (70.68188272, 68.27635443, 72.54505529)]
CIFAR_RES12_MEAN = [x / 255.0 for x in (129.37731888, 124.10583864, 112.47758569)]
CIFAR_RES12_STD = [x / 255.0 for x in (68.20947949, 65.43124043, 70.45866994)]
# the test transform of the authors' PyTorch code and of FEAT: Resize(92) -> CenterCrop
CROP_92 = "crop:92"


@dataclass(frozen=True)
class _Format:
    backbone: str
    backbone_args: dict
    container: str  # top-level entry holding the state dict
    image_size: int
    mean: list[float]
    std: list[float]
    meta: bool  # carries SS parameters and theta_0
    description: str
    resize: str = "direct"  # the source's test-time resize (metatransfer.preprocessing)


IMPORT_FORMATS: dict[str, _Format] = {
    "authors-pretrain": _Format("resnet25", {}, "params", 80, AUTHORS_MEAN, AUTHORS_STD, False,
                                "MTL authors' PyTorch pre-trained ResNet-25 (max_acc.pth)",
                                CROP_92),
    "authors-meta": _Format("resnet25", {}, "params", 80, AUTHORS_MEAN, AUTHORS_STD, True,
                            "MTL authors' PyTorch meta-trained model (SS + theta_0)", CROP_92),
    "feat": _Format("resnet12", {"drop_rate": 0.1, "dropblock_size": 5}, "params", 84,
                    MINI_RES12_MEAN, MINI_RES12_STD, False, "FEAT's ResNet-12 checkpoint",
                    CROP_92),
    "rfs": _Format("resnet12", {"drop_rate": 0.1, "dropblock_size": 5}, "model", 84,
                   MINI_RES12_MEAN, MINI_RES12_STD, False, "RFS's ResNet-12 checkpoint"),
    "authors-tf": _Format("resnet12-tf", {"bn_stats": "batch", "bn_eps": 1e-3}, "", 84,
                          [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], True,
                          "MTL authors' TensorFlow release (weights.npy, ss_weights.npy, "
                          "fc_weights.npy)"),
}

# RFS trains on pickled, already-resized images (no test-time resize) and stores its
# options (``opt.dataset``) beside the weights: the dataset decides size and statistics.
RFS_DATASETS = {
    "miniImageNet": "miniimagenet", "tieredImageNet": "tieredimagenet",
    "CIFAR-FS": "cifarfs", "FC100": "fc100",
}
RFS_CIFAR = {"image_size": 32, "mean": CIFAR_RES12_MEAN, "std": CIFAR_RES12_STD,
             "backbone_args": {"drop_rate": 0.1, "dropblock_size": 2}}
IMPORT_DATASETS = ("miniimagenet", "tieredimagenet", "cifarfs", "fc100")
# ResNetMtl's layers: [4, 4, 4] today, [3, 3, 3] in the authors' repository from 2019-08
# until commit a43f94a (2020-03)
AUTHORS_BLOCKS = (4, 3)


@dataclass
class ImportReport:
    """What happened to every tensor: ``mapped`` (source, target), ``ignored`` and
    ``filled`` (key, reason)."""

    mapped: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)
    filled: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class ImportResult:
    info: ModelInfo
    backbone: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]
    report: ImportReport


def _fmt(fmt: str) -> _Format:
    if fmt not in IMPORT_FORMATS:
        raise ConfigError(f"unknown import format '{fmt}'; choose one of "
                          f"{', '.join(sorted(IMPORT_FORMATS))}")
    return IMPORT_FORMATS[fmt]


def read_torch_file(path: str | Path) -> object:
    """``torch.load`` with ``weights_only`` (no arbitrary code from downloaded files);
    RFS stores its argparse options beside the weights, so ``Namespace`` is allowed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    try:
        if allow is None:
            return torch.load(str(path), map_location="cpu", weights_only=True)
        with allow([argparse.Namespace]):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if found:
            raise CheckpointError(
                f"{path} holds a pickled {found.group(1)}, not only tensors, and is not "
                "unpickled for safety; "
                "re-save just its state dict with torch.save"
            ) from None
        raise CheckpointError(f"{path} is truncated or not a PyTorch checkpoint "
                              f"({_brief(exc)}); download it again") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as exc:
        raise CheckpointError(f"{path} is truncated or not a PyTorch checkpoint "
                              f"({_brief(exc)}); download it again") from None


def _brief(exc: BaseException) -> str:
    """First sentence of an exception, one line, for a user-facing message."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
    first = text[0].split(". ")[0][:100] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _source_state(obj: object, spec: _Format, fmt: str, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside the source's container, checked to be tensors."""
    if not isinstance(obj, dict) or spec.container not in obj:
        found = sorted(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path} is not a '{fmt}' checkpoint: expected a dict with a "
                              f"'{spec.container}' entry, found {found}")
    state = obj[spec.container]
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path}: '{spec.container}' is not a non-empty state dict")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry '{key}' is {type(value).__name__}, "
                                  "not a tensor")
    return dict(state)


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    """Drop any leading ``module.`` (DataParallel) and the given prefixes."""
    changed = True
    while changed:
        changed = False
        for p in ("module.", *prefixes):
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def _fill_tensor(
    source: dict[str, torch.Tensor],
    target: dict[str, torch.Tensor],
    rename: Callable[[str], str | None],
    fillable: Callable[[str], str | None],
    backbone: str,
    report: ImportReport,
) -> dict[str, torch.Tensor]:
    """Map ``source`` onto ``target``'s keys and shapes, strictly.

    ``rename(key)`` gives the target key, or None after recording the key as ignored;
    ``fillable(target_key)`` gives the reason a missing target tensor may be synthesised
    as its no-op value (zeros), or None when it must come from the source.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        tkey = rename(key)
        if tkey is None:
            continue
        if tkey not in target:
            raise CheckpointError(f"source tensor '{key}' has no place in {backbone} "
                                  "(another architecture or format?)")
        if tkey in out:
            raise CheckpointError(f"source tensor '{key}' maps onto '{tkey}' a second time")
        want = target[tkey]
        if tuple(value.shape) != tuple(want.shape):
            raise CheckpointError(
                f"source tensor '{key}' has shape {tuple(value.shape)}, {backbone} needs "
                f"{tuple(want.shape)} (trained with other widths?)"
            )
        out[tkey] = value.detach().to(dtype=want.dtype).clone()
        report.mapped.append((key, tkey))
    for tkey, want in target.items():
        if tkey in out:
            continue
        reason = fillable(tkey)
        if reason is None:
            raise CheckpointError(f"{backbone} tensor '{tkey}' is missing from the source "
                                  "checkpoint (truncated state dict or another format?)")
        out[tkey] = torch.zeros_like(want)
        report.filled.append((tkey, reason))
    return out


def _fill_num_batches(tkey: str) -> str | None:
    if tkey.endswith("num_batches_tracked"):
        return "BN batch counter absent (PyTorch < 0.4.1 checkpoint); unused at eval"
    return None


def _single_path(path, fmt: str) -> Path:
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            raise ConfigError(f"'{fmt}' imports one file, got {len(path)} paths; pass one")
        path = path[0]
    return Path(path)


def _rfs_dataset(obj: dict, path: Path) -> str | None:
    """The dataset an RFS checkpoint was trained on, from its stored options."""
    opt = obj.get("opt")
    name = getattr(opt, "dataset", None) if opt is not None else None
    if name is None and isinstance(opt, dict):
        name = opt.get("dataset")
    if name is None:
        return None
    if name not in RFS_DATASETS:
        raise CheckpointError(f"{path} was trained on '{name}' (its opt.dataset), a dataset "
                              f"this importer has no preprocessing for (known: "
                              f"{', '.join(RFS_DATASETS)})")
    return RFS_DATASETS[name]


def _authors_blocks(source: dict[str, torch.Tensor], path: Path) -> int:
    """BasicBlocks per stage of an authors' ResNetMtl: 4, or 3 in their older code."""
    counts: dict[int, int] = {}
    for key in source:
        found = re.match(r"layer(\d+)\.(\d+)\.", _strip(key, ("encoder.",)))
        if found:
            layer, block = int(found.group(1)), int(found.group(2))
            counts[layer] = max(counts.get(layer, 0), block + 1)
    layers = [counts[k] for k in sorted(counts)]
    if sorted(counts) == [1, 2, 3] and len(set(layers)) == 1 and layers[0] in AUTHORS_BLOCKS:
        return layers[0]
    raise CheckpointError(f"{path} is a ResNet with layers={layers}, not a released variant "
                          "of the authors' ResNetMtl (layers=[4, 4, 4], or [3, 3, 3] before "
                          "their commit a43f94a); this variant cannot be imported")


def convert(fmt: str, path, dataset: str | None = None,
            image_size: int | None = None) -> ImportResult:
    """Read a published checkpoint and map it onto our backbone (nothing written).

    ``dataset`` (one of ``IMPORT_DATASETS``) selects the source's preprocessing for that
    dataset where it differs (RFS on CIFAR-FS/FC100: 32 px, CIFAR statistics; detected
    from RFS's stored options when present); ``image_size`` overrides the input size.
    """
    spec = _fmt(fmt)
    if dataset is not None and dataset not in IMPORT_DATASETS:
        raise ConfigError(f"unknown --dataset '{dataset}'; choose one of "
                          f"{', '.join(IMPORT_DATASETS)}")
    if image_size is not None and image_size < 8:
        raise ConfigError(f"--image-size {image_size} is too small; give the source's input "
                          "size in pixels (e.g. 84, 80 or 32)")
    if dataset in ("cifarfs", "fc100") and fmt not in ("rfs", "authors-tf"):
        raise ConfigError(f"'{fmt}' checkpoints were released for ImageNet-style data only; "
                          f"--dataset {dataset} applies to rfs and authors-tf")
    prep = {"image_size": spec.image_size, "mean": list(spec.mean), "std": list(spec.std),
            "resize": spec.resize}
    backbone_args = dict(spec.backbone_args)
    if fmt == "authors-tf":
        from .importers_tf import convert_tf

        # their FC100 models too: the 5x5 VALID average pool then the (512, ways)
        # classifier need a 5x5 last map, i.e. 80-95 px inputs, so 84 stays
        report = ImportReport()
        state, head, source, settings = convert_tf(path, backbone_args, report)
        result = _Converted(backbone_args=backbone_args, backbone=state, head=head,
                            report=report, source=source, settings=settings)
        return _finish(fmt, spec, result, prep, dataset, image_size)
    path = _single_path(path, fmt)
    obj = read_torch_file(path)
    source = _source_state(obj, spec, fmt, path)
    if fmt == "rfs":
        found = _rfs_dataset(obj, path)
        if dataset and found and dataset != found:
            raise CheckpointError(f"{path} was trained on {found} (its opt.dataset), not "
                                  f"{dataset}; drop --dataset")
        dataset = dataset or found
        if dataset in ("cifarfs", "fc100"):
            prep.update(image_size=RFS_CIFAR["image_size"], mean=list(RFS_CIFAR["mean"]),
                        std=list(RFS_CIFAR["std"]))
            backbone_args = dict(RFS_CIFAR["backbone_args"])
    if fmt in ("authors-pretrain", "authors-meta"):
        blocks = _authors_blocks(source, path)
        if blocks != 4:
            backbone_args["blocks"] = blocks
    report = ImportReport()
    model = create_backbone(spec.backbone, in_channels=3, **backbone_args)
    if spec.meta:
        enable_ss(model, granularity="kernel", scope="all")
    target = {k: v for k, v in model.state_dict().items()}
    head: dict[str, torch.Tensor] = {}

    if fmt in ("authors-pretrain", "authors-meta"):
        head_src: dict[str, torch.Tensor] = {}

        def rename(key: str) -> str | None:
            bare = _strip(key, ("encoder.",))
            if bare.startswith("pre_fc."):
                report.ignored.append((key, "pre-training classifier theta_pre (unused "
                                            "after pre-training)"))
                return None
            if bare.startswith("base_learner."):
                if fmt == "authors-pretrain":
                    report.ignored.append((key, "base learner of the pre-training model "
                                                "(never meta-trained)"))
                else:
                    head_src[bare[len("base_learner."):]] = source[key]
                return None
            if bare.endswith((".mtl_weight", ".mtl_bias")) and fmt == "authors-pretrain":
                raise CheckpointError(f"source tensor '{key}' is an SS parameter: this is a "
                                      "meta-trained checkpoint, import it as 'authors-meta'")
            return bare.replace(".mtl_weight", ".ss_scale").replace(".mtl_bias", ".ss_shift")

        def fillable(tkey: str) -> str | None:
            if tkey.endswith(".ss_shift"):
                conv = tkey[: -len(".ss_shift")]
                if f"{conv}.bias" not in target:
                    return "shift of a bias-free conv (the authors' conv has no mtl_bias)"
            return _fill_num_batches(tkey)

        if fmt == "authors-meta" and not any(k.endswith(".mtl_weight") for k in source):
            raise CheckpointError(f"{path} has no SS parameters (no '*.mtl_weight' keys): a "
                                  "pre-trained checkpoint? import it as 'authors-pretrain'")
        backbone_state = _fill_tensor(source, target, rename, fillable, spec.backbone, report)
        if fmt == "authors-meta":
            head = _authors_head(head_src, model.out_dim, report)
    else:
        encoder_prefix = "encoder."
        has_encoder = any(_strip(k, ()).startswith(encoder_prefix) for k in source)

        def rename(key: str) -> str | None:
            bare = _strip(key, ())
            if fmt == "feat" and has_encoder:
                if not bare.startswith(encoder_prefix):
                    report.ignored.append((key, "FEAT module outside the encoder "
                                                "(classifier or set-to-set head)"))
                    return None
                bare = _strip(bare[len(encoder_prefix):], ())  # encoder wrapped in DataParallel
            if fmt == "rfs" and bare.startswith("classifier."):
                report.ignored.append((key, "RFS pre-training classifier"))
                return None
            return bare

        backbone_state = _fill_tensor(source, target, rename, _fill_num_batches,
                                      spec.backbone, report)

    # final guard: the mapped state loads into the model exactly
    model.load_state_dict(backbone_state, strict=True)
    result = _Converted(backbone_args=backbone_args, backbone=backbone_state, head=head,
                        report=report, source=str(path), settings={})
    return _finish(fmt, spec, result, prep, dataset, image_size)


@dataclass
class _Converted:
    """A mapped state before its metadata is written."""

    backbone_args: dict
    backbone: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]
    report: ImportReport
    source: str
    settings: dict  # ModelInfo fields the source decides (e.g. its inner loop)


def _finish(fmt: str, spec: _Format, done: _Converted, prep: dict, dataset: str | None,
            image_size: int | None) -> ImportResult:
    """The metadata of an import: the source's own test-time preprocessing."""
    extra = {"import_format": fmt}
    if dataset:
        extra["dataset"] = dataset
    if image_size is not None and image_size != prep["image_size"]:
        extra["image_size_overridden"] = {"source": prep["image_size"], "given": image_size}
        prep["image_size"] = image_size
    head = done.head
    info = ModelInfo(
        backbone=spec.backbone,
        backbone_args=dict(done.backbone_args),
        in_channels=3,
        image_size=prep["image_size"],
        resize=prep["resize"],
        mean=list(prep["mean"]),
        std=list(prep["std"]),
        phase="meta" if head else "imported",
        ways=int(head["weight"].shape[0]) if head else 0,
        inner_steps=done.settings.get("inner_steps", 100),
        inner_lr=done.settings.get("inner_lr", 0.01),
        source=done.source,
        extra={**extra, **done.settings.get("extra", {})},
    )
    return ImportResult(info, done.backbone, head, done.report)


def _authors_head(
    head_src: dict[str, torch.Tensor], dim: int, report: ImportReport
) -> dict[str, torch.Tensor]:
    """theta_0 from the authors' BaseLearner: ``fc1_w`` (ways, 640) and ``fc1_b`` (ways,),
    used as ``F.linear(x, fc1_w, fc1_b)``, i.e. already our ``head.weight``/``head.bias``.
    The same tensors also appear as ``vars.0``/``vars.1`` (one Parameter, two names)."""
    names = {"weight": ("fc1_w", "vars.0"), "bias": ("fc1_b", "vars.1")}
    head: dict[str, torch.Tensor] = {}
    for ours, (main, alias) in names.items():
        present = [n for n in (main, alias) if n in head_src]
        if not present:
            raise CheckpointError(f"source tensor 'base_learner.{main}' (theta_0) is missing; "
                                  "is this an 'authors-meta' checkpoint?")
        value = head_src[present[0]]
        for other in present[1:]:
            if not torch.equal(head_src[other], value):
                raise CheckpointError(f"source tensors 'base_learner.{main}' and "
                                      f"'base_learner.{other}' differ; expected one Parameter")
            report.ignored.append((f"base_learner.{other}",
                                   f"alias of base_learner.{present[0]}"))
        head[ours] = value.detach().float().clone()
        report.mapped.append((f"base_learner.{present[0]}", f"head.{ours}"))
    for extra in sorted(set(head_src) - {n for pair in names.values() for n in pair}):
        raise CheckpointError(f"source tensor 'base_learner.{extra}' is not part of the "
                              "authors' linear base learner")
    w, b = head["weight"], head["bias"]
    if w.dim() != 2 or w.shape[1] != dim:
        raise CheckpointError(f"source tensor 'base_learner.fc1_w' has shape "
                              f"{tuple(w.shape)}, expected (ways, {dim})")
    if tuple(b.shape) != (w.shape[0],):
        raise CheckpointError(f"source tensor 'base_learner.fc1_b' has shape "
                              f"{tuple(b.shape)}, expected ({w.shape[0]},)")
    return head


def import_checkpoint(fmt: str, path, out: str | Path, dataset: str | None = None,
                      image_size: int | None = None) -> ModelInfo:
    """Convert ``path`` (format ``fmt``) into a metatransfer checkpoint at ``out``."""
    result = convert(fmt, path, dataset, image_size)
    save_model(out, result.info, result.backbone, result.head or None)
    return result.info


def summarize(fmt: str, result: ImportResult, out: str | Path) -> str:
    """Human-readable account of the import (mapped, filled, ignored tensors)."""
    info, rep = result.info, result.report
    renamed = [(s, t) for s, t in rep.mapped if s != t]
    lines = [
        f"imported {fmt} ({IMPORT_FORMATS[fmt].description}) from {info.source}",
        f"  -> {out}: backbone {info.backbone}, {info.image_size}x{info.image_size} input, "
        f"phase {info.phase}" + (f", theta_0 for {info.ways} ways" if info.ways else ""),
        f"  mapped {len(rep.mapped)} tensors ({len(rep.mapped) - len(renamed)} by name, "
        f"{len(renamed)} renamed)",
    ]
    rules = sorted({_rule(s, t) for s, t in renamed})
    lines += [f"    {r}" for r in rules]
    if rep.filled:
        by_reason: dict[str, int] = {}
        for _, reason in rep.filled:
            by_reason[reason] = by_reason.get(reason, 0) + 1
        lines.append(f"  filled {len(rep.filled)} tensors with their no-op values:")
        lines += [f"    {n} x {reason}" for reason, n in by_reason.items()]
    if rep.ignored:
        lines.append(f"  ignored {len(rep.ignored)} source tensors:")
        lines += [f"    {key}: {reason}" for key, reason in rep.ignored]
    lines.append(f"  preprocessing: {info.image_size} px, resize {info.resize}, normalisation "
                 f"mean {_fmt_floats(info.mean)}, std {_fmt_floats(info.std)}")
    if info.backbone_args.get("bn_stats") == "batch":
        lines.append("  BatchNorm: per-call batch statistics, as the source evaluates (no "
                     "running statistics were released)")
    return "\n".join(lines)


def _rule(source: str, target: str) -> str:
    """Collapse one rename into a rule, e.g. ``encoder.<key> -> <key>`` or
    ``encoder.<conv>.mtl_weight -> <conv>.ss_scale``."""
    if source.startswith("base_learner.") or source.startswith("fc_weights/"):
        return f"{source} -> {target}"
    tf = re.fullmatch(r"(\w+)/block\d+_(conv|bias)(\d*)(_res)?", source)
    if tf:  # the TensorFlow release: one rule per kind of tensor
        numbered = re.sub(r"layer\d+", "layer<i>", target)
        numbered = re.sub(r"conv\d", "conv<j>", numbered)
        j = "<j>" if tf.group(3) else ""
        return f"{tf.group(1)}/block<i>_{tf.group(2)}{j}{tf.group(4) or ''} -> {numbered}"
    if source.endswith(target):
        return f"{source[: -len(target)]}<key> -> <key>"
    stem = target.rsplit(".", 1)[0]
    if stem and stem in source:
        before, after = source.split(stem, 1)
        return f"{before}<conv>{after} -> <conv>{target[len(stem):]}"
    return f"{source} -> {target}"


def _fmt_floats(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


def main_import(fmt: str, path, out: str | Path, dataset: str | None = None,
                image_size: int | None = None) -> str:
    """CLI entry (``mtl import FORMAT PATH --out CHECKPOINT``): import, return a summary."""
    result = convert(fmt, path, dataset, image_size)
    save_model(out, result.info, result.backbone, result.head or None)
    return summarize(fmt, result, out)
