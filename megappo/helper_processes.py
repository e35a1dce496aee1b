"""Helper processes that outlive a preemption signal and die with the trainer (stdlib only at
import: reward workers import this module; ``start_writer_helper`` imports megatron-core when called).

The trainer starts helpers: reward worker pools (``megappo.data.reward_pool``) and
megatron-core's checkpoint-writer ``Manager`` (``megappo.checkpoint``). Two things went wrong
with them (issue 14, bugs 1 and 9):

1. A preemption signal meant for the trainer killed them. torchrun forwards SIGUSR1 / SIGTERM /
   SIGINT with ``killpg`` to each worker's process group, and Slurm signals every process of
   the step, so the helpers got the signal too and died with the default action; the
   preemption save then failed (``BrokenPipeError`` from the writer's queue) or the next
   reward raised ``BrokenProcessPool``. ``shielded_from_preemption`` blocks those signals in
   the calling thread while helpers are started: a child inherits the blocked mask (fork and
   exec keep it), so in a helper the signals stay pending forever. The trainer loses none: a
   signal blocked in one thread is delivered to another, or to this one when the block ends.
   Helpers are stopped by their owners with SIGKILL or a shutdown message, never SIGTERM alone.
2. ``kill -9`` of a rank left its helpers running (a 275 MB checkpoint helper, reward workers).
   ``die_with_parent``, called first thing in a helper, asks the kernel to SIGKILL it when the
   thread that started it exits (``prctl(PR_SET_PDEATHSIG)``, Linux); helpers are therefore
   started from the trainer's main thread.

``main_module_hidden`` keeps ``spawn`` children from re-importing the trainer's ``__main__``;
``start_writer_helper`` gives megatron-core's checkpoint writer a Manager started this way.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
from typing import Iterator, Optional

log = logging.getLogger(__name__)

PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
"""What torchrun and Slurm send to stop a run gracefully (SIGINT: Ctrl-C and torchrun's
forwarding of it); the trainer handles them, helpers must not die of them."""

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_warned_platform = False


@contextlib.contextmanager
def shielded_from_preemption() -> Iterator[None]:
    """Start helper processes inside this block: they are born with the preemption signals
    blocked (see the module docstring). Also starts Python's ``multiprocessing`` resource
    tracker here if it is not running yet, since it is a helper of the same kind."""
    from multiprocessing import resource_tracker

    previous = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
    try:
        # Starting the tracker *unblocks* SIGINT and SIGTERM (it blocks them around its own
        # spawn, then unblocks): start it first and block again, or the helpers started next
        # would be born with only SIGUSR1 blocked.
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def die_with_parent(parent_pid: int) -> None:
    """In a helper process: be SIGKILLed when the thread that started it exits. Exits at once
    when ``parent_pid`` is already gone (it died before the request took effect)."""
    global _warned_platform
    if not sys.platform.startswith("linux"):
        if not _warned_platform:
            log.warning("helper processes are not tied to the trainer's lifetime on %s (Linux only)", sys.platform)
            _warned_platform = True
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")
    if os.getppid() != parent_pid:
        os._exit(1)


def blocked_signals(pid: int) -> set[int]:
    """The signals ``pid`` blocks (from ``/proc/PID/status``; Linux), for tests and diagnostics."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigBlk:"):
                mask = int(line.split()[1], 16)
                return {n for n in range(1, 65) if mask & (1 << (n - 1))}
    raise ValueError(f"/proc/{pid}/status has no SigBlk line")


@contextlib.contextmanager
def main_module_hidden() -> Iterator[None]:
    """Make ``spawn`` children skip re-importing the parent's ``__main__``.

    ``multiprocessing.spawn`` has every child import the parent's main module (by
    ``__spec__.name`` or ``__file__``). Under ``torchrun -m megappo.train`` that loads the
    trainer's imports into each reward worker; under ``python -`` or an embedded
    interpreter the file does not exist and the worker dies. Reward workers need nothing
    from ``__main__`` (functions are looked up by module name), so the two attributes are
    hidden while the workers are started.
    """
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    names = ("__spec__", "__file__")
    saved = {name: main.__dict__.pop(name) for name in names if name in main.__dict__}
    main.__dict__["__spec__"] = None
    try:
        yield
    finally:
        for name in names:
            main.__dict__.pop(name, None)
        main.__dict__.update(saved)


_WRITER_HELPER: list = []
"""[Manager, its queue] once ``start_writer_helper`` ran (kept referenced: dropping it stops it)."""


def start_writer_helper() -> Optional[int]:
    """Give megatron-core's checkpoint writer (``filesystem_async``'s results queue) a Manager
    shielded from preemption signals and dying with this process; returns its pid (None,
    with a warning, when this megatron-core has no such queue). A Manager megatron-core
    started itself (an earlier save) is replaced: between saves its queue is idle."""
    import multiprocessing
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    current = getattr(filesystem_async, "_results_queue", _WRITER_HELPER)
    if current is _WRITER_HELPER:
        log.warning(
            "megatron-core has no filesystem_async._results_queue: its checkpoint writer helper is not shielded "
            "from preemption signals (a SIGUSR1 to every process may break the preemption save)"
        )
        return None
    if _WRITER_HELPER and current is _WRITER_HELPER[1]:
        return _WRITER_HELPER[0]._process.pid
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    # A hidden __main__: the helper does not re-import the trainer's entry module. (It still
    # imports torch once the first save's results, torch objects, pass through it: ~270 MB.)
    with main_module_hidden(), shielded_from_preemption():
        manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
    _WRITER_HELPER[:] = [manager, manager.Queue()]
    filesystem_async._results_queue = _WRITER_HELPER[1]
    return manager._process.pid
