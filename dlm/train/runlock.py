"""One trainer per run folder, and no trainer outliving its launcher.

`RunLock` holds an exclusive `flock` on `<run>/LOCK` for the life of the process that takes it
(rank 0): a second launch on the same folder fails at once, naming the holder, instead of racing
it for checkpoints and metrics. The kernel drops the lock when the holder exits, however it
dies, so there is nothing stale to clean up. (Needs a file system with working flock; NFS v4 and
Lustre mounted with `-o flock` have it.)

`die_with_launcher` makes a worker receive SIGTERM when the process that started it (torchrun)
dies, even by SIGKILL: the workers then checkpoint and exit together instead of training on as
orphans that still hold the lock.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import signal
import socket
import sys
from pathlib import Path

LOCK_FILE = "LOCK"
_PR_SET_PDEATHSIG = 1


class RunLockedError(RuntimeError):
    """Another live process holds the run folder."""


class RunLock:
    """Exclusive lock on a run folder for as long as this object (or the process) lives."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = self.path.read_text().strip() or "an unknown process"
            os.close(self._fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLockedError(
                    f"run folder {self.path.parent} is in use by {holder}: stop that trainer first "
                    f"(or choose another train.run_dir)"
                ) from None
            raise
        os.ftruncate(self._fd, 0)
        job = os.environ.get("SLURM_JOB_ID")
        os.write(
            self._fd, f"pid {os.getpid()} on {socket.gethostname()}{f' (SLURM job {job})' if job else ''}\n".encode()
        )
        os.fsync(self._fd)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = -1


def die_with_launcher(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux prctl
    PR_SET_PDEATHSIG); a parent that died before the call is caught by re-reading the parent pid."""
    if not sys.platform.startswith("linux"):
        raise NotImplementedError("die_with_launcher needs Linux (prctl PR_SET_PDEATHSIG)")
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)  # the parent died before the call
