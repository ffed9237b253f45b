"""Run directories: resolved config, metrics, TensorBoard, training state and resume.

Layout of a run directory::

    config.yaml            the resolved config of the run
    environment.json       package/torch versions, git commit, device
    metrics.jsonl          one JSON object per logged event
    tb/                    TensorBoard events
    pretrain_best.safetensors, meta_best.safetensors   model checkpoints (portable)
    state/<phase>.pt       training state for resume (+ <phase>.prev.pt, the one before)
    results.json, results.md

Training state is written atomically (temp file, fsync, rename) with a SHA-256 of its
bytes beside it; a truncated or corrupt state falls back to the previous good one.
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
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .checkpoints import atomic_write
from .config import RunConfig, save_config
from .errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch global RNGs (local generators are seeded separately)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; an explicit CUDA request without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available; use device=cpu")
    return device


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


class RunDir:
    """One run's directory; only the main process (rank 0) writes to it."""

    def __init__(self, path: str | Path, is_main: bool = True) -> None:
        self.path = Path(path)
        self.is_main = is_main
        self._writer = None
        if is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "state").mkdir(exist_ok=True)

    # ------------------------------------------------------------- records
    def write_config(self, cfg: RunConfig, device: torch.device, world_size: int = 1) -> None:
        if not self.is_main:
            return
        save_config(cfg, self.path / "config.yaml")
        env = {
            "metatransfer": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "world_size": world_size,
            "git_commit": git_commit(),
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

    def save_state(self, phase: str, state: dict) -> None:
        """Atomically write the resume state; the previous one is kept as a fallback."""
        if not self.is_main:
            return
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        path = self.state_path(phase)
        if path.is_file():
            os.replace(path, path.with_suffix(".prev.pt"))
            sha = path.with_suffix(".sha256")
            if sha.is_file():
                os.replace(sha, path.with_suffix(".prev.sha256"))

        def write(tmp: str) -> None:
            Path(tmp).write_bytes(data)

        atomic_write(path, write)
        atomic_write(path.with_suffix(".sha256"), lambda tmp: Path(tmp).write_text(digest))

    def load_state(self, phase: str) -> dict | None:
        """The latest good resume state of ``phase``, or None when there is none."""
        path = self.state_path(phase)
        candidates = [(path, path.with_suffix(".sha256")),
                      (path.with_suffix(".prev.pt"), path.with_suffix(".prev.sha256"))]
        problems = []
        for state_file, sha_file in candidates:
            if not state_file.is_file():
                continue
            data = state_file.read_bytes()
            if sha_file.is_file() and hashlib.sha256(data).hexdigest() != sha_file.read_text():
                problems.append(f"{state_file} fails its checksum")
                continue
            try:
                state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
            except Exception as exc:  # any unreadable pickle is a corrupt checkpoint
                problems.append(f"{state_file} is unreadable ({type(exc).__name__})")
                continue
            for problem in problems:
                log.warning("%s; resuming from the previous checkpoint %s", problem, state_file)
            return state
        if problems:
            raise CheckpointError(f"no usable checkpoint for {phase}: {'; '.join(problems)}; "
                                  "delete the state folder to start the phase over")
        return None

    def phase_done(self, phase: str) -> bool:
        state = self.load_state(phase)
        return bool(state and state.get("done"))
