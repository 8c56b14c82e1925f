"""The trainer as an operator meets it (torchrun, 2 CPU processes, tiny model): config errors in
one line that names the flag, no run folder from a world-size error, one trainer per run folder,
workers that die with a SIGKILLed torchrun after checkpointing, and the STOPPED marker."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from dlm.train.checkpoint import COMPLETE

pytestmark = pytest.mark.slow

SHAPE = {"train.global_batch_size": 8, "train.micro_batch_size": 2, "checkpoint.interval": 0}


def run_failing(torchrun, args: list[str], log: Path) -> str:
    proc = torchrun.start(2, args, log)
    assert proc.wait(300) != 0
    out = log.read_text()
    # torchrun prints its own ChildFailedError block; the workers print no traceback
    assert 'launch/pretrain.py", line' not in out, out[-3000:]
    return out


def test_bad_override_is_one_line_naming_the_flag(torchrun, tmp_path):
    out = run_failing(torchrun, torchrun.args(tmp_path / "run", **{**SHAPE, "train.steps": "ten"}), tmp_path / "log")
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert errors == ["error: command line --train.steps: expected an integer, got 'ten'"], out[-3000:]
    assert not (tmp_path / "run").exists()


def test_world_size_error_leaves_no_run_folder(torchrun, tmp_path):
    args = torchrun.args(tmp_path / "run", **{**SHAPE, "train.global_batch_size": 6})
    out = run_failing(torchrun, args, tmp_path / "log")
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert errors == ["error: train.global_batch_size 6 is not divisible by world size 2 x micro_batch_size 2"], out
    assert not (tmp_path / "run").exists()


def test_one_trainer_per_run_folder_and_no_orphans(torchrun, tmp_path):
    run_dir = tmp_path / "run"
    args = torchrun.args(run_dir, **{**SHAPE, "train.steps": 100_000})
    first = torchrun.start(2, args, tmp_path / "log1")
    metrics = run_dir / "metrics.jsonl"
    end = time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert first.poll() is None and time.monotonic() < end, (tmp_path / "log1").read_text()[-3000:]
        time.sleep(0.05)
    # a second launch on the same folder fails at once, naming the holder
    out = run_failing(torchrun, args, tmp_path / "log2")
    assert f"error: run folder {run_dir} is in use by pid " in out, out[-3000:]
    # SIGKILL torchrun alone: its workers get SIGTERM, checkpoint together and exit
    first.send_signal(signal.SIGKILL)
    first.wait()
    end = time.monotonic() + 120
    while (run_dir / "LOCK").exists() and not _unlocked(run_dir):
        assert time.monotonic() < end, "the workers outlived torchrun"
        time.sleep(0.1)
    stopped = (run_dir / "STOPPED").read_text()
    step = int(stopped.split()[1])
    assert (run_dir / "checkpoints" / f"step_{step:08d}" / COMPLETE).is_file()
    # and the folder is free again: the next launch resumes from that checkpoint
    proc = torchrun.start(2, torchrun.args(run_dir, **{**SHAPE, "train.steps": step + 2}), tmp_path / "log3")
    assert proc.wait(300) == 0, (tmp_path / "log3").read_text()[-3000:]
    assert f"at step {step} " in (tmp_path / "log3").read_text() and not (run_dir / "STOPPED").exists()


def _unlocked(run_dir: Path) -> bool:
    from dlm.train.runlock import RunLock, RunLockedError

    try:
        RunLock(run_dir).release()
        return True
    except RunLockedError:
        return False


def test_damaged_newest_checkpoint_is_named_and_skipped(torchrun, tmp_path):
    """Garbage bytes of the same size in one shard of the newest checkpoint: both ranks agree it
    is damaged (each hashes a share of the files), it is moved aside with a warning naming path
    and step, and the run resumes from the previous one."""
    run_dir = tmp_path / "run"
    shape = {**SHAPE, "checkpoint.interval": 4, "checkpoint.keep_last": 3, "checkpoint.export_at_end": False}
    torchrun.run(2, torchrun.args(run_dir, **{**shape, "train.steps": 8}), tmp_path / "log1")
    newest = run_dir / "checkpoints" / "step_00000008"
    shard = max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(bytes(shard.stat().st_size))
    torchrun.run(2, torchrun.args(run_dir, **{**shape, "train.steps": 10}), tmp_path / "log2")
    log = (tmp_path / "log2").read_text()
    assert f"checkpoint {newest} (step 8) is damaged: {shard.name} does not match its recorded sha256" in log, log
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000004'} at step 4" in log
    assert (run_dir / "checkpoints" / "step_00000008.damaged").is_dir() and (newest / COMPLETE).is_file()
