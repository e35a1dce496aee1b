"""Worker processes that run reward functions with a per-item timeout (stdlib only).

Why processes: ``math-verify`` and sympy can run for minutes on adversarial input, and
``math-verify`` times itself out with ``signal.alarm``, which only works in a process's
main thread. Each item therefore runs in the main thread of a pool worker, under two
timeouts:

1. In the worker, a ``SIGALRM`` timer raises ``ItemTimeout`` (a ``BaseException``, so a
   reward function's own ``except Exception`` cannot swallow it) after ``timeout_s``. This
   ends pure-Python hangs (sympy, a ``time.sleep``) cheaply; the worker stays alive.
2. In the parent, a watchdog gives every item ``timeout_s + kill_grace_s``, counted from
   when it was handed to a started pool (a fresh pool's workers first import their
   modules, which takes seconds with sympy). An item still running then
   is stuck where signals cannot reach it (a long C call, a function that blocked
   ``SIGALRM``): every worker is killed, the pool is dropped and recreated on demand, and
   the other in-flight items are run again.

The pool uses the ``spawn`` start method: forking a process that runs torch.distributed,
CUDA or NCCL threads can deadlock the child. Workers import only what they are told to
(``preload``) plus, by pickle, the module of the function they run; this module and
``megappo.data.rewards`` import neither torch nor Megatron, and the parent's ``__main__``
is not re-imported in the workers (see ``main_module_hidden``).

At most ``num_workers`` items are in flight, so an item's clock starts when it is handed
to an idle worker, not while it waits in a queue. A batch may also have a deadline
(``run(..., deadline_s=)``): items still running or waiting when it passes time out
together, so a batch of hanging items costs one deadline, not one timeout per worker round.

Workers are started with the preemption signals blocked and die with the trainer
(``megappo.helper_processes``): a SIGUSR1 / SIGTERM that torchrun or Slurm sends to every
process leaves them running for the trainer's preemption save, and ``kill -9`` of the
trainer leaves none behind.
"""

from __future__ import annotations

import collections
import importlib
import importlib.util
import logging
import multiprocessing
import signal
import sys
import time
import os
import weakref
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Sequence

from megappo.helper_processes import die_with_parent, main_module_hidden, shielded_from_preemption

logger = logging.getLogger(__name__)

Status = Literal["ok", "error", "timeout"]

STARTUP_ALLOWANCE_S = 120.0
"""How long fresh workers may take to start (spawn an interpreter, import the preloads)
before the pool is declared unable to start."""

_MAX_CRASH_RETRIES = 1
"""A worker that dies (segfault, ``os._exit``) breaks the whole pool and every in-flight
item fails with it; each such item is retried this many times before it counts as an error."""


class ItemTimeout(BaseException):
    """Raised inside a worker by the item's SIGALRM timer."""


@dataclass(frozen=True)
class Outcome:
    """The result of one item: ``value`` is the function's return value (``None`` unless
    ``status == "ok"``); ``message`` says what went wrong otherwise."""

    status: Status
    value: Any = None
    message: str = ""


@dataclass(frozen=True)
class Preload:
    """A module a worker imports at start: by name, or from a ``.py`` file under ``name``
    (so that functions pickled by reference to ``name`` resolve in the worker)."""

    name: str
    file: Optional[str] = None


