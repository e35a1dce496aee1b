"""A rollout engine on a rank of its own (``parallel.rollout_world_size``): ``RemoteEngine`` on
the trainer side, ``serve`` on the rollout rank.

Each data-parallel replica's engine holder (tp0/pp0 trainer rank) holds a ``RemoteEngine``
that forwards every call of the ``RolloutEngine`` interface to rollout rank N - R + replica,
where ``serve`` runs the engine ``build_engine`` makes from the same ``rollout`` config
(the embedded engine, or SGLang on the rank's own GPU) and answers. Everything above the
interface (``RolloutSide``, ``RolloutStream``'s producer thread, partial rollouts, the weights
checksum) runs unchanged; in the asynchronous modes the rollout rank generates while the
trainer trains, on hardware of its own.

The link of one replica (``_Link``) has two channels:
  - commands and results, pickled, through keys of the launch's store under
    ``rollout/{replica}/`` (``cmd/{seq}`` -> ``res/{seq}``): small, and any number may
    be outstanding, so a partial rollout's ``abort_requests`` from the trainer's main thread
    is answered while the producer thread's ``generate`` runs (the server runs each
    ``generate`` in a thread of its own and every other command in order);
  - weight tensors through a two-rank process group (gloo on CPU, NCCL on GPU), bucket by
    bucket as ``megappo.rollout.weight_sync`` streams them: a header per bucket (names,
    dtypes, shapes) through the store, then its tensors, each received into a new tensor and
    handed to the engine's ``update_weights``; a bucket is dropped when the engine asks for
    the next, so each side holds about one bucket (the bounded memory of a colocated sync).

Failures: every wait checks the peer's heartbeat (``megappo.parallel.placement``), so a
rollout rank that was killed or hangs becomes, within ``parallel.rollout_timeout_s``, a
``RolloutEngineError`` naming its rank and host on the holder, and through the rollout
side's failure flags on every trainer rank; later calls fail at once. An engine error on
the rollout rank comes back as a ``RolloutEngineError`` quoting it. The server exits when
the trainer says ``shutdown`` (the end of the run), and when the trainer ranks it watches
(rank 0 and its replica's holder) exit or stop beating; a preemption signal (SIGTERM,
SIGUSR1) it only logs, since the trainer finishes its step and checkpoints before it ends.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import signal
import socket
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from megappo.parallel.placement import Placement, PeerLost, poll, set_cpu_threads
from megappo.parallel.state import ParallelLayout, resolve_device
from megappo.rollout.engine import (
    Bucket,
    PauseMode,
    Progress,
    RolloutEngine,
    RolloutEngineError,
    Sample,
    SamplingParams,
    build_engine,
)

if TYPE_CHECKING:
    from megappo.config.schema import Config

log = logging.getLogger("megappo")

TRAINER, ROLLOUT = 0, 1
"""Ranks within a link's two-rank process group."""
_COMMANDS = frozenset({"generate", "update_weights", "weights_checksum", "checksum_scope", "pause_generation",
                       "continue_generation", "abort_requests", "health", "shutdown"})


class _Link:
    """One replica's channel between its holder and its rollout rank (module docstring)."""

    def __init__(self, placement: Placement, replica: int, watched: Sequence[int]):
        self.placement, self.replica = placement, replica
        self.prefix = f"rollout/{replica}/"
        self.store = placement.prefixed(self.prefix)
        self.watch = placement.watch(watched)
        self.group = None
        self.device = torch.device("cpu")

    def send(self, key: str, obj: Any) -> None:
        self.store.set(key, pickle.dumps(obj))

    def recv(self, key: str, cancelled: Callable[[], bool] = lambda: False) -> Any:
        """Raises ``PeerLost`` when a watched rank is gone first; None when cancelled."""
        value = poll(self.store, key, self.watch, cancelled=cancelled)
        return None if value is None else pickle.loads(value)

    def open_group(self, rank: int, device: torch.device) -> None:
        """The two-rank group for tensors: NCCL between GPUs, else gloo (both sides call it)."""
        timeout = datetime.timedelta(seconds=self.placement.timeout_s)
        store = self.placement.new_client(self.prefix + "group/")
        self.device = device
        if device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.group = dist.ProcessGroupNCCL(store, rank, 2, options)
        else:
            self.group = dist.ProcessGroupGloo(store, rank, 2, timeout)

    def send_tensor(self, tensor: torch.Tensor) -> None:
        self.group.send([tensor.detach().to(self.device).contiguous()], ROLLOUT, 0).wait()

    def recv_tensor(self, dtype: str, shape: tuple) -> torch.Tensor:
        t = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
        self.group.recv([t], TRAINER, 0).wait()
        return t


# ---- the trainer side -------------------------------------------------------------------


