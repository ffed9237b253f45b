"""Portable model checkpoints: one safetensors file with JSON metadata inside.

A model checkpoint carries everything needed to rebuild the model on a machine without
the training data: backbone name and arguments, input channels and preprocessing, the
backbone tensors (with SS parameters when meta-trained) and, after meta-training, the
classifier initialisation theta_0. Tensor keys are ``backbone.<state key>`` and
``head.weight`` / ``head.bias``. Training state (optimiser, RNGs) lives apart, in
:mod:`metatransfer.runs`.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import CheckpointError

FORMAT_VERSION = 1
METADATA_KEY = "metatransfer"
# a run directory's models: the best pre-trained and the best meta-trained one; a folder
# holding a single other model calls it MODEL_NAME
PRETRAIN_NAME = "pretrain_best.safetensors"
# the best fine-tuned epoch of a pre-training from pretrain.init, whatever selection kept
PRETRAIN_TRAINED_NAME = "pretrain_best_trained.safetensors"
META_NAME = "meta_best.safetensors"
# the best meta-training epoch among the trained ones (when selection may keep the start)
META_TRAINED_NAME = "meta_best_trained.safetensors"
MODEL_NAME = "model.safetensors"


@dataclass
class ModelInfo:
    """Metadata of a model checkpoint (everything but the tensors)."""

    backbone: str
    backbone_args: dict = field(default_factory=dict)
    in_channels: int = 3
    image_size: int = 84
    # how images reach image_size: "direct" (whole image) or "crop:N" (shorter side to N,
    # then the centre crop); see metatransfer.preprocessing. Older checkpoints: direct.
    resize: str = "direct"
    # ink polarity of the training data's loader: every grey level v was read as 255 - v
    # (Omniglot); applied to every file the model is run on (see metatransfer.preprocessing)
    invert: bool = False
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    phase: str = "pretrain"  # pretrain | meta | imported
    ways: int = 0  # rows of theta_0 (0 when there is no head)
    feature_norm: str = "none"
    inner_steps: int = 100
    inner_lr: float = 0.01
    source: str = ""  # e.g. dataset name, or the imported file
    extra: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)``, fsync, then rename over ``path``: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_model(
    path: str | Path,
    info: ModelInfo,
    backbone: nn.Module | dict[str, torch.Tensor],
    head: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a model checkpoint atomically."""
    state = backbone if isinstance(backbone, dict) else backbone.state_dict()
    tensors = {f"backbone.{k}": v.detach().cpu().contiguous() for k, v in state.items()}
    for k, v in (head or {}).items():
        tensors[f"head.{k}"] = v.detach().cpu().contiguous()
    meta = {METADATA_KEY: json.dumps(info.__dict__)}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint file or a run directory (its best meta, else pre-train model)."""
    path = Path(path)
    if path.is_dir():
        for name in (META_NAME, PRETRAIN_NAME, MODEL_NAME):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path} holds no model checkpoint (*.safetensors); train first")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"checkpoint {path} is not readable (permission denied); "
                              "fix its permissions")
    return path


def check_checkpoint(path: str | Path) -> Path:
    """Resolve ``path`` and validate its metadata without loading the tensors (cheap)."""
    path = resolve_checkpoint(path)
    _read_header(path)
    return path


def load_model(path: str | Path) -> tuple[ModelInfo, dict[str, torch.Tensor], dict]:
    """Read a checkpoint: ``(info, backbone_state, head_state)``, validated."""
    path = resolve_checkpoint(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for damaged files
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or corrupt: {exc}); "
            "use an earlier checkpoint or retrain"
        ) from None
    info = _parse_info(path, meta)
    backbone = {k[9:]: v for k, v in tensors.items() if k.startswith("backbone.")}
    head = {k[5:]: v for k, v in tensors.items() if k.startswith("head.")}
    return info, backbone, head


def _parse_info(path: Path, meta: dict) -> ModelInfo:
    if METADATA_KEY not in meta:
        raise CheckpointError(f"{path} is not a metatransfer checkpoint (no metadata); "
                              "convert other formats with `mtl import`")
    raw = json.loads(meta[METADATA_KEY])
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version}, this version reads {FORMAT_VERSION}; "
            "use the metatransfer version that wrote it"
        )
    known = set(ModelInfo.__dataclass_fields__)
    if "invert" not in raw:  # written before polarity was recorded: the Omniglot loader
        raw["invert"] = raw.get("source") == "omniglot"  # has always inverted its files
    return ModelInfo(**{k: v for k, v in raw.items() if k in known})


def read_header(path: str | Path) -> tuple[list[str], ModelInfo]:
    """A checkpoint's tensor keys and validated metadata, from the file header only."""
    return _read_header(resolve_checkpoint(path))


def _read_header(path: Path) -> tuple[list[str], ModelInfo]:
    """:func:`read_header` of an already resolved checkpoint file."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys, meta = list(fh.keys()), fh.metadata() or {}
    except Exception:
        load_model(path)  # raises the clear truncated / corrupt message
        raise
    return keys, _parse_info(path, meta)


def read_info(path: str | Path) -> ModelInfo:
    """A checkpoint's metadata only (the file header; no tensors are read)."""
    return read_header(path)[1]


def build_backbone(info: ModelInfo, state: dict[str, torch.Tensor]) -> nn.Module:
    """Rebuild the backbone of a checkpoint, SS layout included, and load its weights."""
    from .models import create_backbone
    from .models.ss import restore_ss_layout

    model = create_backbone(info.backbone, in_channels=info.in_channels, **info.backbone_args)
    restore_ss_layout(model, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        first = (missing or unexpected)[0]
        raise CheckpointError(
            f"checkpoint does not fit backbone '{info.backbone}' (first mismatched key: "
            f"{first}); was it written by another version?"
        )
    return model


def bn_changed_reason(extra: dict) -> str | None:
    """Why a meta checkpoint's BatchNorm is no longer the pre-trained network's, or None.

    Meta-training freezes W and b, so dropping SS gives back the pre-trained network,
    unless BN changed: its affine parameters were meta-learned (``ss_bn_affine``), its
    running statistics were updated (``meta.bn_mode=train``), or the checkpoint is the MTL
    authors' PyTorch meta model (their optimiser also trained BN gamma/beta, in train mode).
    """
    if extra.get("bn_affine"):
        return "its BN affine parameters were meta-trained (model.ss_bn_affine)"
    if extra.get("bn_mode") == "train":
        return "its BN statistics were updated during meta-training (meta.bn_mode=train)"
    if extra.get("import_format") == "authors-meta":
        return "the MTL authors' meta-training also trained BN gamma/beta"
    return None


def sibling_pretrained(meta_path: str | Path | None) -> Path | None:
    """The pre-trained checkpoint next to a meta checkpoint (its run directory's), if any."""
    if meta_path is None:
        return None
    candidate = Path(meta_path).parent / PRETRAIN_NAME
    return candidate if candidate.is_file() and candidate != Path(meta_path) else None
