"""Phase 1 — pre-training: cross-entropy on all base classes, best val checkpoint kept.

Algorithm (SPEC §1): train backbone Θ and a linear head θ_pre on every base class with
augmentation and SGD (Nesterov); after each epoch, measure few-shot accuracy on val
episodes with nearest centroids on the embeddings and keep the best Θ. θ_pre is thrown
away afterwards.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..checkpoints import ModelInfo, save_model
from ..config import RunConfig
from ..data import load_split
from ..data.base import class_share
from ..data.transforms import augment_batch, augmentation, gather_uint8, to_device
from ..errors import ConfigError
from ..preprocessing import canonical_resize
from ..runs import (
    CheckpointSchedule,
    FiniteGuard,
    RunDir,
    clip_and_norm,
    interruptible,
    needs_grad_norm,
    rng_state,
    seed_phase,
    set_rng_state,
    stop_request,
)
from .common import (
    autocast,
    make_embedder,
    make_normalizer,
    new_backbone,
    progress,
    use_amp,
    validation_accuracy,
)

log = logging.getLogger(__name__)
BEST = "pretrain_best.safetensors"


def lr_factor(cfg: RunConfig, epoch_progress: float) -> float:
    """Learning-rate multiplier at a (fractional) epoch: step decay or cosine."""
    pc = cfg.pretrain
    if pc.schedule == "step":
        return pc.gamma ** int(epoch_progress // max(pc.step_size, 1))
    return 0.5 * (1.0 + math.cos(math.pi * min(epoch_progress / max(pc.epochs, 1), 1.0)))


def model_info(cfg: RunConfig, split, backbone: nn.Module, phase: str) -> ModelInfo:
    return ModelInfo(
        backbone=cfg.model.backbone, backbone_args=dict(cfg.model.backbone_args),
        in_channels=split.channels, image_size=split.image_size[0],
        resize=canonical_resize(cfg.data.resize),
        mean=list(split.mean), std=list(split.std), phase=phase,
        feature_norm=cfg.meta.feature_norm, inner_steps=cfg.eval.inner_steps,
        inner_lr=cfg.eval.inner_lr, source=cfg.data.name,
    )


@interruptible
def pretrain(cfg: RunConfig, run: RunDir, device: torch.device, show: bool = True) -> Path:
    """Run (or resume) pre-training; returns the path of the best checkpoint.

    Resumable at any step: the batch order of an epoch is a function of (seed, epoch) and
    the state holds every RNG, so a resumed run is bit-identical on CPU.
    """
    pc = cfg.pretrain
    best_path = run.path / BEST
    state = distributed.broadcast_object(run.load_state("pretrain") if run.is_main else None)
    if state and state.get("done"):
        log.info("pre-training already complete in %s", run.path)
        return best_path
    with distributed.local_main_first():
        train = class_share(load_split(cfg.data, cfg.data.train_split), cfg.data.meta_holdout,
                            "pretrain")
        val = load_split(cfg.data, cfg.data.val_split)
    val.require(pc.val_ways, pc.val_shots + pc.val_queries, "validation episodes")

    if not state:
        seed_phase(cfg.seed, "pretrain")
    backbone = new_backbone(cfg, train.channels, device)
    world = distributed.world_size()
    if pc.sync_bn and world > 1:
        if device.type != "cuda":
            raise ConfigError("pretrain.sync_bn needs CUDA (PyTorch's SyncBatchNorm has no CPU "
                              "kernel); set pretrain.sync_bn=false")
        backbone = nn.SyncBatchNorm.convert_sync_batchnorm(backbone)
    head = nn.Linear(backbone.out_dim, train.num_classes).to(device)
    params = [*backbone.parameters(), *head.parameters()]
    optimizer = torch.optim.SGD(params, lr=pc.lr, momentum=pc.momentum,
                                nesterov=pc.nesterov and pc.momentum > 0,
                                weight_decay=pc.weight_decay)
    batch_size = min(pc.batch_size, len(train))  # global: all ranks together
    if batch_size < world:
        raise ConfigError(f"pretrain.batch_size {batch_size} is smaller than the {world} "
                          "processes; every process needs at least one image per step")
    steps_per_epoch = max(1, len(train) // batch_size)  # drop the ragged last batch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, step / steps_per_epoch))

    epoch, start_step, best_acc, totals = 0, 0, -1.0, None
    if state:
        backbone.load_state_dict(state["backbone"])
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        epoch, start_step, best_acc = state["epoch"], state["step"], state["best_acc"]
        set_rng_state(state["rng"])
        # running sums are rank 0's own: on several ranks a resumed epoch's train loss and
        # accuracy cover rank 0's images before the interruption (a logging detail only)
        totals = state.get("totals") if start_step and run.is_main else None
        log.info("resuming pre-training at epoch %d, step %d", epoch, start_step)

    distributed.own_rng_stream(cfg.seed, epoch, start_step)  # augmentation differs per rank
    # Data parallel: each rank takes every world-th image of the global batch and DDP
    # averages the gradients; BatchNorm statistics are per rank unless pretrain.sync_bn.
    model = distributed.wrap_ddp(nn.Sequential(backbone, head), device)
    if world > 1:
        log.info("pre-training on %d processes: global batch %d (%d per process), lr %g",
                 world, batch_size, math.ceil(batch_size / world), pc.lr)
    normalizer = make_normalizer(cfg, train, device)
    transform = augmentation(cfg.data.augment, train.image_size, train.channels)
    amp = use_amp(cfg, device)
    embedder = make_embedder(cfg, backbone, val, device)

    guard = FiniteGuard(cfg.nan_policy, "pre-training", device,
                        "lower pretrain.lr or set pretrain.grad_clip")
    schedule = CheckpointSchedule(cfg.checkpoint_every_steps, cfg.checkpoint_minutes)
    want_norm = needs_grad_norm(cfg.nan_policy, pc.grad_clip)
    stop = stop_request()

    def save(step_in_epoch: int, ep: int, done: bool = False, running: dict | None = None) -> None:
        guard.check()  # never save a state that has seen a NaN/Inf loss
        run.save_state("pretrain", {
            "backbone": backbone.state_dict(), "head": head.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "epoch": ep, "step": step_in_epoch, "best_acc": best_acc, "rng": rng_state(),
            "done": done, "totals": running or {},
        })
        schedule.saved()

    while epoch < pc.epochs:
        backbone.train()
        head.train()
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train))
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        seen, guard.skipped = 0, 0
        if totals:  # resumed mid-epoch: the epoch's running sums so far
            loss_sum += totals["loss_sum"].to(device)
            correct += totals["correct"].to(device)
            seen, guard.skipped, totals = totals["seen"], totals["skipped"], None
        bar = progress(range(start_step, steps_per_epoch), run.is_main and show,
                       desc=f"pretrain {epoch + 1}/{pc.epochs}", leave=False)
        for step in bar:
            batch = order[step * batch_size:(step + 1) * batch_size]
            indices = distributed.shard(batch)
            labels = to_device(train.labels[indices], device)
            images = augment_batch(gather_uint8(train, indices, device), transform)
            images = normalizer(images)
            guard.protect(backbone, head)
            with autocast(amp, device):
                logits = model(images)
            # this rank's share of the global batch's mean loss (the shares sum to it)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=pc.label_smoothing,
                                   reduction="sum") / len(batch)
            optimizer.zero_grad(set_to_none=True)
            (loss * world).backward()  # DDP averages over ranks: the sum of the shares
            global_step = epoch * steps_per_epoch + step + 1
            norm = clip_and_norm(params, pc.grad_clip) if want_norm else None
            if guard.allow(loss, global_step, norm):
                optimizer.step()
                loss_sum += loss.detach() * len(batch)
                correct += (logits.argmax(1) == labels).sum()
                seen += len(indices)
            scheduler.step()
            if stop.requested or schedule.due(global_step):
                save(step + 1, epoch, running={"loss_sum": loss_sum, "correct": correct,
                                               "seen": seen, "skipped": guard.skipped})
            if stop.requested:
                raise KeyboardInterrupt
        start_step = 0
        guard.check()
        loss_total, correct_total, seen = distributed.sum_floats(loss_sum, correct, seen)
        distributed.average_buffers(backbone)  # BN running statistics, same on every rank
        train_loss = loss_total / max(seen, 1)
        val_acc, val_ci = validation_accuracy(
            "protonet", embedder, val, pc.val_ways, pc.val_shots, pc.val_queries,
            pc.val_episodes, seed=cfg.eval.val_seed)
        epoch += 1
        improved = val_acc > best_acc
        if improved:
            best_acc = val_acc
            if run.is_main:
                save_model(best_path, model_info(cfg, train, backbone, "pretrain"), backbone)
        skipped = {"skipped_batches": guard.skipped} if cfg.nan_policy == "skip" else {}
        run.log("pretrain", epoch, loss=train_loss, train_acc=100 * correct_total / max(seen, 1),
                val_acc=val_acc, val_ci95=val_ci, lr=optimizer.param_groups[0]["lr"], **skipped)
        log.info("pretrain epoch %d/%d: loss %.4f, val %d-way %d-shot %.2f%% ± %.2f%s",
                 epoch, pc.epochs, train_loss, pc.val_ways, pc.val_shots, val_acc, val_ci,
                 " (best)" if improved else "")
        save(0, epoch, done=epoch >= pc.epochs)
        if stop.requested:
            raise KeyboardInterrupt
    if not best_path.is_file() and run.is_main:  # zero epochs: keep the initial network
        save_model(best_path, model_info(cfg, train, backbone, "pretrain"), backbone)
    distributed.barrier()  # the other ranks read best_path next
    return best_path