class RemoteEngine(RolloutEngine):
    """The ``RolloutEngine`` of a rollout rank, called from its replica's holder."""

    def __init__(self, link: _Link, ready: dict):
        self.link = link
        self.rank = link.placement.rollout_rank(link.replica)
        self.name = f"{ready['engine']} on rollout rank {self.rank} ({ready['host']})"
        self.spot_checked = bool(ready["spot_checked"])
        self._lock = threading.Lock()
        self._seq = 0
        self._lost: Optional[str] = None
        self._closed = False

    @classmethod
    def connect(cls, placement: Placement, *, replica: int, spec: dict, device: torch.device) -> "RemoteEngine":
        """Hand rollout rank N - R + ``replica`` what it builds its engine from (``spec``:
        ``hf_config``, ``hf_dir``, ``eos_token_ids``, ``seed``), wait until it has, open the
        tensor group. ``RolloutEngineError`` naming the rank when it fails or is gone."""
        rank = placement.rollout_rank(replica)
        link = _Link(placement, replica, [rank])
        link.send("spec", dict(spec, holder=placement.rank))
        try:
            ready = link.recv("ready")
        except PeerLost as e:
            raise RolloutEngineError(f"rollout rank {rank} never became ready: {e}") from e
        if "error" in ready:
            raise RolloutEngineError(f"rollout rank {rank} ({ready['host']}) could not build its engine: {ready['error']}")
        link.open_group(TRAINER, device if device.type == "cuda" else torch.device("cpu"))
        log.info("replica %d: rollout on %s", replica, f"{ready['engine']} on rollout rank {rank} ({ready['host']})")
        return cls(link, ready)

    def _post(self, op: str, *args) -> int:
        if self._lost is not None:
            raise RolloutEngineError(self._lost)
        with self._lock:
            seq, self._seq = self._seq, self._seq + 1
            self.link.send(f"cmd/{seq}", (op, args))
        return seq

    def _result(self, seq: int) -> Any:
        try:
            status, value = self.link.recv(f"res/{seq}")
        except PeerLost as e:
            self._lost = f"rollout {e} ({self.name})"
            raise RolloutEngineError(self._lost) from e
        if status == "error":
            raise RolloutEngineError(f"{self.name}: {value}")
        return value

    def _call(self, op: str, *args) -> Any:
        return self._result(self._post(op, *args))

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, on_progress: Optional[Progress] = None
    ) -> list[list[Sample]]:
        samples = self._call("generate", [list(p) for p in prompts], params)
        if on_progress is not None:
            on_progress(len(prompts))
        return samples

    def update_weights(self, buckets: Iterable[Bucket]) -> None:
        seq = self._post("update_weights")
        stream, k = iter(buckets), 0
        while True:
            try:
                bucket = next(stream, None)
            except BaseException:  # the trainer's side failed: the server abandons the update
                self.link.send(f"w/{seq}/{k}", "abort")
                try:
                    self._result(seq)
                except RolloutEngineError:
                    pass
                raise
            self.link.send(f"w/{seq}/{k}", None if bucket is None else
                           [(n, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for n, t in bucket])
            if bucket is None:
                break
            for _, t in bucket:
                try:
                    self.link.send_tensor(t)
                except RuntimeError as e:  # the group's error (peer closed, timed out): say who and why
                    try:
                        self.link.watch.check()
                        self._lost = f"{self.name}: sending weights failed: {e}"
                    except PeerLost as lost:
                        self._lost = f"rollout {lost} ({self.name})"
                    raise RolloutEngineError(self._lost) from e
            k += 1
        self._result(seq)

    def weights_checksum(self) -> float:
        return self._call("weights_checksum")

    def checksum_scope(self) -> Optional[tuple[str, ...]]:
        return self._call("checksum_scope")

    def pause_generation(self, mode: PauseMode = "retract") -> None:
        self._call("pause_generation", mode)

    def continue_generation(self) -> None:
        self._call("continue_generation")

    def abort_requests(self) -> None:
        self._call("abort_requests")

    def health(self) -> None:
        self._call("health")

    # release_memory / resume_memory: no-ops (inherited): the rollout rank's device is its own.

    def shutdown(self) -> None:
        """Tell the server to stop its engine and exit; idempotent, quiet when it is gone."""
        if self._closed or self._lost is not None:
            return
        self._closed = True
        try:
            self._call("shutdown")
        except RolloutEngineError as e:
            log.warning("%s", e)


# ---- the rollout rank ---------------------------------------------------------------------


def serve(cfg: "Config", placement: Placement) -> int:
    """The rollout rank's program: build the engine from the holder's spec, answer its
    commands until ``shutdown`` (exit status 0) or until the trainer is gone (1)."""
    replica, rank = placement.replica, placement.rank
    link = _Link(placement, replica, [0])
    host = f"{socket.gethostname()} (pid {os.getpid()})"
    try:
        spec = link.recv("spec")
        link.watch = placement.watch(sorted({0, spec["holder"]}))
        layout = _rollout_layout(placement, resolve_device(cfg.parallel.device))
        engine = build_engine(cfg.rollout, hf_config=spec["hf_config"], hf_dir=spec["hf_dir"], layout=layout,
                              eos_token_ids=spec["eos_token_ids"], seed=spec["seed"])
    except PeerLost as e:
        log.error("rollout rank %d: the trainer is gone before the run started: %s", rank, e)
        return 1
    except Exception as e:  # noqa: BLE001 - reported to the holder, which raises it
        link.send("ready", {"error": f"{type(e).__name__}: {e}", "host": host})
        raise
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGUSR1, signal.SIGTERM):  # preemption: the trainer checkpoints, then says shutdown
            signal.signal(sig, lambda signum, frame: log.warning(
                "rollout rank %d: signal %d; serving until the trainer has checkpointed and shuts it down", rank, signum))
    link.send("ready", {"engine": engine.name, "host": host, "spot_checked": engine.spot_checked})
    link.open_group(ROLLOUT, layout.device if layout.device.type == "cuda" else torch.device("cpu"))
    log.info("rollout rank %d serves data-parallel replica %d with %s", rank, replica, engine.name)
    return _Server(engine, link).run()


