"""Phase 2 — meta-transfer learning with the hard-task (HT) meta-batch.

Algorithm (SPEC §1, Sun et al. Alg. 1 with HT):

    freeze the pre-trained Θ; add scaling Φ_S1 = 1 and shifting Φ_S2 = 0 to its convs
    for each meta-batch of k tasks:
        embed all k tasks' images in ONE backbone pass (SS-modulated)
        θ'_t ← inner loop from θ_0 on task t's support set (batched over tasks)
        L_t ← cross-entropy of task t's queries under θ'_t
        failure class of task t ← its class with the lowest query accuracy
        k' hard tasks ← tasks made of the failure classes (reuse | resample images)
        L_h ← the same for each hard task
        (Φ_S, θ_0) ← Adam step on mean(L_t, L_h)
    after each epoch: val accuracy; keep the best (Φ_S, θ_0)
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..checkpoints import META_NAME, META_TRAINED_NAME, build_backbone, load_model, save_model
from ..config import RunConfig, phase_seed
from ..data.base import ImageSplit
from ..data.episodes import EpisodeBatch, EpisodeSampler, hard_tasks
from ..data.training import selection_name, training_splits
from ..data.transforms import Normalizer, gather_uint8
from ..embedding import uses_batch_stats
from ..errors import CheckpointError, MTLError
from ..learners import adapt, linear_logits, normalize_features
from ..methods.mtl import MTL
from ..models.fold import folded_bn
from ..models.ss import enable_ss
from ..preprocessing import apply_stats, check_decoding, checkpoint_preprocessing
from ..runs import RunDir, seed_phase
from ..training import EpochSums, LoopPhase, Step, TrainingLoop
from .common import (
    autocast,
    make_embedder,
    make_normalizer,
    prepare_backbone,
    use_amp,
    validation_accuracy,
)
from .pretrain import ft_settings, model_info

log = logging.getLogger(__name__)


@dataclass
class MetaSums(EpochSums):
    """An epoch's running sums: meta-batch losses, normal and hard tasks' query accuracies
    (this process's shares), meta-batches."""

    loss: torch.Tensor | float = 0.0
    acc: torch.Tensor | float = 0.0
    hard: torch.Tensor | float = 0.0
    count: int = 0


class MetaLearner(nn.Module):
    """The meta-learned state: the frozen SS backbone and the head initialisation θ_0."""

    def __init__(self, backbone: nn.Module, ways: int, granularity: str, scope: str,
                 bn_affine: bool, head_init: str = "zero") -> None:
        super().__init__()
        self.backbone = backbone
        self.ss_params = enable_ss(backbone, granularity, scope, bn_affine)
        # θ_0 starts at zero, where `ft` starts too. Episode labels are random
        # permutations, so a learned N x D θ_0 ('learned', the paper's) can only learn what
        # is common to all rows, and a row shared by all classes cancels in the softmax:
        # zero is the permutation-invariant form, kept fixed unless 'learned' is asked for.
        self.weight0 = nn.Parameter(torch.zeros(ways, backbone.out_dim),
                                    requires_grad=head_init == "learned")
        self.bias0 = nn.Parameter(torch.zeros(ways), requires_grad=head_init == "learned")

    def ss_penalty(self) -> torch.Tensor:
        """Squared distance of the SS parameters from the identity (scale 1, shift 0)."""
        total = self.weight0.new_zeros(())
        for name, param in self.backbone.named_parameters():
            if name.endswith("ss_scale"):
                total = total + (param - 1).pow(2).sum()
            elif name.endswith("ss_shift"):
                total = total + param.pow(2).sum()
        return total

    def head(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight0, "bias": self.bias0}


def forward_chunk(cfg: RunConfig, device: torch.device) -> int:
    """Images per backbone call (0 = all at once).

    On CPU, convolution backward over a whole meta-batch (80+ images) falls out of the
    caches: chunks of 16 ran 1.3-1.4x faster for resnet12 at 84x84 (fwd+bwd of 80 images,
    5.1-5.7 s vs 3.9-4.1 s) with identical results, since BN in eval mode treats images
    independently. A GPU wants the one big pass.
    """
    if cfg.meta.forward_chunk >= 0:
        return cfg.meta.forward_chunk
    return 16 if device.type == "cpu" and cfg.meta.bn_mode == "eval" else 0


def batch_statistics(learner: MetaLearner, cfg: RunConfig) -> bool:
    """Whether BatchNorm normalises meta-training batches with their own statistics."""
    return cfg.meta.bn_mode == "train" or uses_batch_stats(learner.backbone)


def episode_labels(ways: int, per_class: int, device: torch.device) -> torch.Tensor:
    """``(ways * per_class,)`` labels 0,0,..,1,1,.. made on the device (no host copy per
    step); the same as ``EpisodeBatch.support_labels`` / ``query_labels``."""
    return torch.arange(ways, device=device).repeat_interleave(per_class)


def embed_tasks(
    learner: MetaLearner,
    split: ImageSplit,
    batch: EpisodeBatch,
    cfg: RunConfig,
    normalizer: Normalizer,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised features of a batch of tasks: support ``(T, n_support, d)`` and query
    ``(T, n_query, d)``.

    All tasks' support and query images go through one backbone forward pass (in chunks
    on CPU, see :func:`forward_chunk`), unless BatchNorm normalises with batch statistics
    (``meta.bn_mode=train``, or a checkpoint whose BN has no running statistics): then an
    image's embedding depends on its batch, so each task's support set and query set are
    embedded in calls of their own, as meta-test (and the MTL authors' code) embeds them.
    """
    tasks, n_support = batch.support.shape
    n_query = batch.query.shape[1]
    indices = np.concatenate([batch.support.ravel(), batch.query.ravel()])
    images = normalizer(gather_uint8(split, indices, device))
    chunk = forward_chunk(cfg, device)
    batch_stats = batch_statistics(learner, cfg)
    with autocast(use_amp(cfg, device), device), \
            folded_bn(learner.backbone, cfg.fold_bn and not batch_stats):
        if batch_stats:
            parts = list(images[: tasks * n_support].split(n_support))
            parts += list(images[tasks * n_support:].split(n_query))
            feats = torch.cat([learner.backbone(part) for part in parts])
        elif 0 < chunk < len(images):
            feats = torch.cat([learner.backbone(part) for part in images.split(chunk)])
        else:
            feats = learner.backbone(images)
    feats = normalize_features(feats.float(), cfg.meta.feature_norm)
    return (feats[: tasks * n_support].view(tasks, n_support, -1),
            feats[tasks * n_support:].view(tasks, n_query, -1))


def reused_features(
    source: EpisodeBatch, support: torch.Tensor, query: torch.Tensor, hard: EpisodeBatch,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The features of ``hard``'s images taken from ``source``'s, already embedded.

    ``ht=reuse`` builds hard tasks from images the meta-batch has just embedded, and with
    BatchNorm in eval mode an image's embedding does not depend on its batch, so running
    the backbone again would recompute the same rows. Gathering them keeps them in the
    graph: the hard tasks' gradients flow back through the one backbone pass.
    """
    dim = support.shape[-1]
    flat = torch.cat([support.reshape(-1, dim), query.reshape(-1, dim)])
    indices = np.concatenate([source.support.ravel(), source.query.ravel()])
    row = {}
    for position, index in enumerate(indices.tolist()):
        row.setdefault(index, position)
    def gather(images: np.ndarray) -> torch.Tensor:
        rows = torch.as_tensor([row[i] for i in images.ravel().tolist()], device=flat.device)
        return flat.index_select(0, rows).view(*images.shape, dim)
    return gather(hard.support), gather(hard.query)


def losses_from_features(
    learner: MetaLearner,
    support: torch.Tensor,
    query: torch.Tensor,
    batch: EpisodeBatch,
    cfg: RunConfig,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query losses ``(T,)`` after the inner loop from θ_0 on each task's support set, and
    the query predictions ``(T, n_query)`` (on the device: no host sync unless HT needs it).
    """
    mc = cfg.meta
    tasks = support.shape[0]
    support_labels = episode_labels(batch.ways, batch.shots, device).expand(tasks, -1)
    query_labels = episode_labels(batch.ways, batch.queries, device).expand(tasks, -1)
    weight, bias = adapt(learner.weight0, learner.bias0, support, support_labels, batch.ways,
                         mc.inner_steps, mc.inner_lr, first_order=mc.first_order)
    logits = linear_logits(weight, bias, query)
    losses = F.cross_entropy(logits.reshape(-1, batch.ways), query_labels.reshape(-1),
                             reduction="none").view(tasks, -1).mean(1)
    return losses, logits.argmax(-1).detach()


def task_losses(
    learner: MetaLearner,
    split: ImageSplit,
    batch: EpisodeBatch,
    cfg: RunConfig,
    normalizer: Normalizer,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query losses ``(T,)`` of a batch of tasks and their query predictions ``(T, n_query)``
    (:func:`embed_tasks`, then :func:`losses_from_features`)."""
    support, query = embed_tasks(learner, split, batch, cfg, normalizer, device)
    return losses_from_features(learner, support, query, batch, cfg, device)


def task_share(
    learner: MetaLearner,
    split: ImageSplit,
    batch: EpisodeBatch,
    cfg: RunConfig,
    normalizer: Normalizer,
    device: torch.device,
    features: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Sum of the query losses of ``batch``'s tasks, its number of correct queries, the
    predictions ``(T, n_query)`` and the features used (``features`` when given, else
    embedded now); an empty batch (more processes than tasks) gives zeros."""
    if batch.tasks == 0:
        zero = learner.ss_params[0].sum() * 0.0  # part of the graph, so backward still runs
        return zero, zero.detach(), torch.zeros((0, batch.query.shape[1]), dtype=torch.long,
                                                device=device), None
    if features is None:
        features = embed_tasks(learner, split, batch, cfg, normalizer, device)
    losses, pred = losses_from_features(learner, *features, batch, cfg, device)
    labels = episode_labels(batch.ways, batch.queries, device)
    return losses.sum(), (pred == labels).sum().float(), pred, features


def reuses_features(learner: MetaLearner, cfg: RunConfig) -> bool:
    """Whether hard tasks take their features from the meta-batch's pass: ``ht=reuse``
    (same images), BN in eval mode (an embedding independent of its batch) and one
    process (which then holds every task's features)."""
    return (cfg.meta.ht == "reuse" and not batch_statistics(learner, cfg)
            and distributed.world_size() == 1)


def meta_step(
    learner: MetaLearner,
    split: ImageSplit,
    sampler: EpisodeSampler,
    step: int,
    cfg: RunConfig,
    normalizer: Normalizer,
    device: torch.device,
) -> tuple[torch.Tensor, dict]:
    """Loss of meta-batch number ``step`` (k normal + k' hard tasks), ready for backward.

    Data parallel (torchrun): every process draws the whole meta-batch (index sampling is
    cheap) but embeds and adapts only its share of the tasks; the failure classes are
    gathered, so every process builds the same hard tasks, which are shared out in turn.
    The loss and the accuracies returned are this process's shares: summed over the
    processes (the gradients by ``all_reduce_grads``) they are the mean over all tasks.
    """
    mc = cfg.meta
    use_ht = mc.hard_tasks_per_batch > 0
    total_tasks = mc.meta_batch + mc.hard_tasks_per_batch
    batch = sampler.batch(step * mc.meta_batch, mc.meta_batch)
    mine = distributed.shard(batch.tasks)
    loss, correct, pred, features = task_share(learner, split, batch[mine], cfg, normalizer,
                                               device)
    stats = {"acc": correct / batch.query.size}
    if use_ht:
        # every process needs every task's predictions: they decide the hard tasks' classes
        pred_host = pred.cpu().numpy()
        n_query = batch.query.shape[1]
        slots = (np.asarray(mine)[:, None] * n_query + np.arange(n_query)).ravel()
        pred_all = distributed.gather_by_index(slots, pred_host.ravel(), batch.tasks * n_query)
        pred_all = pred_all.reshape(batch.tasks, n_query).astype(np.int64)
        rng = np.random.default_rng([phase_seed(cfg, "meta"), 7919, step])
        hard = hard_tasks(batch, pred_all, mc.ht_tasks, mc.ht, sampler, rng)
        hard_features = None
        if features is not None and reuses_features(learner, cfg):
            hard_features = reused_features(batch, *features, hard)
        hard_loss, hard_correct, _, _ = task_share(
            learner, split, hard[distributed.shard(hard.tasks)], cfg, normalizer, device,
            hard_features)
        stats["hard_acc"] = hard_correct / hard.query.size
        loss = loss + hard_loss
    loss = loss / total_tasks
    if mc.ss_decay > 0:  # each process adds its share: the sum over processes is one penalty
        loss = loss + mc.ss_decay * learner.ss_penalty() / distributed.world_size()
    return loss, stats


def load_pretrained(path: Path) -> tuple:
    info, state, _ = load_model(path)
    if any(k.endswith("ss_scale") for k in state):
        raise CheckpointError(f"{path} is already meta-trained; give the pre-trained checkpoint")
    return info, build_backbone(info, state)


def meta_train(cfg: RunConfig, run: RunDir, device: torch.device, pretrained: Path,
               show: bool = True) -> Path:
    """Run (or resume) meta-transfer learning; returns the best meta checkpoint's path.

    Resumable at any step: meta-batch ``i`` is a pure function of (seed, i) and the state
    holds every RNG, so a resumed run is bit-identical on CPU.
    """
    mc = cfg.meta
    # the pre-trained network (SS = identity, θ_0 = zero, i.e. `ft`) is the first candidate
    # when meta.select_start
    phase = LoopPhase("meta", "meta-training", label="meta-train", best=META_NAME,
                      best_trained=META_TRAINED_NAME,
                      epochs=mc.epochs, grad_clip=mc.grad_clip, sums=MetaSums,
                      nan_hint="lower meta.lr_ss / meta.lr_head or set meta.grad_clip",
                      val_setting=f"{mc.ways}-way {mc.shots}-shot",
                      validate_start=mc.select_start)
    loop = TrainingLoop(phase, cfg, run, device, show)
    if loop.finished:
        return loop.best_path
    data, prep = checkpoint_preprocessing(cfg.data, pretrained)  # the pre-trained model's
    with distributed.local_main_first():
        train, val = training_splits(data, "meta")
    check_decoding(train, prep)  # decoded as the pre-trained model's data was
    train, val = apply_stats(train, prep), apply_stats(val, prep)
    seed = phase_seed(cfg, "meta")
    sampler = EpisodeSampler(train.indices_by_class, mc.ways, mc.shots, mc.queries,
                             seed=seed, name=train.name)
    val.require(mc.ways, mc.shots + mc.queries, "validation episodes")
    if not loop.resuming:
        seed_phase(seed, "meta")
    info, backbone = load_pretrained(pretrained)
    if info.in_channels != train.channels:
        raise MTLError(f"{pretrained} expects {info.in_channels}-channel images but "
                       f"{train.name} has {train.channels}; pre-train on this dataset")
    learner = MetaLearner(backbone.to(device), mc.ways, cfg.model.ss_granularity,
                          cfg.model.ss_scope, cfg.model.ss_bn_affine, mc.head_init).to(device)
    prepare_backbone(cfg, backbone, device)  # after SS exists, so compile traces it
    groups = [{"params": learner.ss_params, "lr": mc.lr_ss}]
    if mc.head_init == "learned":
        groups.append({"params": [learner.weight0, learner.bias0], "lr": mc.lr_head})
    optimizer = torch.optim.Adam(groups)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, max(mc.step_size, 1), mc.gamma)
    bn_train = mc.bn_mode == "train"
    # BN statistics (bn_mode=train) see only this process's tasks: averaged each epoch
    loop.restore({"learner": learner}, optimizer, scheduler, scheduler_per="epoch",
                 average_buffers=bn_train, train_mode=bn_train)

    world = distributed.world_size()
    if world > 1:
        log.info("meta-training on %d processes: meta-batch %d + %d hard tasks split across "
                 "them, lr_ss %g, lr_head %g", world, mc.meta_batch,
                 mc.hard_tasks_per_batch, mc.lr_ss, mc.lr_head)
    normalizer = make_normalizer(cfg, train, device)
    embedder = make_embedder(cfg, backbone, val, device, mc.feature_norm)
    meta_info = model_info(cfg, train, backbone, "meta", start=info)
    meta_info.ways = mc.ways
    # the inner loop mtl is evaluated with (meta-test's, so adapt and serve run as it does)
    meta_info.inner_steps, meta_info.inner_lr = cfg.eval.inner_steps, cfg.eval.inner_lr
    meta_info.extra = {"bn_affine": cfg.model.ss_bn_affine, "ss_scope": cfg.model.ss_scope,
                       "ss_granularity": cfg.model.ss_granularity, "ht": mc.ht,
                       "head_init": mc.head_init, "bn_mode": mc.bn_mode,
                       **({"meta_inner_steps": mc.inner_steps, "meta_inner_lr": mc.inner_lr}
                          if (mc.inner_steps, mc.inner_lr) != (cfg.eval.inner_steps,
                                                               cfg.eval.inner_lr) else {}),
                       **ft_settings(cfg),
                       # the pre-training it starts from: which fine-tuning epoch it kept
                       **{k: v for k, v in info.extra.items() if k.startswith("pretrain_")}}
    meta_info.resize = prep.resize

    def train_step(epoch: int, step: int) -> Step:
        """One meta-batch: its normal and hard tasks' mean query loss."""
        loss, stats = meta_step(learner, train, sampler, epoch * mc.episodes_per_epoch + step,
                                cfg, normalizer, device)
        return Step(loss, MetaSums(loss=loss.detach(), acc=stats["acc"],
                                   hard=stats.get("hard_acc", 0.0), count=1))

    def validate() -> tuple[float, float]:
        """Accuracy on val episodes, adapting from θ_0 as meta-testing does."""
        theta0 = (learner.weight0.detach(), learner.bias0.detach())
        return validation_accuracy(MTL(theta0, mc.inner_steps, mc.inner_lr), embedder, val,
                                   mc.ways, mc.shots, mc.queries, mc.val_episodes,
                                   seed=cfg.eval.val_seed)

    def summary(totals: MetaSums) -> dict:
        loss, acc, hard = distributed.sum_floats(totals.loss, totals.acc, totals.hard)
        count = max(totals.count, 1)
        extra = {"hard_acc": 100 * hard / count} if mc.hard_tasks_per_batch else {}
        return {"loss": loss / count, "train_acc": 100 * acc / count, **extra}

    def save_best(path: Path) -> None:
        kept = loop.selection
        epoch, acc = ((kept.epoch, kept.acc) if path == loop.best_path
                      else (kept.trained_epoch, kept.trained_acc))
        info = dataclasses.replace(meta_info, extra={
            **meta_info.extra, "selected_epoch": epoch, "selection_acc": round(acc, 2),
            "meta_epochs": mc.epochs, "selection": selection_name(cfg.data)})
        save_model(path, info, backbone, learner.head())

    return loop.run(mc.episodes_per_epoch, train_step, validate, summary, save_best)
