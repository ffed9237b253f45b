"""Meta-training speed, per backbone: episodes/s of ``phases.meta_train.meta_step`` +
backward + Adam (5-way, 15 queries, 100 inner steps; 1 and 5 shots; first and second
order) next to one SS-backbone forward+backward of the same images (the reference the
overhead is measured against), with FLOP rates and peak memory; then the meta-batch
speed-up: k tasks in one backbone pass and one batched inner loop vs k separate tasks;
and what a hard task costs (``ht=resample`` against ``ht=reuse``, whose features come from
the meta-batch's own pass).

    python benchmarks/meta_train_speed.py                       # CPU default
    python benchmarks/meta_train_speed.py --quick --backbones conv4@16   # seconds
    python benchmarks/meta_train_speed.py --backbones conv4@84 --amp off --fold-bn off on
    python benchmarks/meta_train_speed.py --device cuda --backbones resnet12@84 --full

Rows "SS fwd+bwd only", "meta-train" and "meta-batch" of ``benchmarks/RESULTS.md``.
Options: see ``timing.py`` (shared by all speed benchmarks).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from timing import PeakMemory, Setup, count_flops, emit, run, timed

from metatransfer.data.episodes import EpisodeSampler
from metatransfer.data.transforms import gather_uint8
from metatransfer.learners import adapt, linear_logits
from metatransfer.models.fold import folded_bn
from metatransfer.phases.common import autocast
from metatransfer.phases.meta_train import MetaLearner, meta_step


def meta_setup(bench: Setup, shots: int, first_order: bool, meta_batch: int,
               ht: str = "off"):
    """A meta-learner, its sampler and one training step ``step(i)`` (meta-batch ``i``)."""
    cfg = copy.deepcopy(bench.cfg)
    mc = cfg.meta
    mc.shots, mc.queries, mc.first_order = shots, bench.args.queries, first_order
    mc.inner_steps, mc.meta_batch, mc.ht = bench.args.inner_steps, meta_batch, ht
    mc.ht_tasks = 1
    learner = MetaLearner(bench.new_backbone(), mc.ways, "kernel", "all", False)
    learner = learner.to(bench.device)
    learner.backbone = bench.maybe_compile(learner.backbone)
    optimizer = torch.optim.Adam([
        {"params": learner.ss_params, "lr": mc.lr_ss},
        {"params": [learner.weight0, learner.bias0], "lr": mc.lr_head}])
    sampler = EpisodeSampler(bench.split.indices_by_class, mc.ways, shots, mc.queries, 0)
    learner.train(mc.bn_mode == "train")

    def step(i: int) -> None:
        loss, _ = meta_step(learner, bench.split, sampler, i, cfg, bench.normalizer,
                            bench.device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return learner, sampler, step


def ss_flops_per_image(bench: Setup) -> float:
    learner = MetaLearner(bench.new_backbone(), 5, "kernel", "all", False).to(bench.device)
    learner.eval()
    x = torch.zeros(2, 3, bench.size, bench.size, device=bench.device)
    return count_flops(lambda: learner.backbone(x).sum().backward()) / 2


def inner_loop(bench: Setup, shots: int, first_order: bool, tasks: int = 1):
    """The base learner alone on random features: the inner loop from θ_0 and the query
    loss's backward (second order unless ``first_order``), as a closure."""
    d, ways, q, dev = bench.out_dim, 5, bench.args.queries, bench.device
    feats = torch.randn(tasks, ways * (shots + q), d, device=dev, requires_grad=True)
    w0 = torch.zeros(ways, d, device=dev, requires_grad=True)
    b0 = torch.zeros(ways, device=dev, requires_grad=True)
    labels = torch.arange(ways, device=dev).repeat_interleave(shots).expand(tasks, -1)
    qlabels = torch.arange(ways, device=dev).repeat_interleave(q)

    def inner() -> None:
        w, b = adapt(w0, b0, feats[:, :ways * shots], labels, ways,
                     bench.args.inner_steps, 0.01, first_order)
        logits = linear_logits(w, b, feats[:, ways * shots:])
        F.cross_entropy(logits.reshape(-1, ways), qlabels.repeat(tasks)).backward()

    return inner