def _rollout_layout(placement: Placement, device: torch.device) -> ParallelLayout:
    """The rollout rank as a one-rank model-parallel group (its engine has TP 1 on its GPU)."""
    if device.type == "cuda":
        device = torch.device("cuda", placement.local_rank)
        torch.cuda.set_device(device)
    else:
        set_cpu_threads()  # its share of the cores, as a trainer rank takes its own
    return ParallelLayout(rank=placement.rank, world_size=placement.rollout_world_size, local_rank=placement.local_rank,
                          tp=1, pp=1, dp=placement.rollout_world_size, tp_rank=0, pp_rank=0, dp_rank=placement.replica,
                          vpp=None, device=device)


class _Server:
    def __init__(self, engine: RolloutEngine, link: _Link):
        self.engine, self.link = engine, link
        self._gone = threading.Event()

    def run(self) -> int:
        seq = 0
        try:
            while True:
                op, args = self.link.recv(f"cmd/{seq}")
                if op not in _COMMANDS:
                    self._reply(seq, _refuse(op))
                elif op == "generate":
                    threading.Thread(target=self._reply, args=(seq, self.engine.generate, *args), daemon=True,
                                     name=f"megappo-remote-generate-{seq}").start()
                elif op == "update_weights":
                    self._reply(seq, self._update_weights, seq)
                else:
                    self._reply(seq, getattr(self.engine, op), *args)
                    if op == "shutdown":
                        return 0
                seq += 1
        except PeerLost as e:
            log.error("rollout rank %d: the trainer is gone (%s); stopping", self.link.placement.rank, e)
            self._gone.set()
            self.engine.shutdown()
            return 1

    def _reply(self, seq: int, fn: Callable, *args) -> None:
        try:
            result = ("ok", fn(*args))
        except PeerLost:
            raise
        except Exception as e:  # noqa: BLE001 - the holder raises it as a RolloutEngineError
            result = ("error", str(e) if isinstance(e, RolloutEngineError) else f"{type(e).__name__}: {e}")
        try:
            self.link.send(f"res/{seq}", result)
        except Exception:  # noqa: BLE001 - the store is gone with the trainer; run() notices
            pass

    def _update_weights(self, seq: int) -> None:
        buckets = self._buckets(seq)
        try:
            self.engine.update_weights(buckets)
        finally:  # consume the stream to its end so the trainer's sends complete
            drained = _drain(buckets)
        if drained:
            raise RolloutEngineError(f"{self.engine.name}: update_weights returned before the end of the weight stream")

    def _buckets(self, seq: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
        k = 0
        while True:
            header = self.link.recv(f"w/{seq}/{k}")
            if header is None:
                return
            if header == "abort":
                raise RolloutEngineError("the trainer abandoned the weight update half-way")
            bucket = [(name, self.link.recv_tensor(dtype, shape)) for name, dtype, shape in header]
            yield bucket
            bucket.clear()
            k += 1


def _drain(buckets: Iterator) -> int:
    n = 0
    try:
        for _ in buckets:
            n += 1
    except RolloutEngineError:
        pass
    return n


def _refuse(op: str) -> Callable[[], None]:
    def refuse():
        raise RolloutEngineError(f"unknown command {op!r}")
    return refuse
