"""The training loop both phases drive, and the safety machinery around it.

A phase (pre-training, meta-training) builds its networks, optimizer and scheduler, then
hands :class:`TrainingLoop` what the phase is (a :class:`LoopPhase`) and its functions:
what one step computes (a :class:`Step`: the loss share of this process and the phase's
:class:`EpochSums`, which the loop adds up over the epoch) and how the phase is validated.
The loop does the rest, identically for both:

* resume: the state file (``state/<phase>.pt``, see :class:`~metatransfer.runs.RunDir`)
  holds the modules, optimizer, scheduler, epoch, step in the epoch, best validation
  accuracy, every RNG and the epoch's running sums, so a run resumed at any step is
  bit-identical on CPU to one never interrupted;
* the checkpoint schedule (``checkpoint_every_steps``, ``checkpoint_minutes``) and the
  stop request (SIGINT/SIGTERM honoured at the next step boundary, :class:`StopRequest`);
* the NaN/Inf policy (:class:`FiniteGuard`: ``stop`` the phase or ``skip`` the batch) and
  optional gradient clipping;
* gradients over processes under torchrun (DDP, or one all-reduce of the shares);
* per-epoch validation, keeping the best model, metrics records and progress bars.

Step boundaries are the only points where state is saved, and the loop draws no random
numbers itself: the random stream of a run is the phases' alone.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .config import RunConfig
from .errors import CheckpointError, MTLError
from .runs import RunDir, rng_state, set_rng_state

log = logging.getLogger(__name__)


def progress(iterable, enabled: bool = True, **kwargs):
    """tqdm on stderr, quiet when not the main process."""
    return tqdm(iterable, disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                mininterval=1.0, **kwargs)


# ----------------------------------------------------------------------------- interrupts


class StopRequest:
    """SIGINT/SIGTERM during a phase's training loop, honoured at the next step boundary.

    Saving in the middle of ``optimizer.step()`` (or after the next batch's augmentation
    drew random numbers) would record a state no uninterrupted run passes through, so the
    first signal only sets :attr:`requested`; the loop saves after the current step and
    raises ``KeyboardInterrupt``. A second signal raises at once (the last checkpoint
    stands). Outside the armed loop, and off the main thread, signals act as before.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict = {}

    def arm(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread() and not self._previous:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        log.warning("%s received: saving at the end of this step (send it again to stop "
                    "without saving)", self.requested)

    def disarm(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


_STOPS: list[StopRequest] = []


def interruptible(fn):
    """Decorator: gives ``fn`` a :class:`StopRequest` (see :func:`stop_request`) and
    restores the signal handlers however it ends."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _STOPS.append(StopRequest())
        try:
            return fn(*args, **kwargs)
        finally:
            _STOPS.pop().disarm()

    return wrapper


def stop_request() -> StopRequest:
    """The armed :class:`StopRequest` of the running loop (inert outside one)."""
    return (_STOPS[-1] if _STOPS else StopRequest()).arm()


class CheckpointSchedule:
    """When to save mid-phase: every ``every_steps`` steps and/or every ``minutes``."""

    def __init__(self, every_steps: int, minutes: float) -> None:
        self.every_steps, self.seconds = every_steps, minutes * 60
        self.last = time.monotonic()

    def due(self, global_step: int) -> bool:
        if self.every_steps > 0 and global_step % self.every_steps == 0:
            return True
        return self.seconds > 0 and time.monotonic() - self.last > self.seconds

    def saved(self) -> None:
        self.last = time.monotonic()


# ----------------------------------------------------------------------------- NaN/Inf


class FiniteGuard:
    """Non-finite losses (or gradient norms): ``stop`` the phase or ``skip`` the batch.

    ``stop`` keeps a flag on the device (the first bad step, via ``torch.where``) and reads
    it only at :meth:`check`, called before every checkpoint and at epoch end, so there is
    no extra host sync per step and nothing non-finite is ever saved. ``skip`` must know
    *before* ``optimizer.step()`` (momentum and Adam would move the parameters even on a
    zeroed gradient), so it pays one host sync per step, only when chosen.
    """

    def __init__(self, policy: str, phase: str, device: torch.device, hint: str) -> None:
        self.policy, self.phase, self.hint = policy, phase, hint
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.skipped = 0  # batches skipped in this process's current epoch
        self._buffers: list[tuple[torch.Tensor, torch.Tensor]] = []

    def protect(self, *modules: nn.Module) -> None:
        """Under ``skip``, call before the forward pass: a skipped batch then also leaves
        the buffers it updated (BatchNorm running statistics) as they were."""
        if self.policy == "skip":
            self._buffers = [(b, b.detach().clone()) for m in modules for b in m.buffers()]

    def allow(self, loss: torch.Tensor, step: int, grad_norm: torch.Tensor | None = None) -> bool:
        """Whether to apply this step's update (``step``: 1-based global step)."""
        bad = ~torch.isfinite(loss.detach())
        if grad_norm is not None:
            bad = bad | ~torch.isfinite(grad_norm.detach())
        if self.policy == "skip":
            if distributed.all_reduce_sum(bad.int()) > 0:  # every rank skips the same steps
                with torch.no_grad():
                    for buffer, saved in self._buffers:
                        buffer.copy_(saved)
                self.skipped += 1
                log.warning("%s: non-finite loss at step %d, batch skipped", self.phase, step)
                return False
            return True
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)
        return True

    def check(self) -> None:
        """Raise (naming the first bad step) if a non-finite loss was seen; a host sync."""
        first = int(self.first_bad)
        if first >= 0:
            raise MTLError(f"{self.phase}: the loss became NaN/Inf at step {first}; {self.hint} "
                           f"(the last good checkpoint in state/ is kept; continue with "
                           f"--resume and changed settings, or set nan_policy=skip)")


def needs_grad_norm(policy: str, clip: float) -> bool:
    return policy == "skip" or clip > 0


def clip_and_norm(params, clip: float) -> torch.Tensor:
    """Total gradient norm (a device tensor), clipping to ``clip`` when it is positive."""
    params = [p for p in params if p.grad is not None]
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, clip)
    return torch.nn.utils.get_total_norm([p.grad for p in params])


