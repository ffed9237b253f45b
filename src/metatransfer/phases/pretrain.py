"""Phase 1 — pre-training: cross-entropy on all base classes, best val checkpoint kept.

Algorithm (SPEC §1): train backbone Θ and a linear head θ_pre on every base class with
augmentation and SGD (Nesterov); after each epoch, measure few-shot accuracy on val
episodes with nearest centroids on the embeddings and keep the best Θ. θ_pre is thrown
away afterwards.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..checkpoints import (
    PRETRAIN_NAME,
    PRETRAIN_TRAINED_NAME,
    ModelInfo,
    build_backbone,
    save_model,
)
from ..config import RunConfig, phase_seed
from ..data.training import training_splits
from ..data.transforms import augment_batch, augmentation, gather_uint8, to_device
from ..errors import ConfigError
from ..methods.protonet import ProtoNet
from ..preprocessing import apply_stats, canonical_resize, for_checkpoint
from ..runs import RunDir, seed_phase
from ..training import EpochSums, LoopPhase, Step, TrainingLoop
from .common import (
    Float32,
    autocast,
    make_embedder,
    make_normalizer,
    new_backbone,
    prepare_backbone,
    use_amp,
    validation_accuracy,
)

log = logging.getLogger(__name__)


@dataclass
class PretrainSums(EpochSums):
    """An epoch's running sums: loss over images, correct predictions, images seen."""

    loss: torch.Tensor | float = 0.0
    correct: torch.Tensor | int = 0
    seen: int = 0


