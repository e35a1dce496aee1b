"""One run per run directory (issue 14, bug 6): ``lock_run_dir`` takes an exclusive lock on
``<run_dir>/.lock``; a second run in the same directory gets ``RunDirLocked`` naming the holder
(host, pid, start time, command) instead of interleaving ``metrics.jsonl`` and crashing.

The lock is ``flock`` on an open file: the kernel drops it when the holder exits in any way
(``kill -9`` included), so there is never a stale lock to clean up; the file's text only
says who holds it. Take it on global rank 0 only, before anything writes to the directory,
and keep the returned object for the run's lifetime. (On NFS, Linux emulates ``flock`` with
POSIX locks, which NFSv4 servers honour across nodes.)
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass

LOCK_FILE = ".lock"


class RunDirLocked(ValueError):
    """Another process holds the run directory (a user error: a ``ValueError``)."""


@dataclass
class RunDirLock:
    """A held lock; ``release()`` (or the process's exit) frees the directory."""

    path: str
    fd: int

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = -1

    def __enter__(self) -> "RunDirLock":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def lock_run_dir(run_dir: str | os.PathLike) -> RunDirLock:
    """Create ``run_dir`` if needed and lock it for this process; raises ``RunDirLocked``
    naming the holder when another process has it."""
    run_dir = os.path.abspath(os.fspath(run_dir))
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _describe(os.read(fd, 4096).decode(errors="replace"))
        os.close(fd)
        raise RunDirLocked(
            f"train.run_dir {run_dir} is in use by another run ({holder}); wait for it to finish or stop it, "
            f"or choose another train.run_dir"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    os.fsync(fd)
    return RunDirLock(path, fd)


def _describe(text: str) -> str:
    try:
        h = json.loads(text)
        return f"host {h['host']}, pid {h['pid']}, since {h['since']}: {h['command']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown: the lock file is being written"