# ----------------------------------------------------------------------------- the loop


@dataclass
class EpochSums:
    """Base of a phase's running sums over an epoch: a dataclass of numbers (device scalars
    or ints) whose fields default to 0. Each applied step's sums are added to the epoch's
    field by field; a fresh instance is the zero they start from."""

    def __add__(self, other: EpochSums) -> EpochSums:
        return type(self)(**{f.name: getattr(self, f.name) + getattr(other, f.name)
                             for f in fields(self)})

    def state(self) -> dict:
        """The sums as a plain dict, for the resume state."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state(cls, saved: dict, device: torch.device) -> EpochSums:
        missing = [f.name for f in fields(cls) if f.name not in saved]
        if missing:
            raise CheckpointError(f"the saved mid-epoch state has no running sum "
                                  f"'{missing[0]}' (written by another version); delete the "
                                  "run's state/ folder to start the phase over")
        return cls(**{f.name: _to(saved[f.name], device) for f in fields(cls)})


def _to(value, device: torch.device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


@dataclass
class Step:
    """What one training step of a phase computed.

    ``loss``: this process's share of the batch's loss (the shares sum to the loss of the
    whole batch), the tensor the loop back-propagates and the NaN guard checks.
    ``sums``: added to the epoch's running sums when the step is applied (not when it is
    skipped).
    """

    loss: torch.Tensor
    sums: EpochSums


@dataclass(frozen=True)
class LoopPhase:
    """What the loop needs to know of the phase it runs, besides its step and validation."""

    name: str  # the state file (state/<name>.pt) and the metrics records
    title: str  # the phase in messages, e.g. "pre-training"
    best: str  # file name of the best model in the run directory
    epochs: int
    grad_clip: float  # max gradient norm; 0 = off
    nan_hint: str  # what to change when the loss goes NaN
    val_setting: str  # the validation episodes in the log, e.g. "5-way 1-shot"
    sums: type[EpochSums]  # what the phase's steps sum over an epoch
    label: str = ""  # in progress bars and epoch logs (default: name)
    # a fresh run first validates the model it starts from (logged as epoch 0), which stays
    # the best unless an epoch beats it; meta-training uses it so that SS which only hurts
    # new classes is never selected over the pre-trained network
    validate_start: bool = False
    # with validate_start: also keep the best *trained* epoch under this file name, so what
    # the phase's training does is on record even when the starting model is selected
    best_trained: str = ""


@dataclass
class Selection:
    """Which epoch the loop kept (0 = the starting model) and its validation accuracy; the
    same for the best trained epoch (``epoch`` 0 of ``trained``: none validated yet)."""

    epoch: int = -1
    acc: float = -1.0
    trained_epoch: int = 0
    trained_acc: float = -1.0


class TrainingLoop:
    """Epochs of steps with resume, checkpoints, stop requests, NaN guard and validation.

    Use, in a phase::

        loop = TrainingLoop(LoopPhase("meta", "meta-training", ...), cfg, run, device)
        if loop.finished:
            return loop.best_path
        if not loop.resuming:
            seed_phase(cfg.seed, "meta")   # before building networks
        ...build networks, optimizer, scheduler...
        loop.restore({"learner": learner}, optimizer, scheduler)
        return loop.run(steps_per_epoch, step, validate, summary, save_best)

    Everything the loop needs besides the phase's functions is built here: the saved
    state, the NaN guard, the checkpoint schedule.
    """

    def __init__(self, phase: LoopPhase, cfg: RunConfig, run: RunDir, device: torch.device,
                 show: bool = True) -> None:
        self.phase, self.label = phase, phase.label or phase.name
        self.run_dir, self.device, self.show = run, device, show
        self.best_path = run.path / phase.best
        self.nan_policy = cfg.nan_policy
        self.guard = FiniteGuard(cfg.nan_policy, phase.title, device, phase.nan_hint)
        self.schedule = CheckpointSchedule(cfg.checkpoint_every_steps, cfg.checkpoint_minutes)
        self.state = distributed.broadcast_object(
            run.load_state(phase.name) if run.is_main else None)
        self.epoch, self.start_step = 0, 0
        self.selection = Selection()
        self._totals: dict | None = None
        self.modules: dict[str, nn.Module] = {}
        if self.finished:
            log.info("%s already complete in %s", phase.title, run.path)

    @property
    def best_acc(self) -> float:
        """Validation accuracy of the kept model (-1 before any validation)."""
        return self.selection.acc

    @property
    def finished(self) -> bool:
        """The phase completed in an earlier run."""
        return bool(self.state and self.state.get("done"))

    @property
    def resuming(self) -> bool:
        """A state was found: the phase continues where it stopped."""
        return bool(self.state)

    def restore(self, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
                scheduler, *, scheduler_per: str = "step", ddp: bool = False,
                average_buffers: bool = True, train_mode: bool = True) -> None:
        """What the loop trains and saves; when resuming, load it all from the state.

        ``modules``: saved under these keys; their parameters are what the optimizer steps
        and the gradients that are clipped and (without ``ddp``) summed over processes.
        ``scheduler_per``: ``step`` or ``epoch``. ``ddp``: the forward pass runs under
        DistributedDataParallel, which averages gradients over processes in backward.
        ``average_buffers``: average BatchNorm statistics over processes each epoch.
        ``train_mode``: the mode the modules train in (``False``: eval mode, so BatchNorm
        uses and keeps its running statistics).
        """
        self.modules, self.optimizer, self.scheduler = modules, optimizer, scheduler
        self.scheduler_per, self.ddp = scheduler_per, ddp
        self.average_buffers, self.train_mode = average_buffers, train_mode
        self.params = [p for m in modules.values() for p in m.parameters()]
        state = self.state
        if not state:
            return
        for key, module in modules.items():
            module.load_state_dict(state[key])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.start_step = state["epoch"], state["step"]
        # states written before the kept epoch was recorded hold only its accuracy
        self.selection = Selection(**state.get("selection", {"acc": state["best_acc"]}))
        set_rng_state(state["rng"])
        # running sums are rank 0's own: on several ranks a resumed epoch's train metrics
        # cover rank 0's share before the interruption (a logging detail only)
        self._totals = state.get("totals") if self.start_step and self.run_dir.is_main else None
        # logged by run(), which knows the epoch's length

    # ------------------------------------------------------------- running
    def _save(self, step_in_epoch: int, epoch: int, done: bool = False,
              totals: EpochSums | None = None) -> None:
        self.guard.check()  # never save a state that has seen a NaN/Inf loss
        running = {**totals.state(), "skipped": self.guard.skipped} if totals else {}
        self.run_dir.save_state(self.phase.name, {
            **{key: module.state_dict() for key, module in self.modules.items()},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "epoch": epoch, "step": step_in_epoch, "best_acc": self.best_acc, "rng": rng_state(),
            "selection": dataclasses.asdict(self.selection),
            "done": done, "totals": running,
        })
        self.schedule.saved()

    def _new_totals(self) -> EpochSums:
        """The epoch's running sums, from zero or from the state of a mid-epoch resume."""
        self.guard.skipped = 0
        if not self._totals:
            return self.phase.sums()
        totals = self.phase.sums.from_state(self._totals, self.device)
        self.guard.skipped = self._totals["skipped"]
        self._totals = None
        return totals

    def _backward(self, loss: torch.Tensor) -> None:
        """Gradients of the whole batch's loss: every process holds their sum."""
        if self.ddp:  # DDP averages over ranks: scale the share so the average is the sum
            (loss * distributed.world_size()).backward()
        else:
            loss.backward()
            distributed.all_reduce_grads(self.params)  # sum of the shares

    @interruptible
    def run(
        self,
        steps_per_epoch: int,
        step: Callable[[int, int], Step],
        validate: Callable[[], tuple[float, float]],
        summary: Callable[[EpochSums], dict],
        save_best: Callable[[Path], None],
    ) -> Path:
        """Train the remaining epochs; returns :attr:`best_path`.

        An epoch has ``steps_per_epoch`` steps; ``step(epoch, step_in_epoch)`` computes
        one step's :class:`Step`; ``validate()`` gives the validation accuracy and its 95%
        CI (percent); ``summary(totals)`` turns the epoch's running sums into the train
        metrics ``loss``, ``train_acc`` and any extra values (it may all-reduce: every
        process calls it); ``save_best(path)`` writes the best model to ``path`` (main process
        only; :attr:`selection` says which epoch it is).
        """
        phase, run, guard = self.phase, self.run_dir, self.guard
        want_norm = needs_grad_norm(self.nan_policy, phase.grad_clip)
        stop = stop_request()
        optimizer, per_step = self.optimizer, steps_per_epoch
        if self.resuming:
            if self.start_step >= per_step:  # stopped after an epoch's last step
                log.info("resuming %s after the last step of epoch %d: its validation is next",
                         phase.title, self.epoch + 1)
            else:
                log.info("resuming %s at epoch %d, step %d (1-based)",
                         phase.title, self.epoch + 1, self.start_step + 1)

        if phase.validate_start and not self.resuming and phase.epochs > 0:
            val_acc, val_ci = validate()
            self.selection.epoch, self.selection.acc = 0, val_acc
            if run.is_main:
                save_best(self.best_path)
            run.log(phase.name, 0, val_acc=val_acc, val_ci95=val_ci)
            log.info("%s epoch 0 (the starting model): val %s %.2f%% ± %.2f", self.label,
                     phase.val_setting, val_acc, val_ci)
        while self.epoch < phase.epochs:
            epoch = self.epoch
            for module in self.modules.values():
                module.train(self.train_mode)
            totals = self._new_totals()
            bar = progress(range(self.start_step, per_step), run.is_main and self.show,
                           desc=f"{self.label} {epoch + 1}/{phase.epochs}", leave=False)
            for i in bar:
                if self.train_mode:  # in eval mode nothing updates the buffers
                    guard.protect(*self.modules.values())
                result = step(epoch, i)
                optimizer.zero_grad(set_to_none=True)
                self._backward(result.loss)
                global_step = epoch * per_step + i + 1
                norm = clip_and_norm(self.params, phase.grad_clip) if want_norm else None
                if guard.allow(result.loss, global_step, norm):
                    optimizer.step()
                    totals = totals + result.sums
                if self.scheduler_per == "step":
                    self.scheduler.step()
                if stop.requested or self.schedule.due(global_step):
                    self._save(i + 1, epoch, totals=totals)
                if stop.requested:
                    raise KeyboardInterrupt
            self.start_step = 0
            guard.check()
            if self.scheduler_per == "epoch":
                self.scheduler.step()
            metrics = summary(totals)
            if self.average_buffers:  # BN statistics saw only this process's share
                for module in self.modules.values():
                    distributed.average_buffers(module)
            val_acc, val_ci = validate()
            self.epoch += 1
            improved = val_acc > self.best_acc
            if improved:
                self.selection.epoch, self.selection.acc = self.epoch, val_acc
                if run.is_main:
                    save_best(self.best_path)
            if phase.validate_start and phase.best_trained \
                    and val_acc > self.selection.trained_acc:
                self.selection.trained_epoch, self.selection.trained_acc = self.epoch, val_acc
                if run.is_main:
                    save_best(run.path / phase.best_trained)
            train_loss, train_acc = metrics.pop("loss"), metrics.pop("train_acc")
            if self.nan_policy == "skip":
                metrics["skipped_batches"] = guard.skipped
            run.log(phase.name, self.epoch, loss=train_loss, train_acc=train_acc,
                    val_acc=val_acc, val_ci95=val_ci, **metrics)
            log.info("%s epoch %d/%d: loss %.4f, val %s %.2f%% ± %.2f%s", self.label,
                     self.epoch, phase.epochs, train_loss, phase.val_setting, val_acc, val_ci,
                     " (best)" if improved else "")
            self._save(0, self.epoch, done=self.epoch >= phase.epochs)
            if stop.requested:
                raise KeyboardInterrupt
        if not self.best_path.is_file() and run.is_main:  # zero epochs: the initial model
            save_best(self.best_path)
        distributed.barrier()  # the other ranks read best_path next
        return self.best_path