def lr_factor(cfg: RunConfig, epoch_progress: float) -> float:
    """Learning-rate multiplier at a (fractional) epoch: a linear warm-up over
    ``pretrain.warmup_epochs``, then step decay or a cosine over the remaining epochs."""
    pc = cfg.pretrain
    warmup = min(pc.warmup_epochs, pc.epochs)
    if epoch_progress < warmup:
        return epoch_progress / warmup
    if pc.schedule == "step":
        return pc.gamma ** int(epoch_progress // max(pc.step_size, 1))
    span = max(pc.epochs - warmup, 1e-9)
    return 0.5 * (1.0 + math.cos(math.pi * min((epoch_progress - warmup) / span, 1.0)))


def parameter_groups(backbone: nn.Module, head: nn.Module, cfg: RunConfig) -> list[dict]:
    """The optimiser's groups: the backbone at ``lr x backbone_lr_scale``, the head at
    ``lr``; BatchNorm and bias parameters without weight decay when fine-tuning an imported
    network (decaying its BN scales toward 0 only erodes what it learnt on ImageNet)."""
    pc = cfg.pretrain
    groups = [{"params": list(head.parameters()), "lr": pc.lr}]
    lr = pc.lr * pc.backbone_lr_scale
    if not pc.init:
        if pc.backbone_lr_scale == 1.0:  # one group, as from-scratch training always had
            return [{"params": [*backbone.parameters(), *head.parameters()], "lr": pc.lr}]
        return [{"params": list(backbone.parameters()), "lr": lr}, *groups]
    decay = [p for p in backbone.parameters() if p.ndim > 1]
    no_decay = [p for p in backbone.parameters() if p.ndim <= 1]
    return [{"params": decay, "lr": lr}, {"params": no_decay, "lr": lr, "weight_decay": 0.0},
            *groups]


def model_info(cfg: RunConfig, split, backbone: nn.Module, phase: str,
               start: ModelInfo | None = None) -> ModelInfo:
    """The checkpoint metadata of a model trained on ``split``: what its loader did to every
    image (``split.decoding``) and its statistics are the model's preprocessing. A model
    that started from another (``pretrain.init``: ``start``) keeps its architecture."""
    steps = split.decoding
    arch = (start.backbone, dict(start.backbone_args)) if start else (
        cfg.model.backbone, dict(cfg.model.backbone_args))
    return ModelInfo(
        backbone=arch[0], backbone_args=arch[1],
        in_channels=split.channels, image_size=split.image_size[0],
        resize=canonical_resize(steps.resize), invert=steps.invert,
        mean=list(split.mean), std=list(split.std), phase=phase,
        feature_norm=cfg.meta.feature_norm, inner_steps=cfg.eval.inner_steps,
        inner_lr=cfg.eval.inner_lr, source=cfg.data.name,
        extra={**({"init": cfg.pretrain.init} if start else {}), **ft_settings(cfg)},
    )


def ft_settings(cfg: RunConfig) -> dict:
    """The ft baseline's own evaluation inner loop when the config tunes it apart
    (``eval.ft_inner_*``): recorded so that adapt and serve run ft as meta-test does."""
    ec = cfg.eval
    out = {}
    if ec.ft_inner_steps is not None:
        out["ft_inner_steps"] = ec.ft_inner_steps
    if ec.ft_inner_lr is not None:
        out["ft_inner_lr"] = ec.ft_inner_lr
    return out


def initial_network(cfg: RunConfig) -> tuple[ModelInfo, dict] | None:
    """``pretrain.init`` as ``(info, state)``: a named ImageNet network or a checkpoint."""
    if not cfg.pretrain.init:
        return None
    from ..importers_timm import load_external

    info, state = load_external(cfg.pretrain.init)
    if info.backbone != cfg.model.backbone:
        raise ConfigError(f"pretrain.init {cfg.pretrain.init} is a {info.backbone} network but "
                          f"model.backbone is {cfg.model.backbone}; set "
                          f"model.backbone={info.backbone}")
    if any(k.endswith("ss_scale") for k in state):
        raise ConfigError(f"pretrain.init {cfg.pretrain.init} is meta-trained (it has SS); "
                          "start from a pre-trained network")
    return info, state


def pretrain(cfg: RunConfig, run: RunDir, device: torch.device, show: bool = True) -> Path:
    """Run (or resume) pre-training; returns the path of the best checkpoint.

    Resumable at any step: the batch order of an epoch is a function of (seed, epoch) and
    the state holds every RNG, so a resumed run is bit-identical on CPU.
    """
    pc = cfg.pretrain
    # from an imported network, the import itself is a selection candidate (epoch 0): the
    # fine-tuning is kept only where it beats the network as it came, and the best
    # fine-tuned epoch stays on record beside it
    phase = LoopPhase("pretrain", "pre-training", best=PRETRAIN_NAME, epochs=pc.epochs,
                      grad_clip=pc.grad_clip, sums=PretrainSums,
                      nan_hint="lower pretrain.lr or set pretrain.grad_clip",
                      val_setting=f"{pc.val_ways}-way {pc.val_shots}-shot",
                      validate_start=bool(pc.init),
                      best_trained=PRETRAIN_TRAINED_NAME if pc.init else "")
    loop = TrainingLoop(phase, cfg, run, device, show)
    if loop.finished:
        return loop.best_path
    start = initial_network(cfg)
    data = cfg.data
    if start:  # its preprocessing (size, resize, statistics), unless data.* overrides it
        data, prep = for_checkpoint(cfg.data, start[0], "pretrain.init: ")
    with distributed.local_main_first():
        train, val = training_splits(data, "pretrain")
    if start:
        train, val = apply_stats(train, prep), apply_stats(val, prep)
    val.require(pc.val_ways, pc.val_shots + pc.val_queries, "validation episodes")

    seed = phase_seed(cfg, "pretrain")
    if not loop.resuming:
        seed_phase(seed, "pretrain")
    if start:
        backbone = prepare_backbone(cfg, build_backbone(*start), device)
    else:
        backbone = new_backbone(cfg, train.channels, device)
    world = distributed.world_size()
    if pc.sync_bn and world > 1:
        if device.type != "cuda":
            raise ConfigError("pretrain.sync_bn needs CUDA (PyTorch's SyncBatchNorm has no CPU "
                              "kernel); set pretrain.sync_bn=false")
        backbone = nn.SyncBatchNorm.convert_sync_batchnorm(backbone)
    head = nn.Linear(backbone.out_dim, train.num_classes).to(device)
    optimizer = torch.optim.SGD(parameter_groups(backbone, head, cfg), lr=pc.lr,
                                momentum=pc.momentum, nesterov=pc.nesterov and pc.momentum > 0,
                                weight_decay=pc.weight_decay)
    batch_size = min(pc.batch_size, len(train))  # global: all ranks together
    if batch_size < world:
        raise ConfigError(f"pretrain.batch_size {batch_size} is smaller than the {world} "
                          "processes; every process needs at least one image per step")
    steps_per_epoch = max(1, len(train) // batch_size)  # drop the ragged last batch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, step / steps_per_epoch))
    loop.restore({"backbone": backbone, "head": head}, optimizer, scheduler,
                 scheduler_per="step", ddp=True)

    distributed.own_rng_stream(seed, loop.epoch, loop.start_step)  # augmentation per rank
    # Data parallel: each rank takes every world-th image of the global batch and DDP
    # averages the gradients; BatchNorm statistics are per rank unless pretrain.sync_bn.
    model = distributed.wrap_ddp(nn.Sequential(backbone, Float32(head)), device)
    if world > 1:
        log.info("pre-training on %d processes: global batch %d (%d per process), lr %g",
                 world, batch_size, math.ceil(batch_size / world), pc.lr)
    normalizer = make_normalizer(cfg, train, device)
    transform = augmentation(cfg.data.augment, train.image_size, train.channels)
    amp = use_amp(cfg, device)
    embedder = make_embedder(cfg, backbone, val, device)

    @functools.lru_cache(maxsize=1)
    def batch_order(epoch: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch]).permutation(len(train))

    def train_step(epoch: int, step: int) -> Step:
        """Cross-entropy of one augmented batch over all base classes."""
        batch = batch_order(epoch)[step * batch_size:(step + 1) * batch_size]
        indices = distributed.shard(batch)
        labels = to_device(train.labels[indices], device)
        images = normalizer(augment_batch(gather_uint8(train, indices, device), transform))
        with autocast(amp, device):
            logits = model(images)
        # this rank's share of the global batch's mean loss (the shares sum to it)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=pc.label_smoothing,
                               reduction="sum") / len(batch)
        return Step(loss, PretrainSums(loss=loss.detach() * len(batch),
                                       correct=(logits.argmax(1) == labels).sum(),
                                       seen=len(indices)))

    def validate() -> tuple[float, float]:
        """Nearest-centroid accuracy of the embeddings on val episodes."""
        return validation_accuracy(ProtoNet(), embedder, val, pc.val_ways, pc.val_shots,
                                   pc.val_queries, pc.val_episodes, seed=cfg.eval.val_seed)

    def summary(totals: PretrainSums) -> dict:
        loss, correct, seen = distributed.sum_floats(totals.loss, totals.correct, totals.seen)
        return {"loss": loss / max(seen, 1), "train_acc": 100 * correct / max(seen, 1),
                "lr": optimizer.param_groups[-1]["lr"],  # the head's (or the only) lr
                "lr_backbone": optimizer.param_groups[0]["lr"]}

    def save_best(path: Path) -> None:
        info = model_info(cfg, train, backbone, "pretrain", start[0] if start else None)
        if start:  # which fine-tuning epoch this is (0: the import as it came)
            kept = loop.selection
            epoch, acc = ((kept.epoch, kept.acc) if path == loop.best_path
                          else (kept.trained_epoch, kept.trained_acc))
            info.extra.update(pretrain_selected_epoch=epoch, pretrain_epochs=pc.epochs,
                              pretrain_selection_acc=round(acc, 2))
        save_model(path, info, backbone)

    return loop.run(steps_per_epoch, train_step, validate, summary, save_best)
