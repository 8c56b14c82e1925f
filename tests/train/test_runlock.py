"""The run-folder lock and workers dying with their launcher, with real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dlm.train.runlock import LOCK_FILE, RunLock, RunLockedError

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _wait(pred, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


@pytest.mark.slow  # a subprocess
def test_second_holder_is_refused_until_the_first_dies(tmp_path):
    ready = tmp_path / "ready"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, pathlib; from dlm.train.runlock import RunLock; lock = RunLock(sys.argv[1]); "
            "pathlib.Path(sys.argv[2]).touch(); time.sleep(600)",
            str(tmp_path),
            str(ready),
        ],
        env=ENV,
    )
    try:
        _wait(ready.exists)
        with pytest.raises(RunLockedError, match=rf"run folder {tmp_path} is in use by pid {holder.pid} on "):
            RunLock(tmp_path)
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock
        holder.wait()
    lock = RunLock(tmp_path)
    assert (tmp_path / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} on ")
    lock.release()
    RunLock(tmp_path).release()  # released locks can be taken again


@pytest.mark.slow  # a subprocess
def test_worker_gets_sigterm_when_its_launcher_is_killed(tmp_path):
    """launcher -> worker; SIGKILL the launcher: the worker's SIGTERM handler runs."""
    worker = (
        "import signal, sys, time, pathlib; from dlm.train.runlock import die_with_launcher\n"
        "out = pathlib.Path(sys.argv[1])\n"
        "signal.signal(signal.SIGTERM, lambda *a: (out.with_name('got_term').touch(), sys.exit(0)))\n"
        "die_with_launcher()\n"
        "out.write_text(str(__import__('os').getpid()))\n"
        "time.sleep(600)\n"
    )
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]]); "
            "time.sleep(600)",
            worker,
            str(tmp_path / "worker_pid"),
        ],
        env=ENV,
    )
    _wait(lambda: (tmp_path / "worker_pid").exists() and (tmp_path / "worker_pid").read_text())
    pid = int((tmp_path / "worker_pid").read_text())
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    _wait(lambda: (tmp_path / "got_term").exists())

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")

    _wait(gone)
