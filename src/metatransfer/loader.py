"""From a checkpoint to a model you can run: the one way meta-test and every tool load one.

A run directory holds two models: ``meta_best`` (the SS backbone and θ_0, what ``mtl``
runs on) and ``pretrain_best`` (the plain pre-trained network the baselines run on); a
single file is either. :func:`find_checkpoints` resolves a directory or file (plus an
optional explicit pre-trained file) to :class:`CheckpointPaths`, reading headers only;
:func:`load_models` loads what each requested method needs (its class says which network,
:mod:`metatransfer.methods`) as :class:`LoadedModel` objects, one per network, shared by
the methods that run on it; :func:`available_methods` says, from the headers, which
methods a checkpoint supports.

A :class:`LoadedModel`'s :class:`~metatransfer.preprocessing.Preprocessing` is the whole
description of what happens to an image before its backbone and to the features after
it; :meth:`LoadedModel.embedder` builds the embedder from it, so meta-test, ``mtl adapt``,
``mtl serve`` and :class:`~metatransfer.adapt.FewShotClassifier` cannot disagree.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoints import (
    META_NAME,
    PRETRAIN_NAME,
    ModelInfo,
    bn_changed_reason,
    build_backbone,
    check_checkpoint,
    load_model,
    read_header,
    sibling_pretrained,
)
from .data.transforms import Normalizer
from .embedding import Embedder
from .errors import MTLError
from .methods.base import META, PRETRAINED
from .methods.catalog import method_class, offered
from .methods.registry import method_names
from .models import place_backbone
from .preprocessing import Preprocessing, from_info

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointPaths:
    """The model files of a run: meta-trained (SS + θ_0) and pre-trained, either may lack."""

    meta: Path | None = None
    pretrained: Path | None = None


@dataclass(eq=False)  # compared and hashed by identity: one object per loaded network
class LoadedModel:
    """One network ready to run: its metadata, backbone, θ_0 (meta models) and the
    preprocessing it is run with (its checkpoint's, unless meta-test's config overrides
    it)."""

    info: ModelInfo
    backbone: nn.Module
    head: tuple[torch.Tensor, torch.Tensor] | None
    preprocessing: Preprocessing
    path: Path

    @property
    def channels(self) -> int:
        """Channels of the images the backbone takes."""
        return int(self.info.in_channels)

    def embedder(self, device: torch.device, amp: bool = False, channels_last: bool = False,
                 compile: bool = False, fold_bn: bool = True) -> Embedder:
        """Put the backbone (eval mode) and θ_0 on ``device`` and return the embedder that
        runs the backbone under this model's preprocessing."""
        self.backbone = place_backbone(self.backbone, device, channels_last, compile).eval()
        if self.head is not None:
            self.head = (self.head[0].to(device), self.head[1].to(device))
        prep = self.preprocessing
        return Embedder(self.backbone, Normalizer(prep.mean, prep.std, device, channels_last),
                        device, amp=amp, feature_norm=prep.feature_norm, fold_bn=fold_bn)


def _is_meta(path: Path) -> bool:
    """Whether a checkpoint file is meta-trained (θ_0 or SS tensors), from its header."""
    keys, _ = read_header(path)
    return any(k.startswith("head.") or k.endswith(("ss_scale", "ss_shift")) for k in keys)


def find_checkpoints(source: str | Path, pretrained: str | Path | None = None) -> CheckpointPaths:
    """The models of a run directory (its ``meta_best`` and ``pretrain_best``) or of one
    file (meta-trained when it has θ_0 or SS, else pre-trained); ``pretrained`` replaces
    the pre-trained one. Headers are validated, tensors not read."""
    path = Path(source)
    meta = pre = None
    if path.is_dir() and ((path / META_NAME).is_file() or (path / PRETRAIN_NAME).is_file()):
        if (path / META_NAME).is_file():
            meta = check_checkpoint(path / META_NAME)
        if (path / PRETRAIN_NAME).is_file():
            pre = check_checkpoint(path / PRETRAIN_NAME)
    else:
        file = check_checkpoint(path)  # a file, a folder's model.safetensors, or the error
        meta, pre = (file, None) if _is_meta(file) else (None, file)
    if pretrained is not None:
        pre = check_checkpoint(pretrained)
    return CheckpointPaths(meta, pre)


