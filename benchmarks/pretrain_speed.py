"""Pre-training speed, per backbone: images/s of the ``phases.pretrain`` step (augment,
forward, cross-entropy, backward, SGD) on synthetic images, with its FLOP rate as a
fraction of the peak kernel rate, peak memory and (CUDA) host syncs per step; then the
data pipeline alone (uint8 gather + augmentation + normalisation) against that rate.

    python benchmarks/pretrain_speed.py                       # CPU default
    python benchmarks/pretrain_speed.py --quick --backbones conv4@16   # seconds (smoke test)
    python benchmarks/pretrain_speed.py --device cuda --backbones resnet12@84 --compile

Rows "pre-train" and "data pipeline" of ``benchmarks/RESULTS.md``. Options: see
``timing.py`` (shared by all speed benchmarks).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from timing import PeakMemory, Setup, count_flops, emit, run, timed
from torch import nn

from metatransfer.data.transforms import augment_batch, augmentation, gather_uint8
from metatransfer.phases.common import Float32, autocast


def pretrain(bench: Setup) -> float:
    """The body of ``phases.pretrain``'s step loop, on synthetic images."""
    args, device, split = bench.args, bench.device, bench.split
    batch = args.batch or (128 if device.type == "cuda" else (8 if bench.heavy else 64))
    backbone = bench.new_backbone()
    head = Float32(nn.Linear(backbone.out_dim, split.num_classes).to(device))  # as the phase
    model_fwd = bench.maybe_compile(backbone)
    pc = bench.cfg.pretrain
    optimizer = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=pc.lr,
                                momentum=pc.momentum, nesterov=True,
                                weight_decay=pc.weight_decay)
    transform = augmentation("standard", split.image_size, split.channels)
    rng = np.random.default_rng(0)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)

    def step(_: int) -> None:
        nonlocal loss_sum, correct
        backbone.train()
        indices = rng.choice(len(split), batch, replace=False)
        labels = torch.as_tensor(split.labels[indices], device=device)
        images = augment_batch(gather_uint8(split, indices, device), transform)
        images = bench.normalizer(images)
        with autocast(bench.amp, device):
            logits = head(model_fwd(images))
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * batch
        correct += (logits.argmax(1) == labels).sum()

    def flop_step() -> None:
        x = torch.zeros(2, 3, bench.size, bench.size, device=device)
        backbone.train()
        F.cross_entropy(head(backbone(x)), torch.zeros(2, dtype=torch.long,
                                                       device=device)).backward()

    train_flops = count_flops(flop_step) / 2
    optimizer.zero_grad(set_to_none=True)
    warmup = 0 if bench.heavy else args.warmup
    with PeakMemory(device) as mem:
        seconds, syncs = timed(step, args.iters, max(warmup, 1), device,
                               sync_check=device.type == "cuda")
    ips = batch / seconds
    emit({**bench.base, "measure": "pretrain", "batch": batch, "images_per_s": round(ips, 2),
          "step_s": round(seconds, 4), "train_gflop_per_image": round(train_flops / 1e9, 4),
          **bench.rate(train_flops * batch, seconds), "peak_mib": round(mem.mib, 1),
          "host_syncs_per_step": syncs / args.iters if device.type == "cuda" else None})
    return ips


def data(bench: Setup, train_ips: float) -> None:
    """uint8 gather + augmentation + normalisation alone (``data/transforms.py``)."""
    split, device = bench.split, bench.device
    batch = 128
    transform = augmentation("standard", split.image_size, split.channels)
    rng = np.random.default_rng(1)

    def step(_: int) -> None:
        indices = rng.choice(len(split), batch, replace=False)
        bench.normalizer(augment_batch(gather_uint8(split, indices, device), transform))

    seconds, _ = timed(step, max(bench.args.iters, 3), 1, device)
    ips = batch / seconds
    emit({**bench.base, "measure": "data_pipeline", "batch": batch,
          "images_per_s": round(ips, 1), "vs_pretrain": round(ips / train_ips, 1)})


def measure(bench: Setup) -> None:
    if "pretrain" in bench.args.skip:
        return
    ips = pretrain(bench)
    if "data" not in bench.args.skip:
        data(bench, ips)


def main(argv: list[str] | None = None) -> None:
    run(measure, __doc__, argv)


if __name__ == "__main__":
    main()
