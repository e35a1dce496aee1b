"""Where the trainer's rollout batches come from, in every ``rollout.mode``.

``sync``: ``take(step)`` generates step ``step``'s batch with the newest weights
(``RolloutSide.sample``), exactly the loop before asynchronous modes existed.

``one_step_off`` and ``async``: on each replica's engine holder a producer thread generates
the batches of the coming steps ahead while the trainer trains, into a buffer the trainer
takes from in step order. Admission control (AReaL's staleness bound eta, arXiv 2505.24298,
sec. 5.1): the batch of step s is started only when the engine's weights are version
v >= s - 1 - eta, so it trains at most eta versions after the weights that sampled it
(step s trains from version s - 1); nothing finished is ever dropped. ``one_step_off`` is
eta = 1; ``async`` takes eta from ``rollout.max_staleness``; eta = 0 is ``sync`` run by the
producer (the same samples: the seeds are functions of the step alone).

Why a thread on CPU: generation is torch ops, which release the GIL, so the producer's
matrix products run on a core the trainer's own ops leave free (the trainer waits in
gloo collectives and in Python a good part of each step); a second process would need a
second copy of the engine's weights and a weight transfer, which a thread does not. The
producer runs no collective (generation and scoring only); every collective (the replica
broadcast of the batch, the failure flags, the weight sync) stays on the main thread.

The engine is used by one thread at a time: a weight sync or an evaluation waits for the
batch in flight to finish (``time/sync_wait``). With ``rollout.partial_rollout`` a weight
sync does not wait for it: it aborts the engine's requests (again every 50 ms while the
producer still holds the engine, which closes the gap between the producer's check and its
engine call), loads the weights, and the producer continues every aborted response from its
tokens so far under the new weights (``megappo.rollout.partial``); each token keeps the
version that sampled it (``RolloutBatch.token_versions_BT``). The prompt cursor saved with a checkpoint is the one after the last
batch the trainer *took* (``state_dict``): batches generated ahead and not yet trained are
regenerated after a resume from the same prompts, so none is skipped or trained twice.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Optional, Sequence

import torch

from megappo.parallel.collectives import dp_all_reduce
from megappo.rollout import SyncStats
from megappo.rollout.batch import RolloutBatch, RolloutStats
from megappo.rollout.group import holds_engine, raise_if_any_replica_failed, run_on_holder
from megappo.rollout.partial import generate_across_updates

from megappo.loop.rollout_side import RolloutSide

log = logging.getLogger("megappo")


def staleness_bound(mode: str, max_staleness: int) -> Optional[int]:
    """eta of a ``rollout.mode``: None for ``sync`` (no producer)."""
    return {"sync": None, "one_step_off": 1}.get(mode, max_staleness)


class RolloutStream:
    """This replica's batches in step order; see the module docstring."""

    def __init__(self, side: RolloutSide, *, mode: str, max_staleness: int, partial_rollout: bool = False):
        self.side, self.mode = side, mode
        self.partial_rollout = partial_rollout and mode != "sync"
        self.eta = staleness_bound(mode, max_staleness)
        self._cursor = side.data.state_dict()
        """The prompt cursor after the last batch the trainer took (what a checkpoint saves)."""
        self._cond = threading.Condition()
        self._ready: dict[int, tuple] = {}
        """step -> (batch or None, error or None, cursor after its prompts, generate seconds)."""
        self._next_step: Optional[int] = None
        self._engine_version = 0
        self._busy = self._stop = self._sync_pending = False
        self._thread: Optional[threading.Thread] = None
        self._sync_wait = 0.0

    # -- the trainer's calls --------------------------------------------------------------

    def take(self, step: int) -> tuple[RolloutBatch, dict[str, float]]:
        """Every rank: step ``step``'s batch and the stream's metrics (wait, buffer fill)."""
        t0 = time.perf_counter()
        if self.eta is None:
            batch = self.side.sample(step, policy_version=step - 1)
            self.side.release_memory()  # colocated SGLang gives the GPUs back for training
            self._cursor = self.side.data.state_dict()
            seconds = time.perf_counter() - t0  # the trainer waits for the whole generation
            return batch, {"time/rollout_wait": seconds, "rollout/buffer_fill": 1.0, "time/generate": seconds,
                           "time/sync_wait": 0.0}
        batch, fill, generate_s = run_on_holder(lambda: self._pop_on_holder(step), self.side.layout)
        if not holds_engine(self.side.layout):
            self.side.data.next_batch()  # move this rank's cursor as the holder's producer did
            self._cursor = self.side.data.state_dict()
        metrics = {"time/rollout_wait": time.perf_counter() - t0, "rollout/buffer_fill": fill,
                   "time/generate": generate_s, "time/sync_wait": self._sync_wait}
        return batch, metrics

    def sync_weights(self, actor_models: Sequence, *, version: int) -> SyncStats:
        """Every rank: the engine takes the actor's weights, which are now policy ``version``.
        On the holder it first waits for the batch in flight (the engine is not shared)."""
        t0 = time.perf_counter()
        with self._cond:
            self._sync_pending = True
            while self._busy:
                if self.partial_rollout and self.side.engine is not None:
                    self.side.engine.abort_requests()
                self._cond.wait(timeout=0.05 if self.partial_rollout else None)
        self._sync_wait = time.perf_counter() - t0
        try:
            stats = self.side.sync_weights(actor_models)
        finally:
            with self._cond:
                self._engine_version, self._sync_pending = version, False
                self._cond.notify_all()
        return stats

    def evaluate(self) -> dict[str, float]:
        """Held-out accuracy (``RolloutSide.evaluate``), with the producer held off the engine."""
        with self._cond:
            self._sync_pending = True
            self._cond.wait_for(lambda: not self._busy)
        try:
            return self.side.evaluate()
        finally:
            with self._cond:
                self._sync_pending = False
                self._cond.notify_all()

    def start(self, version: int) -> None:
        """After a fresh start or a resume at step ``version`` (the engine holds that policy)."""
        self._engine_version = version
        self._next_step = version + 1

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=self.side.rollout_cfg.server_timeout_s)

    # -- checkpointed state (the ``data`` part of ``TrainState``) ------------------------

    def state_dict(self) -> dict:
        return dict(self._cursor)

    def load_state_dict(self, state: dict) -> None:
        assert self._thread is None, "restore before the producer starts"
        self.side.data.load_state_dict(state)
        self._cursor = self.side.data.state_dict()

    # -- the producer (engine holder only) -----------------------------------------------

    def _pop_on_holder(self, step: int):
        if self._thread is None:
            assert self._next_step == step, f"stream started for step {self._next_step}, asked for {step}"
            self._thread = threading.Thread(target=self._produce, name="megappo-rollout-producer", daemon=True)
            self._thread.start()
        with self._cond:
            self._cond.wait_for(lambda: step in self._ready)
            batch, error, cursor, generate_s = self._ready.pop(step)
            fill = (len(self._ready) + 1) / (self.eta + 1)  # before this take: ready batches over the bound
            self._cond.notify_all()
        failed = dp_all_reduce(torch.tensor([0.0 if error is None else 1.0])).tolist()[0]
        raise_if_any_replica_failed(error, failed > 0, self.side.layout)
        self._cursor = cursor
        return batch, fill, generate_s

    def _admitted(self) -> bool:
        """The next batch would train at most eta versions after the engine's weights."""
        return (self._next_step - 1 - self._engine_version) <= self.eta

    def _partial_generate(self, version: int):
        def generate(prompt_ids, params):
            return generate_across_updates(self.side.engine, prompt_ids, params, version=version,
                                           await_update=self._await_update)
        return generate

    def _await_update(self) -> int:
        """In the producer, after a weight sync aborted its requests: hand the engine over,
        wait for the sync to end, take the engine back; the engine's new version."""
        with self._cond:
            self._busy = False
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._stop or not self._sync_pending)
            self._busy = True
            return self._engine_version

    def _produce(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or (self._admitted() and not self._sync_pending))
                if self._stop:
                    return
                step, version, self._busy = self._next_step, self._engine_version, True
            t0 = time.perf_counter()
            batch = error = cursor = None
            try:
                prompts = self.side.data.next_batch()
                cursor = self.side.data.state_dict()
                partial = {"generate": self._partial_generate(version)} if self.partial_rollout else {}
                part = self.side.generate_round(step, 1, prompts, policy_version=version, **partial)
                batch = RolloutBatch.concat([part], stats=RolloutStats(sampling_rounds=0) + part.stats)
            except Exception as e:  # noqa: BLE001 - raised on every rank by the trainer's take()
                error = e
            with self._cond:
                self._ready[step] = (batch, error, cursor, time.perf_counter() - t0)
                self._next_step, self._busy = step + 1, False
                self._cond.notify_all()
                if error is not None:
                    return
