"""Run directories: resolved config, metrics, TensorBoard, training state and resume.

Layout of a run directory::

    config.yaml            the resolved config of the run
    environment.json       package/torch versions, git commit, device
    metrics.jsonl          one JSON object per logged event
    tb/                    TensorBoard events
    pretrain_best.safetensors, meta_best.safetensors   model checkpoints (portable)
    state/<phase>.pt       training state for resume (+ <phase>.prev.pt, the one before)
    results.json, results.md   results (deterministic: byte-identical for a seed on CPU)
    timing.json            wall-clock figures, kept out of results.json

Training state is one self-checking file (magic, SHA-256 of the payload, payload), written
completely to a temp file and fsynced before the previous state is rotated to
``<phase>.prev.pt`` and the new one renamed into place: a kill at any instant leaves at
least one complete state, and a truncated or corrupt one falls back to the previous good
one with a warning. The training loop (:mod:`metatransfer.training`) saves at step
boundaries only (SIGINT/SIGTERM are deferred to the end of the current step), so a resumed
run is bit-identical to an uninterrupted one on CPU.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import platform
import random
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, distributed
from .config import CONFIG_NAME, RunConfig, eval_split, save_config
from .devices import autocast_enabled, native_bf16, precision
from .errors import CheckpointError, DataError

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch global RNGs (local generators are seeded separately)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_phase(seed: int, phase: str) -> None:
    """Seed the global RNGs for the fresh start of ``phase`` from ``(seed, phase)`` only.

    A phase then draws the same random numbers whether the phases before it ran in this
    process or finished in an earlier (interrupted) one. Under torchrun each rank gets
    its own stream.
    """
    rank = distributed.rank()  # each process keeps its own stream (as cli.start seeds)
    digest = hashlib.sha256(f"{seed}:{phase}:{rank}".encode()).digest()
    seed_everything(int.from_bytes(digest[:8], "little") % 2**63)


def rng_state() -> dict:
    """Python, numpy, torch and CUDA RNG states, as types ``torch.load(weights_only=True)``
    accepts (the numpy key array is stored as a tensor)."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    npst = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": npst["key"].numpy().astype(np.uint32),
                                   "pos": npst["pos"]},
                         "has_gauss": npst["has_gauss"], "gauss": npst["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- preflight


PHASES = ("pretrain", "meta", "test")


def preflight(cfg: RunConfig, phases: tuple[str, ...] = PHASES,
              checkpoint: Path | None = None) -> None:
    """Check the data of ``phases`` (all three: ``mtl run``) before anything is written or
    trained: every split they read loads (a missing root or split fails in seconds, with
    nothing left on disk) and every episode shape fits, so a bad ``ways``/``shots``/
    ``queries`` fails now, not after pre-training. ``checkpoint``: the model whose
    preprocessing the splits are decoded with (meta-train from a pre-trained model,
    meta-test), so the decoded splits are the ones the phase then reads from the cache."""
    from .data.training import evaluation_split, training_splits

    dc, pc, mc, ec = run_data_config(cfg, checkpoint), cfg.pretrain, cfg.meta, cfg.eval
    if "pretrain" in phases:
        _, selection = training_splits(dc, "pretrain")  # enough classes left to pre-train
        selection.require(pc.val_ways, pc.val_shots + pc.val_queries,
                          "pre-training validation episodes")
    if "meta" in phases:
        train, selection = training_splits(dc, "meta")  # the classes meta-training draws
        selection.require(mc.ways, mc.shots + mc.queries, "meta-training validation episodes")
        enough = int((train.class_sizes >= mc.shots + mc.queries).sum())
        if enough < mc.ways:
            raise DataError(f"{train.name}: meta-training episodes need {mc.ways} classes with "
                            f"{mc.shots + mc.queries} images (shots + queries), but only "
                            f"{enough} of the {train.num_classes} classes meta-training draws "
                            "from have that many; lower meta.ways, shots or queries, or raise "
                            "data.meta_holdout")
    if "test" in phases:
        test = evaluation_split(dc, eval_split(cfg))
        for ways in ec.ways:
            for shots in ec.shots:
                test.require(ways, shots + ec.queries, f"{ways}-way {shots}-shot test episodes")


def run_data_config(cfg: RunConfig, checkpoint: Path | None = None):
    """``cfg.data`` as the run decodes its images: with the preprocessing of
    ``checkpoint`` (meta-train from a pre-trained model, meta-test) or of the network the
    run starts from (``pretrain.init``), else as configured."""
    from .preprocessing import checkpoint_preprocessing, for_checkpoint

    if checkpoint is not None:
        return checkpoint_preprocessing(cfg.data, checkpoint, quiet=True)[0]
    if cfg.pretrain.init:  # every phase of the run reads images as the network it starts from
        from .importers_timm import external_info

        return for_checkpoint(cfg.data, external_info(cfg.pretrain.init), quiet=True)[0]
    return cfg.data


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


_STATE_MAGIC = b"MTLSTATE\x01\n"
_DIGEST = 32


def _read_state(path: Path) -> dict:
    """Load a state file written by :meth:`RunDir.save_state`, verifying its checksum."""
    data = path.read_bytes()
    head = len(_STATE_MAGIC) + _DIGEST
    if len(data) < head or not data.startswith(_STATE_MAGIC):
        raise CheckpointError(f"{path} is truncated or not a training state ({len(data)} bytes)")
    payload = data[head:]
    if hashlib.sha256(payload).digest() != data[len(_STATE_MAGIC):head]:
        raise CheckpointError(f"{path} fails its checksum (truncated or corrupt)")
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # a checksummed file that still won't load: other version
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(f"{path} cannot be loaded ({reason})") from None


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class RunDir:
    """One run's directory; only the main process (rank 0) writes to it."""

    def __init__(self, path: str | Path, is_main: bool = True) -> None:
        self.path = Path(path)
        self.is_main = is_main
        self._writer = None
        if is_main:
            self.path.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------- records
    def write_config(self, cfg: RunConfig, device: torch.device, world_size: int = 1,
                     amp_reason: str = "") -> None:
        if not self.is_main:
            return
        save_config(cfg, self.path / CONFIG_NAME)
        env = {
            "metatransfer": __version__,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "world_size": world_size,
            "git_commit": git_commit(),
            "torch_threads": torch.get_num_threads(),
            "amp": cfg.amp,
            "precision": precision(autocast_enabled(cfg.amp, device)),
            "precision_reason": amp_reason or f"amp={cfg.amp}",
            "cpu_bf16_native": native_bf16(torch.device("cpu")),
        }
        (self.path / "environment.json").write_text(json.dumps(env, indent=2))

    def log(self, phase: str, step: int, **values: Any) -> None:
        """Append a metrics record and mirror numeric values to TensorBoard."""
        if not self.is_main:
            return
        record = {"phase": phase, "step": step, "time": round(time.time(), 3), **values}
        with open(self.path / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        writer = self.tensorboard()
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(f"{phase}/{key}", value, step)

    def tensorboard(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.path / "tb"))
        return self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def metrics(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    # ------------------------------------------------------------- training state
    def state_path(self, phase: str) -> Path:
        return self.path / "state" / f"{phase}.pt"

    def prev_path(self, phase: str) -> Path:
        return self.path / "state" / f"{phase}.prev.pt"

    def save_state(self, phase: str, state: dict) -> None:
        """Write the resume state; the one before is kept as ``<phase>.prev.pt``.

        Order matters: the new file is complete and fsynced before anything is renamed,
        then current -> prev and temp -> current (each rename atomic). Killed at any
        instant, the folder holds a complete current or prev state.
        """
        if not self.is_main:
            return
        buffer = io.BytesIO()
        torch.save(state, buffer)
        payload = buffer.getvalue()
        path, prev = self.state_path(phase), self.prev_path(phase)
        path.parent.mkdir(exist_ok=True)  # made by the first save: evaluations have none
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(_STATE_MAGIC + hashlib.sha256(payload).digest() + payload)
                fh.flush()
                os.fsync(fh.fileno())
            if path.is_file():
                os.replace(path, prev)
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def load_state(self, phase: str) -> dict | None:
        """The latest good resume state of ``phase``, or None when there is none.

        A damaged latest state (truncated, checksum mismatch, unreadable) falls back to the
        previous one with a warning; with neither usable, a :class:`CheckpointError`.
        """
        path, prev = self.state_path(phase), self.prev_path(phase)
        if self.is_main:  # temp files of a save that was killed half-way
            for stale in path.parent.glob(f".{path.name}.*.tmp"):
                stale.unlink(missing_ok=True)
        problems = []
        if not path.is_file() and prev.is_file():
            problems.append(f"{path} is missing (interrupted while saving?)")
        for state_file in (path, prev):
            if not state_file.is_file():
                continue
            try:
                state = _read_state(state_file)
            except CheckpointError as exc:
                problems.append(str(exc))
                continue
            for problem in problems:
                log.warning("%s; resuming from the previous checkpoint %s", problem, state_file)
            return state
        if problems:
            raise CheckpointError(f"no usable checkpoint for {phase}: {'; '.join(problems)}; "
                                  f"delete {path.parent} to start the phase over")
        return None

    def phase_done(self, phase: str) -> bool:
        state = self.load_state(phase)
        return bool(state and state.get("done"))
