"""Disaggregated placement: rollout ranks apart from trainer ranks (``parallel.rollout_world_size``).

A launch of N processes (``torchrun --nproc-per-node ...``) with R rollout ranks: ranks
0 .. N - R - 1 train (``init_parallel`` builds the default process group, and so Megatron's
groups, over them alone), ranks N - R .. N - 1 each run one rollout engine and nothing else
(``megappo.rollout.remote.serve``). Rollout rank N - R + i serves the trainer's
data-parallel replica i, whose engine holder talks to it over a link of its own.

Every process meets the others through the launch's TCP store: torchrun's agent store
(``TORCHELASTIC_USE_AGENT_STORE``), or the one rank 0 hosts at MASTER_ADDR:MASTER_PORT under
another launcher, as ``torch.distributed``'s ``env://`` rendezvous does it. The trainers'
default group lives under the store prefix ``megappo/attempt{k}/trainers/`` (k: torchrun's restart
count); the links under their own.

Liveness: each process adds to its heartbeat counter in the store every
``timeout_s / 10`` seconds (a thread, so a rank busy generating or training still beats)
and marks its exit (``atexit``). ``Watch.check`` raises ``PeerLost`` naming the rank and its
host once a watched rank has exited, or its counter has not moved for ``timeout_s`` (killed
with SIGKILL, frozen, or its node gone), or the store itself is unreachable. Nothing here
waits on the store without a bound: keys are polled with ``check``, never ``wait``ed for,
because a TCP store client serializes its operations and a blocking wait would stall the
heartbeat that shares it.
"""

from __future__ import annotations

import atexit
import datetime
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist


class PeerLost(RuntimeError):
    """A watched rank exited, or gave no heartbeat within the timeout, or the store is gone."""


@dataclass
class Placement:
    """This process's place in a launch split into trainer and rollout ranks."""

    rank: int
    world_size: int
    rollout_world_size: int
    local_rank: int
    timeout_s: float
    store: dist.Store = field(repr=False)
    """The launch's store (prefixed by callers; shared, so only non-blocking operations)."""
    address: tuple[str, int] = ("127.0.0.1", 0)
    """Where the store listens: a further client (``new_client``) connects there."""
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def trainer_world_size(self) -> int:
        return self.world_size - self.rollout_world_size

    @property
    def is_rollout(self) -> bool:
        return self.rank >= self.trainer_world_size

    @property
    def replica(self) -> int:
        """On a rollout rank: the data-parallel replica it serves."""
        assert self.is_rollout
        return self.rank - self.trainer_world_size

    def rollout_rank(self, replica: int) -> int:
        return self.trainer_world_size + replica

    @property
    def _attempt(self) -> str:
        # torchrun reuses its agent store when it restarts the workers: keys of an earlier
        # attempt (its exit marks above all) must not be read as this one's.
        return f"megappo/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"

    def prefixed(self, prefix: str) -> dist.Store:
        return dist.PrefixStore(self._attempt + prefix, self.store)

    def new_client(self, prefix: str) -> dist.Store:
        """A connection of its own to the launch's store (for a blocking rendezvous that must
        not hold the shared client, e.g. a process group's construction)."""
        client = dist.TCPStore(self.address[0], self.address[1], is_master=False,
                               timeout=datetime.timedelta(seconds=self.timeout_s))
        return dist.PrefixStore(self._attempt + prefix, client)

    def watch(self, ranks: Sequence[int]) -> "Watch":
        return Watch(self.prefixed(_HEARTBEATS), list(ranks), self.timeout_s)

    def start_heartbeat(self) -> None:
        """Name this process in the store and beat every ``timeout_s / 10`` s (a thread)."""
        beats, rank, interval = self.prefixed(_HEARTBEATS), self.rank, max(0.05, self.timeout_s / 10)
        beats.set(f"host/{rank}", f"{socket.gethostname()} (pid {os.getpid()})")
        beats.add(f"beat/{rank}", 1)

        def beat():
            while not self._stop.wait(interval):
                try:
                    beats.add(f"beat/{rank}", 1)
                except Exception:  # noqa: BLE001 - the store is gone: nobody is left to watch us
                    return

        threading.Thread(target=beat, name=f"megappo-heartbeat-{rank}", daemon=True).start()

    def mark_exit(self) -> None:
        """Stop beating and tell the watchers this rank is gone (at exit; best effort)."""
        self._stop.set()
        try:
            self.prefixed(_HEARTBEATS).set(f"exit/{self.rank}", "1")
        except Exception:  # noqa: BLE001 - the store may be gone already
            pass


