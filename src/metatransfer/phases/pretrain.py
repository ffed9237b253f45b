"""Phase 1 — pre-training: cross-entropy on all base classes, best val checkpoint kept.

Algorithm (SPEC §1): train backbone Θ and a linear head θ_pre on every base class with
augmentation and SGD (Nesterov); after each epoch, measure few-shot accuracy on val
episodes with nearest centroids on the embeddings and keep the best Θ. θ_pre is thrown
away afterwards.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import ModelInfo, save_model
from ..config import RunConfig
from ..data import load_split
from ..data.transforms import Normalizer, augment_batch, augmentation, gather_uint8
from ..errors import MTLError
from ..runs import RunDir, rng_state, set_rng_state
from .common import autocast, channels_last, make_embedder, new_backbone, progress, use_amp
from .common import validation_accuracy

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
        mean=list(split.mean), std=list(split.std), phase=phase,
        feature_norm=cfg.meta.feature_norm, inner_steps=cfg.eval.inner_steps,
        inner_lr=cfg.eval.inner_lr, source=cfg.data.name,
    )


def pretrain(cfg: RunConfig, run: RunDir, device: torch.device, show: bool = True) -> Path:
    """Run (or resume) pre-training; returns the path of the best checkpoint."""
    pc = cfg.pretrain
    best_path = run.path / BEST
    state = run.load_state("pretrain")
    if state and state.get("done"):
        log.info("pre-training already complete in %s", run.path)
        return best_path
    train = load_split(cfg.data, cfg.data.train_split)
    val = load_split(cfg.data, cfg.data.val_split)
    val.require(pc.val_ways, pc.val_shots + pc.val_queries, "validation episodes")

    backbone = new_backbone(cfg, train.channels, device)
    head = nn.Linear(backbone.out_dim, train.num_classes).to(device)
    params = [*backbone.parameters(), *head.parameters()]
    optimizer = torch.optim.SGD(params, lr=pc.lr, momentum=pc.momentum,
                                nesterov=pc.nesterov and pc.momentum > 0,
                                weight_decay=pc.weight_decay)
    batch_size = min(pc.batch_size, len(train))
    steps_per_epoch = max(1, len(train) // batch_size)  # drop the ragged last batch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, step / steps_per_epoch))

    epoch, start_step, best_acc = 0, 0, -1.0
    if state:
        backbone.load_state_dict(state["backbone"])
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        epoch, start_step, best_acc = state["epoch"], state["step"], state["best_acc"]
        set_rng_state(state["rng"])
        log.info("resuming pre-training at epoch %d, step %d", epoch, start_step)

    normalizer = Normalizer(train.mean, train.std, device)
    transform = augmentation(cfg.data.augment, train.image_size, train.channels)
    amp, cl = use_amp(cfg, device), channels_last(cfg, device)
    embedder = make_embedder(cfg, backbone, val, device)

    def save(step_in_epoch: int, ep: int, done: bool = False) -> None:
        run.save_state("pretrain", {
            "backbone": backbone.state_dict(), "head": head.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "epoch": ep, "step": step_in_epoch, "best_acc": best_acc, "rng": rng_state(),
            "done": done,
        })

    last_save = time.monotonic()
    while epoch < pc.epochs:
        backbone.train()
        head.train()
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train))
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        seen = 0
        bar = progress(range(start_step, steps_per_epoch), run.is_main and show,
                       desc=f"pretrain {epoch + 1}/{pc.epochs}", leave=False)
        for step in bar:
            indices = order[step * batch_size:(step + 1) * batch_size]
            labels = torch.as_tensor(train.labels[indices], device=device)
            images = augment_batch(gather_uint8(train, indices, device), transform)
            images = normalizer(images)
            if cl:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(amp, device):
                logits = head(backbone(images))
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=pc.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach() * len(indices)
            correct += (logits.argmax(1) == labels).sum()
            seen += len(indices)
            if time.monotonic() - last_save > cfg.checkpoint_minutes * 60:
                save(step + 1, epoch)
                last_save = time.monotonic()
        start_step = 0
        train_loss = float(loss_sum) / max(seen, 1)
        if not math.isfinite(train_loss):
            raise MTLError(f"pre-training loss became {train_loss} in epoch {epoch + 1}; "
                           "lower pretrain.lr (the last good checkpoint is kept)")
        val_acc, val_ci = validation_accuracy(
            "protonet", embedder, val, pc.val_ways, pc.val_shots, pc.val_queries,
            pc.val_episodes, seed=cfg.eval.seed)
        epoch += 1
        improved = val_acc > best_acc
        if improved:
            best_acc = val_acc
            if run.is_main:
                save_model(best_path, model_info(cfg, train, backbone, "pretrain"), backbone)
        run.log("pretrain", epoch, loss=train_loss, train_acc=100 * float(correct) / max(seen, 1),
                val_acc=val_acc, val_ci95=val_ci, lr=optimizer.param_groups[0]["lr"])
        log.info("pretrain epoch %d/%d: loss %.4f, val %d-way %d-shot %.2f%% ± %.2f%s",
                 epoch, pc.epochs, train_loss, pc.val_ways, pc.val_shots, val_acc, val_ci,
                 " (best)" if improved else "")
        save(0, epoch, done=epoch >= pc.epochs)
        last_save = time.monotonic()
    if not best_path.is_file() and run.is_main:  # zero epochs: keep the initial network
        save_model(best_path, model_info(cfg, train, backbone, "pretrain"), backbone)
    return best_path