def import_preload(preload: Preload) -> Any:
    """Import ``preload`` into ``sys.modules`` (idempotent) and return the module."""
    if preload.name in sys.modules:
        return sys.modules[preload.name]
    if preload.file is None:
        return importlib.import_module(preload.name)
    spec = importlib.util.spec_from_file_location(preload.name, preload.file)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load a Python module from {preload.file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[preload.name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[preload.name]
        raise
    return module


def _init_worker(sys_path: list[str], preloads: Sequence[Preload], quiet_loggers: Sequence[str], parent_pid: int) -> None:
    die_with_parent(parent_pid)
    sys.path[:] = sys_path
    # The parent handles Ctrl-C; a worker that also died of it would break the pool mid-call.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for name in quiet_loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    for preload in preloads:
        import_preload(preload)


def _noop() -> None:
    pass


def _on_alarm(signum: int, frame: Any) -> None:
    raise ItemTimeout()


def run_item(fn: Callable[..., Any], args: tuple, timeout_s: float) -> Outcome:
    """Run ``fn(*args)`` under a SIGALRM timer (only valid in a process's main thread)."""
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        return Outcome("ok", fn(*args))
    except ItemTimeout:
        return Outcome("timeout", message=f"exceeded {timeout_s:g} s")
    except (Exception, SystemExit) as error:
        return Outcome("error", message=f"{type(error).__name__}: {error}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _stop(executor: ProcessPoolExecutor) -> None:
    """Shut ``executor`` down without waiting on a stuck task: idle workers exit, the rest
    are killed. ProcessPoolExecutor has no public way to stop a running task before
    Python 3.14 (``kill_workers``); its ``_processes`` map is the only handle on them."""
    processes = list((getattr(executor, "_processes", None) or {}).values())
    executor.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.join(timeout=0.5)
        if process.is_alive():
            process.kill()
            process.join(timeout=10)


@dataclass
class _Task:
    index: int
    args: tuple
    crashes: int = 0
    deadline: Optional[float] = None
    """When the parent's watchdog gives up on it; None until the workers have started."""


class RewardWorkerPool:
    """A small, lazily started, reusable pool of ``spawn`` workers (see the module docstring).

    ``run(fn, items)`` returns one ``Outcome`` per item, in order; it never raises for a
    failing, hanging or crashing item (only when the workers cannot start at all). ``fn``
    must be picklable by reference (a module-level function of a module the workers can
    import); the parent's ``sys.path`` is handed to every worker, and ``preload`` modules
    (e.g. loaded from a file) are imported by each worker before it takes work.
    """

    def __init__(
        self,
        num_workers: int,
        timeout_s: float,
        *,
        kill_grace_s: Optional[float] = None,
        preload: Sequence[Preload] = (),
        quiet_loggers: Sequence[str] = (),
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"reward.num_workers must be >= 1, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"reward.timeout_s must be > 0, got {timeout_s}")
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.kill_grace_s = max(2.0, 0.5 * timeout_s) if kill_grace_s is None else kill_grace_s
        self._preload = tuple(preload)
        self._quiet_loggers = tuple(quiet_loggers)
        self._executor: Optional[ProcessPoolExecutor] = None
        self._finalizer: Optional[weakref.finalize] = None
        self._warmup: list[Future] = []
        self._created = 0.0
        self.restarts = 0
        """How many times the pool was killed and dropped (hung or crashed workers)."""

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            executor = ProcessPoolExecutor(
                max_workers=self.num_workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(list(sys.path), self._preload, self._quiet_loggers, os.getpid()),
            )
            self._finalizer = weakref.finalize(self, _stop, executor)
            # A spawn executor starts a worker per submit while none is idle: start them all
            # now, with the parent's __main__ hidden. Their no-op answers say the pool is up.
            with main_module_hidden(), shielded_from_preemption():
                self._warmup = [executor.submit(_noop) for _ in range(self.num_workers)]
            self._created = time.monotonic()
            self._executor = executor
        return self._executor

    def _started(self) -> bool:
        """Whether the workers answer; raises when they could not start."""
        if not all(future.done() for future in self._warmup):
            if time.monotonic() - self._created > STARTUP_ALLOWANCE_S:
                raise RuntimeError(f"reward workers did not start within {STARTUP_ALLOWANCE_S:g} s")
            return False
        errors = [future.exception() for future in self._warmup]
        if errors and all(error is not None for error in errors):
            raise RuntimeError(
                f"reward workers failed to start (did an import fail in the worker?): {type(errors[0]).__name__}: {errors[0]}"
            )
        return True

    def _drop_pool(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # stops the workers, once
        self._executor = None
        self._finalizer = None
        self._warmup = []

    def run(self, fn: Callable[..., Any], items: Sequence[tuple], *, deadline_s: Optional[float] = None) -> list[Outcome]:
        """One ``Outcome`` per item. ``deadline_s``: the whole batch's time limit, counted from
        when the workers have started; items still running or waiting then time out."""
        if deadline_s is not None and deadline_s <= 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s}")
        try:
            return self._run(fn, items, deadline_s)
        except BaseException:
            self._drop_pool()  # e.g. Ctrl-C: leave no worker running a task behind
            raise

    def _run(self, fn: Callable[..., Any], items: Sequence[tuple], deadline_s: Optional[float]) -> list[Outcome]:
        outcomes: list[Optional[Outcome]] = [None] * len(items)
        pending = collections.deque(_Task(index, tuple(args)) for index, args in enumerate(items))
        running: dict[Future, _Task] = {}
        batch_deadline: Optional[float] = None
        restarts = {"hung": 0, "died": 0}
        while pending or running:
            self._submit(fn, pending, running)
            if batch_deadline is None and deadline_s is not None and running and self._started():
                batch_deadline = time.monotonic() + deadline_s
            waiting_for = list(running) + [f for f in self._warmup if not f.done()]
            deadlines = [task.deadline for task in running.values() if task.deadline is not None]
            limit = min(deadlines) if deadlines else self._created + STARTUP_ALLOWANCE_S
            if batch_deadline is not None:
                limit = min(limit, batch_deadline)
            done, _ = wait(waiting_for, timeout=max(0.0, limit - time.monotonic()), return_when=FIRST_COMPLETED)
            crashed: list[_Task] = []
            for future in done:
                if future not in running:
                    continue  # a warm-up answer
                task = running.pop(future)
                try:
                    outcomes[task.index] = future.result()
                except BrokenProcessPool:
                    crashed.append(task)
                except Exception as error:  # e.g. a return value that cannot be pickled back
                    outcomes[task.index] = Outcome("error", message=f"{type(error).__name__}: {error}")
            if crashed:
                # Every in-flight item fails with the pool; collect them so none is left behind.
                rest, _ = wait(list(running) + self._warmup, timeout=10.0)
                for future in rest:
                    if future in running:
                        task = running.pop(future)
                        error = future.exception()
                        if isinstance(error, BrokenProcessPool):
                            crashed.append(task)
                        elif error is not None:
                            outcomes[task.index] = Outcome("error", message=f"{type(error).__name__}: {error}")
                        else:
                            outcomes[task.index] = future.result()
                self._started()  # raises when no worker ever started
                for task in crashed:
                    task.crashes += 1
                    if task.crashes > _MAX_CRASH_RETRIES:
                        outcomes[task.index] = Outcome("error", message="the reward worker died while running it")
                    else:
                        task.deadline = None
                        pending.appendleft(task)
            elif self._started():
                self._start_clocks(running)
            now = time.monotonic()
            if batch_deadline is not None and now >= batch_deadline:
                message = f"the batch's reward deadline ({deadline_s:g} s) passed"
                for task in [*running.values(), *pending]:
                    outcomes[task.index] = Outcome("timeout", message=message)
                if running:
                    self._drop_pool()  # the workers are busy with items that no longer count
                    restarts["hung"] += 1
                running.clear()
                pending.clear()
                break
            expired = [future for future, task in running.items() if task.deadline is not None and task.deadline <= now]
            for future in expired:
                task = running.pop(future)
                outcomes[task.index] = Outcome(
                    "timeout", message=f"still running after {self.timeout_s + self.kill_grace_s:g} s; worker killed"
                )
            if expired or crashed:
                for task in running.values():  # innocent items die with the pool: run them again
                    task.deadline = None
                    pending.appendleft(task)
                running.clear()
                self._drop_pool()
                restarts["hung" if expired else "died"] += 1
        if any(restarts.values()):
            # One line per batch, not one per restart: a worker that dies on every item would
            # otherwise print a warning per response.
            self.restarts += sum(restarts.values())
            logger.warning(
                "reward worker pool restarted %d time(s) in a batch of %d items (%d for hung items, %d after a worker died)",
                sum(restarts.values()), len(items), restarts["hung"], restarts["died"],
            )
        assert all(outcome is not None for outcome in outcomes)
        return outcomes  # type: ignore[return-value]

    def _submit(self, fn: Callable[..., Any], pending: collections.deque, running: dict[Future, _Task]) -> None:
        """Fill idle workers. An item that has crashed a worker before runs alone, so that
        a second crash is its own and not a bystander's."""
        while pending and len(running) < self.num_workers:
            if any(task.crashes for task in running.values()) or (pending[0].crashes and running):
                return
            task = pending.popleft()
            try:
                future = self._submit_one(fn, task)
            except BrokenProcessPool:
                if running:
                    raise  # broken mid-batch: the waiting loop's crash handling deals with it
                # A worker died while the pool was idle (between batches, e.g. killed by a
                # signal or the OOM killer): start a fresh pool once.
                logger.warning("reward worker pool found broken before a batch (a worker died while idle); restarting it")
                self._drop_pool()
                self.restarts += 1
                future = self._submit_one(fn, task)
            running[future] = task
            if self._started():
                self._start_clocks(running)

    def _submit_one(self, fn: Callable[..., Any], task: _Task) -> Future:
        pool = self._pool()
        with shielded_from_preemption():  # a submit may start a worker process
            return pool.submit(run_item, fn, task.args, self.timeout_s)

    def _start_clocks(self, running: dict[Future, _Task]) -> None:
        deadline = time.monotonic() + self.timeout_s + self.kill_grace_s
        for task in running.values():
            if task.deadline is None:
                task.deadline = deadline

    def close(self) -> None:
        """Stop the workers (killing any that still run); the pool restarts on the next ``run``."""
        self._drop_pool()