_HEARTBEATS = "heartbeat/"
_PLACEMENT: Optional[Placement] = None


def get_placement() -> Optional[Placement]:
    """The placement ``place_ranks`` made; None in a colocated run."""
    return _PLACEMENT


def place_ranks(rollout_world_size: int, *, timeout_s: float) -> Placement:
    """Join the launch's store, start this process's heartbeat, and say which ranks train
    and which serve rollouts. Call once per process, before ``init_parallel``."""
    global _PLACEMENT
    if _PLACEMENT is not None:
        return _PLACEMENT
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ValueError(f"parallel.rollout_world_size={rollout_world_size} needs a launcher (torchrun) that sets "
                         f"{', '.join(missing)}: the rollout ranks are the last ranks of its world")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if not 0 < rollout_world_size < world:
        raise ValueError(f"parallel.rollout_world_size={rollout_world_size} must be in [1, {world - 1}] for a world of {world} "
                         "processes (at least one trainer rank)")
    store, _, _ = next(dist.rendezvous("env://", timeout=datetime.timedelta(seconds=max(timeout_s, 300))))
    address = (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
    placement = Placement(rank, world, rollout_world_size, int(os.environ.get("LOCAL_RANK", "0")), timeout_s, store, address)
    placement.start_heartbeat()
    atexit.register(placement.mark_exit)
    _PLACEMENT = placement
    return placement


class Watch:
    """Liveness of some ranks, read from their heartbeats (module docstring)."""

    def __init__(self, store: dist.Store, ranks: list[int], timeout_s: float):
        self.store, self.ranks, self.timeout_s = store, ranks, timeout_s
        now = time.monotonic()
        self._seen = {r: (None, now) for r in ranks}
        self._next = 0.0

    def describe(self, rank: int) -> str:
        """``rank R (host H (pid P))``, as far as the store knows."""
        try:
            host = self.store.get(f"host/{rank}").decode() if self.store.check([f"host/{rank}"]) else "host unknown"
        except Exception:  # noqa: BLE001 - naming must not fail
            host = "host unknown"
        return f"rank {rank} ({host})"

    def check(self) -> None:
        """Raise ``PeerLost`` when a watched rank is gone (at most every 50 ms a store read)."""
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + 0.05
        for rank in self.ranks:
            try:
                if self.store.check([f"exit/{rank}"]):
                    raise PeerLost(f"{self.describe(rank)} has exited")
                count = self.store.add(f"beat/{rank}", 0)
            except PeerLost:
                raise
            except Exception as e:  # noqa: BLE001 - the store's host is gone
                raise PeerLost(f"the launch's store is unreachable while watching rank {rank} "
                               f"(its host exited?): {type(e).__name__}: {e}") from e
            last, since = self._seen[rank]
            if count != last:
                self._seen[rank] = (count, now)
            elif now - since > self.timeout_s:
                raise PeerLost(f"{self.describe(rank)} gave no heartbeat for {now - since:.1f} s "
                               f"(parallel.rollout_timeout_s={self.timeout_s:g}): killed, hung or its node is gone")


def poll(store: dist.Store, key: str, watch: Watch, *, cancelled: Callable[[], bool] = lambda: False) -> Optional[bytes]:
    """The value of ``key`` once set (and delete it), checking ``watch`` while waiting; None
    when ``cancelled()`` turns true first. Polls with a growing pause (0.5 to 20 ms)."""
    pause = 0.0005
    try:
        while not store.check([key]):
            watch.check()
            if cancelled():
                return None
            time.sleep(pause)
            pause = min(pause * 2, 0.02)
        value = store.get(key)
        store.delete_key(key)
    except dist.DistError as e:  # the store's host (rank 0, or torchrun's agent) is gone
        raise PeerLost(f"the launch's store is unreachable (its host exited?): {type(e).__name__}: {e}") from e
    return value


def set_cpu_threads() -> None:
    """CPU ranks share the machine's cores: without ``OMP_NUM_THREADS``, each process of a
    launch of several takes its share (more intra-op threads only contend)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if "OMP_NUM_THREADS" not in os.environ and world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
