"""Resume from any interruption: kill a run at chosen moments, resume it, and require the
very same final parameters and results.json as an uninterrupted run (bit-identical on CPU).

Kill points (one chained run, each resume killed again at the next point):

1. pre-training, SIGKILL between step checkpoints (after >= 4 saves of epoch 1);
2. pre-training, SIGKILL while a checkpoint's temp file exists (mid-save, epoch 2);
3. meta-training, SIGTERM (graceful: the phase saves at the step boundary, exit 130);
4. meta-training, SIGKILL while a checkpoint's temp file exists (mid-save).

Mid-save kills are aimed by watching for the temp file; when a save is too quick to be
seen, the kill lands a little later, still at an arbitrary moment. Also here: SIGINT
during ``mtl pretrain`` / ``mtl meta-train`` then ``--resume`` of that phase, corrupt or
truncated states, and NaN/Inf losses (stop, keeping the last good checkpoint, or skip).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

import metatransfer.phases.common as common_mod
import metatransfer.training as training_mod
from metatransfer.cli import main
from metatransfer.data.transforms import Normalizer
from metatransfer.errors import CheckpointError
from metatransfer.runs import RunDir
from metatransfer.training import CheckpointSchedule, StopRequest

pytestmark = pytest.mark.slow  # end-to-end runs of the phases

TESTS = Path(__file__).resolve().parent
# The child registers the toy dataset (conftest) and slows every fsync by 10 ms: timing
# only, so the watcher below sees each checkpoint and each save's temp file reliably.
LAUNCH = f"""
import os, sys, time
sys.path.insert(0, {str(TESTS)!r})
import conftest
_fsync = os.fsync
os.fsync = lambda fd: (time.sleep(0.01), _fsync(fd))[1]
from metatransfer.cli import main
main(sys.argv[1:])
"""


def overrides(out: Path) -> list[str]:
    """tiny_overrides, longer so kills land inside the phases, one thread, a checkpoint
    every step (so kills fall between and during saves); bf16 autocast, the default on
    CPUs that have it (fp32 determinism: test_reproducibility.py)."""
    return [*tiny_overrides(out), "threads=1", "checkpoint_every_steps=1", "amp=bf16",
            "pretrain.epochs=3", "meta.epochs=3", "meta.episodes_per_epoch=4",
            "eval.episodes=10", "eval.shots=[1]"]


def sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def cli(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run (in this process) to compare every resumed run with."""
    out = tmp_path_factory.mktemp("reference") / "run"
    threads = torch.get_num_threads()
    try:
        assert cli(["run", "--quiet", *sets(overrides(out))]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


# ----------------------------------------------------------------------------- comparing


def same(a, b, where: str = "") -> None:
    """Exact equality of nested states: tensors bit for bit, everything else by ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b) or (a.isnan() == b.isnan()).all(), f"tensor differs: {where}"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"keys differ at {where}: {set(a) ^ set(b)}"
        for key in a:
            same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def final_metrics(run: Path) -> dict:
    """Last record per (phase, step), minus the wall-clock field (a resumed epoch may log
    twice when a kill fell between its log line and its checkpoint)."""
    records = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rec.pop("time")
        records[(rec["phase"], rec["step"])] = rec
    return records


def assert_same_phase(run: Path, ref: Path, phase: str) -> None:
    same(RunDir(run).load_state(phase), RunDir(ref).load_state(phase), phase)
    best = {"pretrain": "pretrain_best.safetensors", "meta": "meta_best.safetensors"}[phase]
    assert (run / best).read_bytes() == (ref / best).read_bytes(), best


def assert_same_run(run: Path, ref: Path) -> None:
    assert (run / "results.json").read_bytes() == (ref / "results.json").read_bytes()
    for phase in ("pretrain", "meta"):
        assert_same_phase(run, ref, phase)
    assert final_metrics(run) == final_metrics(ref)


# ----------------------------------------------------------------------------- killing


class Watch:
    """Polls a run directory: how many times a phase's state was replaced, and whether a
    save is in progress (its temp file exists)."""

    def __init__(self, run: Path) -> None:
        self.state = run / "state"
        self.last: dict[str, tuple] = {"pretrain": (), "meta": ()}
        self.count = {"pretrain": 0, "meta": 0}

    def poll(self) -> None:
        for phase, last in self.last.items():
            try:
                st = (self.state / f"{phase}.pt").stat()
            except FileNotFoundError:
                continue
            signature = (st.st_ino, st.st_mtime_ns, st.st_size)  # inodes alone get reused
            if signature != last:
                self.last[phase] = signature
                self.count[phase] += 1

    def saves(self, phase: str) -> int:
        return self.count[phase]

    def saving(self, phase: str) -> bool:
        return any(self.state.glob(f".{phase}.pt.*.tmp"))


def between_saves(phase: str, n: int):
    return lambda w: w.saves(phase) >= n


def mid_save(phase: str, n: int, give_up: int):
    """During a save once ``n`` saves were seen; at ``give_up`` saves kill regardless."""
    return lambda w: (w.saves(phase) >= n and w.saving(phase)) or w.saves(phase) >= give_up


KILL_POINTS = [
    ("pretrain: SIGKILL between step checkpoints", between_saves("pretrain", 4), signal.SIGKILL),
    ("pretrain: SIGKILL during a checkpoint write", mid_save("pretrain", 8, 14), signal.SIGKILL),
    ("meta: SIGTERM mid-epoch (graceful)", between_saves("meta", 2), signal.SIGTERM),
    ("meta: SIGKILL during a checkpoint write", mid_save("meta", 3, 6), signal.SIGKILL),
]


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as fh:
        return subprocess.Popen([sys.executable, "-c", LAUNCH, *args], stdout=fh,
                                stderr=subprocess.STDOUT, env=env)


def kill_when(proc: subprocess.Popen, run: Path, trigger, sig, timeout: float = 120) -> bool:
    """Send ``sig`` once ``trigger(watch)`` holds; False when the run ended first."""
    watch = Watch(run)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        watch.poll()
        if trigger(watch):
            proc.send_signal(sig)
            temps = [t.name for t in (run / "state").glob(".*.tmp")]
            print(f"{sig.name} after {watch.count} saves seen; saving at the time: {temps}")
            proc.wait(timeout=60)
            return True
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    return False


def test_killed_and_resumed_run_is_bit_identical(tmp_path, reference):
    out = tmp_path / "run"
    args = ["run", "--quiet", *sets(overrides(out))]
    for i, (name, trigger, sig) in enumerate(KILL_POINTS):
        log = tmp_path / f"log{i}.txt"
        proc = spawn(args, log)
        assert kill_when(proc, out, trigger, sig), \
            f"run finished before kill point '{name}':\n{log.read_text()[-2000:]}"
        if sig == signal.SIGTERM:
            assert proc.returncode == 130, log.read_text()[-2000:]
            assert f"interrupted; continue with --resume {out}" in log.read_text()
        else:
            assert proc.returncode == -signal.SIGKILL
        args = ["run", "--quiet", "--resume", str(out)]
    log = tmp_path / "final.txt"
    proc = spawn(args, log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert_same_run(out, reference)


def test_phase_commands_resume_after_sigint(tmp_path, reference, monkeypatch, caplog):
    """A real SIGINT at a chosen step of `mtl pretrain` / `mtl meta-train`: the phase saves
    at that step boundary, exits 130, and `--resume` finishes it bit-identically."""
    stop_at = {"step": 0}

    class SignalAt(CheckpointSchedule):
        def due(self, global_step: int) -> bool:
            if global_step == stop_at["step"]:
                os.kill(os.getpid(), signal.SIGINT)
            return super().due(global_step)

    monkeypatch.setattr(training_mod, "CheckpointSchedule", SignalAt)  # both phases' loop
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        stop_at["step"] = 11  # epoch 2, step 2
        assert cli(["pretrain", "--quiet", *sets(overrides(out))]) == 130
        state = RunDir(out).load_state("pretrain")
        assert (state["epoch"], state["step"], state["done"]) == (1, 2, False)
        with caplog.at_level(logging.INFO, logger="metatransfer"):
            assert cli(["pretrain", "--quiet", "--resume", str(out)]) == 0
        # 1-based like the progress bars: two steps of epoch 2 done, the third is next
        assert "resuming pre-training at epoch 2, step 3 (1-based)" in caplog.text
        assert_same_phase(out, reference, "pretrain")

        stop_at["step"] = 6  # epoch 2, step 2
        assert cli(["meta-train", "--quiet", "--resume", str(out)]) == 130
        state = RunDir(out).load_state("meta")
        assert (state["epoch"], state["step"], state["done"]) == (1, 2, False)
        assert cli(["meta-train", "--quiet", "--resume", str(out)]) == 0
        assert_same_phase(out, reference, "meta")
    finally:
        torch.set_num_threads(threads)


def test_resume_after_an_epochs_last_step_says_so(tmp_path, reference, monkeypatch, caplog):
    """Stopped right after epoch 1's last step (9 steps per epoch): the resume continues
    with that epoch's validation, and says so (it used to log "step 10")."""

    class SignalAt(CheckpointSchedule):
        def due(self, global_step: int) -> bool:
            if global_step == 9:
                os.kill(os.getpid(), signal.SIGINT)
            return super().due(global_step)

    monkeypatch.setattr(training_mod, "CheckpointSchedule", SignalAt)
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        assert cli(["pretrain", "--quiet", *sets(overrides(out))]) == 130
        state = RunDir(out).load_state("pretrain")
        assert (state["epoch"], state["step"], state["done"]) == (0, 9, False)
        monkeypatch.setattr(training_mod, "CheckpointSchedule", CheckpointSchedule)
        with caplog.at_level(logging.INFO, logger="metatransfer"):
            assert cli(["pretrain", "--quiet", "--resume", str(out)]) == 0
        assert "resuming pre-training after the last step of epoch 1: its validation is " \
               "next" in caplog.text
        assert "step 10" not in caplog.text
        assert_same_phase(out, reference, "pretrain")
    finally:
        torch.set_num_threads(threads)


def test_second_signal_stops_at_once():
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where a shell started us in the background
    stop = StopRequest().arm()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        stop.disarm()
    assert signal.getsignal(signal.SIGINT) is before


# ----------------------------------------------------------------------------- corruption


def two_states(tmp_path: Path) -> RunDir:
    run = RunDir(tmp_path / "run")
    run.save_state("meta", {"step": 1, "w": torch.arange(4.0)})
    run.save_state("meta", {"step": 2, "w": torch.arange(4.0) * 2})
    return run


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage", "missing"])
def test_damaged_state_falls_back_to_previous(tmp_path, caplog, damage):
    run = two_states(tmp_path)
    path = run.state_path("meta")
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        path.write_bytes(data[:-10] + bytes([data[-10] ^ 1]) + data[-9:])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "garbage":
        path.write_bytes(os.urandom(len(data)))
    else:  # killed between rotating the old state and renaming the new one in
        path.unlink()
    with caplog.at_level(logging.WARNING, logger="metatransfer.runs"):
        state = run.load_state("meta")
    assert state["step"] == 1
    assert "resuming from the previous checkpoint" in caplog.text
    assert str(path) in caplog.text


def test_both_states_damaged_is_a_clear_error(tmp_path):
    run = two_states(tmp_path)
    for path in (run.state_path("meta"), run.prev_path("meta")):
        path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="no usable checkpoint for meta.*delete"):
        run.load_state("meta")