def _from_file(path: Path, info: ModelInfo, state: dict, head: dict) -> LoadedModel:
    theta0 = (head["weight"], head["bias"]) if head else None
    return LoadedModel(info, build_backbone(info, state), theta0, from_info(info), path)


def load_models(paths: CheckpointPaths, methods: Iterable[str]) -> dict[str, LoadedModel]:
    """The network each method runs on: the meta model (SS backbone + θ_0) for methods on
    :data:`~metatransfer.methods.META`, the pre-trained one for the others (the
    baselines), loaded once each and shared. Meta-trained models come first.

    The pre-trained network is the explicit or run-directory file; without one it is the
    meta model with SS dropped (meta-training froze W and b), unless its BN changed
    (:func:`~metatransfer.checkpoints.bn_changed_reason`): then the ``pretrain_best``
    beside it, or a one-line error.
    """
    methods = list(methods)
    kinds = {m: method_class(m) for m in methods}
    meta = load_model(paths.meta) if paths.meta else None
    models: dict[str, LoadedModel] = {}
    on_meta = [m for m in methods if kinds[m].model == META]
    if on_meta:
        if meta is None or (any(kinds[m].needs_head for m in on_meta) and not meta[2]):
            raise MTLError(f"method '{on_meta[0]}' needs a meta-trained checkpoint (run "
                           "meta-train first, or pass --checkpoint)")
        model = _from_file(paths.meta, *meta)
        models.update((m, model) for m in on_meta)
    baselines = [m for m in methods if kinds[m].model == PRETRAINED]
    if baselines:
        plain = _pretrained_model(paths, meta, baselines)
        models.update((m, plain) for m in baselines)
    return models


def _pretrained_model(paths: CheckpointPaths, meta: tuple | None,
                      baselines: list[str]) -> LoadedModel:
    """The pre-trained network for ``baselines`` (see :func:`load_models`)."""
    names = ", ".join(baselines)
    changed = bn_changed_reason(meta[0].extra) if meta is not None else None
    pretrained = paths.pretrained
    if pretrained is None and changed:
        pretrained = sibling_pretrained(paths.meta)  # the run directory's
        if pretrained is not None:
            log.info("baselines %s use %s: %s", names, pretrained, changed)
    if pretrained is not None:
        info, state, _ = load_model(pretrained)
        return _from_file(pretrained, info, state, {})
    if meta is not None and not changed:
        # W and b are frozen during meta-training: dropping SS gives the pre-trained net
        info, state = meta[0], {k: v for k, v in meta[1].items()
                                if not k.endswith(("ss_scale", "ss_shift"))}
        return _from_file(paths.meta, info, state, {})
    if meta is not None:
        raise MTLError(f"methods {names} are the pre-trained network, but {paths.meta} is not "
                       f"({changed}): pass --pretrained with the checkpoint meta-training "
                       "started from (pretrain_best.safetensors, or the imported pre-trained "
                       "model)")
    raise MTLError(f"methods {names} need the pre-trained checkpoint (pass --pretrained)")


def available_methods(paths: CheckpointPaths) -> list[str]:
    """The embed-once methods ``paths`` supports, in the order the tools offer them (the
    first is their default: ``mtl`` when there is θ_0, else ``protonet``); headers only."""
    keys, info = read_header(paths.meta) if paths.meta else ([], None)
    has_head = any(k.startswith("head.") for k in keys)
    bn_changed = info is not None and bn_changed_reason(info.extra) is not None
    pretrained = paths.pretrained or (sibling_pretrained(paths.meta) if bn_changed else None)
    plain = pretrained is not None or (paths.meta is not None and not bn_changed)
    usable = []
    for name in method_names():
        cls = method_class(name)
        if not cls.embeds_once:
            continue
        if cls.model == META and paths.meta is not None and (has_head or not cls.needs_head):
            usable.append(name)
        elif cls.model == PRETRAINED and plain:
            usable.append(name)
    return offered(usable)