def meta_train(bench: Setup) -> None:
    args, device = bench.args, bench.device
    ss_flops = ss_flops_per_image(bench)
    shots_list = [1, 5] if (args.full or not bench.heavy) else [1]
    orders = [False, True] if (args.full or not bench.heavy) else [False]
    iters = 1 if bench.heavy and not args.full else args.iters
    warmup = 0 if bench.heavy else args.warmup
    for shots in shots_list:
        images = 5 * (shots + args.queries)
        # reference: one SS-backbone forward+backward of the episode's images
        learner, sampler, _ = meta_setup(bench, shots, False, 1)
        batch = sampler.episode(0)
        idx = np.concatenate([batch.support.ravel(), batch.query.ravel()])
        pixels = bench.normalizer(gather_uint8(bench.split, idx, device))

        def ref(_: int, learner=learner, pixels=pixels) -> None:
            with autocast(bench.amp, device), folded_bn(learner.backbone, bench.cfg.fold_bn):
                feats = learner.backbone(pixels)
            feats.float().sum().backward()

        ref_s, _ = timed(ref, iters, warmup, device)
        emit({**bench.base, "measure": "meta_backbone_fwd_bwd", "shots": shots,
              "images": images, "step_s": round(ref_s, 4),
              **bench.rate(ss_flops * images, ref_s)})
        del learner
        for first_order in orders:
            learner, _, step = meta_setup(bench, shots, first_order, 1)
            loop = inner_loop(bench, shots, first_order)
            inner = count_flops(loop)
            loop_s, _ = timed(lambda _, loop=loop: loop(), args.iters, args.warmup, device)
            with PeakMemory(device) as mem:
                seconds, syncs = timed(step, iters, warmup, device,
                                       sync_check=device.type == "cuda")
            emit({**bench.base, "measure": "meta_train", "shots": shots, "queries":
                  args.queries, "inner_steps": args.inner_steps,
                  "order": "first" if first_order else "second",
                  "episodes_per_s": round(1 / seconds, 3), "step_s": round(seconds, 4),
                  "overhead_vs_backbone": round(seconds / ref_s - 1, 3),
                  "inner_loop_gflop": round(inner / 1e9, 4), "inner_loop_s": round(loop_s, 5),
                  **bench.rate(ss_flops * images + inner, seconds),
                  "peak_mib": round(mem.mib, 1),
                  "host_syncs_per_step": syncs / iters if device.type == "cuda" else None})
            del learner


def meta_batch(bench: Setup, k: int) -> None:
    """k tasks through one backbone pass and one batched inner loop, vs k separate."""
    args, device = bench.args, bench.device
    _, _, together = meta_setup(bench, 1, False, k)
    _, _, single = meta_setup(bench, 1, False, 1)
    t_k, t_1 = float("inf"), float("inf")
    for i in range(max(args.iters, 2)):  # interleaved, so load drift hits both alike
        t_k = min(t_k, timed(lambda _, i=i: together(i), 1, args.warmup if i == 0 else 0,
                             device)[0])
        t_1 = min(t_1, timed(lambda _, i=i: [single(i * k + j) for j in range(k)], 1,
                             args.warmup if i == 0 else 0, device)[0])
    emit({**bench.base, "measure": "meta_batch", "k": k, "shots": 1,
          "batched_tasks_per_s": round(k / t_k, 2), "separate_tasks_per_s":
          round(k / t_1, 2), "speedup": round(t_1 / t_k, 2)})


def hard_task_cost(bench: Setup) -> None:
    """A meta-batch of 2 tasks + 1 hard task, 1-shot: hard tasks off, resampled (a second
    backbone pass on fresh images), and reused with their features taken from the
    meta-batch's pass (the default for ``ht=reuse``) or embedded again (as before)."""
    from metatransfer.phases import meta_train as phase

    args, device = bench.args, bench.device
    always = phase.reuses_features
    times = {}
    for name, ht, reuse in (("off", "off", None), ("resample", "resample", None),
                            ("reuse-embedded-again", "reuse", False),
                            ("reuse", "reuse", True)):
        if reuse is not None:
            phase.reuses_features = lambda *_, reuse=reuse: reuse
        try:
            _, _, step = meta_setup(bench, 1, True, 2, ht)
            times[name], _ = timed(step, args.iters, args.warmup, device)
        finally:
            phase.reuses_features = always
        emit({**bench.base, "measure": "meta_batch_ht", "ht": name, "meta_batch": 2,
              "hard_tasks": 0 if ht == "off" else 1, "shots": 1, "order": "first",
              "step_s": round(times[name], 4)})
    emit({**bench.base, "measure": "ht_reuse_saving",
          "reuse_vs_embedded_again": round(times["reuse-embedded-again"] / times["reuse"], 3),
          "resample_vs_off": round(times["resample"] / times["off"], 3),
          "reuse_vs_off": round(times["reuse"] / times["off"], 3)})


def measure(bench: Setup) -> None:
    if "meta" not in bench.args.skip:
        meta_train(bench)
    if "hardtasks" not in bench.args.skip:
        hard_task_cost(bench)
    if "metabatch" not in bench.args.skip and (not bench.heavy or bench.args.full):
        meta_batch(bench, bench.args.meta_batch_k)


def main(argv: list[str] | None = None) -> None:
    run(measure, __doc__, argv)


if __name__ == "__main__":
    main()