def test_stale_temp_file_of_a_killed_save_is_ignored_and_removed(tmp_path):
    run = two_states(tmp_path)
    stale = run.state_path("meta").parent / ".meta.pt.abc123.tmp"
    stale.write_bytes(b"half a state")
    assert run.load_state("meta")["step"] == 2
    assert not stale.exists()


# ----------------------------------------------------------------------------- NaN / Inf


class NaNOnCall(Normalizer):
    """Normalises as usual, but returns NaN images on the ``bad``-th call."""

    calls = 0
    bad = 3

    def __call__(self, images):
        NaNOnCall.calls += 1
        out = super().__call__(images)
        return out * float("nan") if NaNOnCall.calls == self.bad else out


@pytest.fixture
def nan_batch(monkeypatch):
    NaNOnCall.calls = 0
    # both phases build their training normaliser through phases.common
    monkeypatch.setattr(common_mod, "Normalizer", NaNOnCall)
    return NaNOnCall


def quick(out: Path, *extra: str) -> list[str]:
    return sets([*tiny_overrides(out), "pretrain.epochs=1", "meta.epochs=1", "eval.episodes=5",
                 *extra])


def test_nan_loss_stops_pretraining_naming_the_step(tmp_path, nan_batch, capsys):
    out = tmp_path / "run"
    assert cli(["pretrain", "--quiet", *quick(out, "checkpoint_every_steps=1")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: pre-training: the loss became NaN/Inf at step 3;")
    assert "last good checkpoint" in err[-1]
    state = RunDir(out).load_state("pretrain")
    assert (state["epoch"], state["step"]) == (0, 2)  # the last good step, not step 3
    assert all(torch.isfinite(t).all() for t in state["backbone"].values() if t.is_floating_point())


def test_nan_loss_detected_without_step_checkpoints(tmp_path, nan_batch, capsys):
    """No per-step host sync: the device-side flag is read at epoch end, step still named."""
    assert cli(["pretrain", "--quiet", *quick(tmp_path / "run")]) == 2
    assert "the loss became NaN/Inf at step 3;" in capsys.readouterr().err


def test_nan_policy_skip_skips_and_counts(tmp_path, nan_batch, reference):
    out = tmp_path / "run"
    assert cli(["pretrain", "--quiet", *quick(out, "nan_policy=skip", "pretrain.grad_clip=5")]) == 0
    record = [r for r in RunDir(out).metrics() if r["phase"] == "pretrain"][-1]
    assert record["skipped_batches"] == 1 and math.isfinite(record["loss"])
    state = RunDir(out).load_state("pretrain")
    assert all(torch.isfinite(t).all() for t in state["backbone"].values() if t.is_floating_point())

    # meta-training: the 3rd normaliser call is meta-step 2's normal tasks (HT makes 2 per step)
    meta_out = tmp_path / "meta"
    meta_out.mkdir()
    shutil.copy(reference / "pretrain_best.safetensors", meta_out / "pretrain_best.safetensors")
    NaNOnCall.calls = 0
    assert cli(["meta-train", "--quiet", *quick(meta_out, "nan_policy=skip")]) == 0
    record = [r for r in RunDir(meta_out).metrics() if r["phase"] == "meta"][-1]
    assert record["skipped_batches"] == 1 and math.isfinite(record["loss"])


def test_nan_loss_stops_meta_training(tmp_path, nan_batch, reference, capsys):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(reference / "pretrain_best.safetensors", out / "pretrain_best.safetensors")
    # the bad batch is counted in normaliser calls: no epoch-0 validation before training
    assert cli(["meta-train", "--quiet", *quick(out, "checkpoint_every_steps=1",
                                                "meta.select_start=false")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: meta-training: the loss became NaN/Inf at step 2;")
    assert RunDir(out).load_state("meta")["step"] == 1
