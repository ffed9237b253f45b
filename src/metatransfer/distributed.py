"""Data-parallel runs under ``torchrun``: process group, rank helpers and the few collectives
the phases need.

Launched by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``), :func:`init_from_env` joins the process group — NCCL
when the run uses CUDA, gloo on CPU — and gives each process ``cuda:LOCAL_RANK``. Without
torchrun (or with one process) every helper here is a cheap no-op, so the phases run the
same code either way.

The phases keep the maths of a single process: sizes in the config (``pretrain.batch_size``,
``meta.meta_batch``, ``eval.episodes``) are *global*; each rank takes its share, and sums
(not means) are all-reduced so that N ranks compute what one process would.

Only rank 0 writes (``RunDir(is_main=...)``). Checkpoints passed between phases are read
by every rank from the run directory, so on several nodes ``--out`` must lie on storage
all nodes see.
"""

from __future__ import annotations

import datetime
import inspect
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .devices import resolve_device
from .errors import ConfigError

log = logging.getLogger(__name__)


def collective_timeout() -> datetime.timedelta:
    """How long a collective may wait: ``$METATRANSFER_DIST_TIMEOUT_MIN`` minutes (60).

    First-time dataset decoding happens between collectives (local rank 0 decodes while
    the others wait at a barrier), so it must outlast that; NCCL's default is 10 minutes.
    """
    raw = os.environ.get("METATRANSFER_DIST_TIMEOUT_MIN", "60")
    try:
        minutes = float(raw)
    except ValueError:
        minutes = -1.0
    if not minutes > 0:
        raise ConfigError(f"METATRANSFER_DIST_TIMEOUT_MIN must be a positive number of "
                          f"minutes, got {raw!r}")
    return datetime.timedelta(minutes=minutes)


def launched_by_torchrun() -> bool:
    """True when the torchrun environment asks for more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def is_main() -> bool:
    """Rank 0: the only process that writes files, logs metrics and shows progress."""
    return rank() == 0


def init_from_env(device: str = "auto") -> torch.device:
    """Join the torchrun process group when launched by torchrun; return this rank's device.

    ``device`` is the config's ``device`` (``auto | cpu | cuda | cuda:N``). Under torchrun,
    ``auto``/``cuda`` mean ``cuda:LOCAL_RANK``; an explicit ``cuda:N`` would put several
    ranks on one GPU and is refused.
    """
    if not launched_by_torchrun():
        return resolve_device(device)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    wanted = resolve_device(device)
    if wanted.type == "cuda":
        if ":" in device:
            raise ConfigError(f"device '{device}' under torchrun: every process would use the "
                              "same GPU; set device=cuda (each process takes cuda:LOCAL_RANK)")
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs "
                              "visible; lower --nproc_per_node")
        wanted = torch.device("cuda", local)
        torch.cuda.set_device(wanted)
    if not dist.is_initialized():
        backend = "nccl" if wanted.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend, "timeout": collective_timeout()}
        if backend == "nccl":
            kwargs["device_id"] = wanted  # binds the communicator, avoids a lazy guess
        dist.init_process_group(**kwargs)
        log.debug("rank %d/%d joined (%s, %s)", dist.get_rank(), dist.get_world_size(),
                  backend, wanted)
    return wanted


def shutdown() -> None:
    """Leave the process group (safe to call when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective failing because another rank died mid-run.

    gloo raises a plain RuntimeError ("Connection reset by peer"), NCCL a DistError; the
    CLI reports either as one line, since the dead rank has printed its own error.
    """
    if not is_distributed() or not isinstance(exc, RuntimeError):
        return False
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return any(s in text for s in ("gloo", "Connection reset", "Connection closed", "NCCL"))


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@contextmanager
def local_main_first() -> Iterator[None]:
    """Run the body on each node's local rank 0 first, then on the other local ranks.

    For work that fills a per-machine cache (dataset decoding): one process decodes, the
    others then read the cache instead of decoding the same images in parallel.
    """
    first = local_rank() == 0
    if not first:
        barrier()
    try:
        yield
    finally:
        if first:
            barrier()


def shard(items: np.ndarray | int, rank_: int | None = None, world: int | None = None):
    """This rank's share ``items[rank::world]`` (of ``arange(items)`` for an int)."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    items = np.arange(items) if isinstance(items, int) else items
    return items[rank_::world]


def own_rng_stream(*parts: int) -> None:
    """Give ranks other than 0 their own torch RNG stream (augmentation), from ``parts``.

    Phases seed the global RNGs identically on every rank; without this every rank would
    draw the same crop and jitter parameters. Rank 0 keeps the single-process stream.
    """
    if rank() > 0:
        seq = np.random.SeedSequence([*(int(p) for p in parts), rank()])
        torch.manual_seed(int(seq.generate_state(1, np.uint64)[0] % 2**63))


def _comm_device() -> torch.device:
    """Where collective buffers live: the current GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks (returns a new tensor on ``tensor``'s device)."""
    if not is_distributed():
        return tensor
    buffer = tensor.detach().to(_comm_device(), copy=True)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.to(tensor.device)


def sum_floats(*values: float) -> list[float]:
    """Sum a few Python numbers over ranks in one collective (float64)."""
    if not is_distributed():
        return [float(v) for v in values]
    out = all_reduce_sum(torch.tensor([float(v) for v in values], dtype=torch.float64))
    return [float(v) for v in out.cpu()]


def all_reduce_grads(params: Iterable[nn.Parameter]) -> None:
    """Sum gradients over ranks in place, in one flat buffer (a missing grad counts as 0).

    Each rank's loss is its share of the global loss (its tasks' losses divided by the
    global task count), so the sum is exactly the single-process gradient.
    """
    if not is_distributed():
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    flat = all_reduce_sum(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def gather_by_index(ids: np.ndarray, values: np.ndarray, count: int) -> np.ndarray:
    """Assemble a ``(count,)`` float64 array from every rank's ``values`` at ``ids``.

    Ranks own disjoint ids; the others' slots are zero, so a sum is an exact gather
    (also for uneven shares, which ``all_gather`` does not take).
    """
    full = np.zeros(count, dtype=np.float64)
    full[np.asarray(ids, dtype=np.int64)] = values
    if not is_distributed():
        return full
    return all_reduce_sum(torch.from_numpy(full)).cpu().numpy()


def average_buffers(module: nn.Module) -> None:
    """Average floating-point buffers (BN running statistics) over ranks.

    With plain DDP each rank's BatchNorm sees only its share of a batch, so running
    statistics drift apart; averaging them keeps every rank's model identical for
    validation and checkpoints.
    """
    if not is_distributed():
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = all_reduce_sum(torch.cat([b.detach().reshape(-1) for b in buffers]))
    flat /= world_size()
    offset = 0
    for b in buffers:
        n = b.numel()
        b.copy_(flat[offset:offset + n].view_as(b))
        offset += n


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (e.g. the resume state only rank 0 read)."""
    if not is_distributed():
        return obj
    holder = [obj if rank() == src else None]
    dist.broadcast_object_list(holder, src=src, device=_comm_device())
    return holder[0]


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel when distributed, else unchanged.

    Buffers are not broadcast at every step (``average_buffers`` syncs them per epoch).
    """
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # newer PyTorch renamed the option (the old name warns); both keep buffers rank-local
    options = inspect.signature(DistributedDataParallel).parameters
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in options
               else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=ids, **no_sync)
