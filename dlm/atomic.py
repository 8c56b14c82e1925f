"""Atomic file writes: temp file, fsync, rename, fsync the folder.

A reader (or a job restarted after a crash) sees the old file or the new one, never half of one.
Temp names are `<final>.tmp-<host>-<pid>`: unique per writer, so concurrent writers (SLURM tasks on
several nodes sharing a folder) never collide, and the glob `<final>.tmp-*` finds the debris of
killed writers.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path


def temp_name(path: str | os.PathLike) -> Path:
    """Per-writer temp name next to `path`; never mistaken for a finished file."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data to disk (fsync is per inode, so any descriptor will do)."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename or new entry in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Path], object]) -> None:
    """`write_fn(tmp)` writes the whole file to the temp path; it is then fsynced and renamed onto
    `path`. On an error the temp file is removed and `path` is left as it was."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        write_fn(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """Pretty, key-sorted JSON with a trailing newline (stable bytes for stable content)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
