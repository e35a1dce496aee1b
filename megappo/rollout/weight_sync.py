"""Weight sync: the actor's Megatron shards -> full HF-named tensors -> the rollout engine.

Per data-parallel replica (one engine each, held by its tp0/pp0 rank):
  1. Every pipeline stage's TP group runs ``megappo.weights.iter_hf_tensors(dst=0)`` (a TP
     collective gathering that stage's full tensors, global layer numbers, to TP rank 0
     only: the ranks that talk to the engine; the other TP ranks send their shards and
     build nothing).
  2. The holder streams its own stage's tensors into the engine; stage k > 0's TP rank 0
     sends its tensors to the holder with ``torch.distributed`` send/recv (a pickled header
     of names, dtypes and shapes per bucket, then one message per tensor), stage after
     stage. Plain send/recv, so it runs on gloo too. After each bucket the sender waits for
     the holder's acknowledgement (a one-element message sent once the bucket's last
     tensor has arrived) before it gathers the next: NCCL's send does not block the sender,
     so without it a whole stage could be gathered and queued at once.
  3. The holder groups the stream into buckets of about ``bucket_mb`` MiB (a tensor larger
     than that is a bucket of its own) and hands them to ``engine.update_weights``.

Memory: a bucket lives until the engine asks for the next one (the list is cleared then),
so the extra memory of a sync is about one bucket plus the tensor being gathered, on the
holder and on each sender (the acknowledgement bounds a sender to one bucket in flight). A replica whose engine does not take weights
(``RolloutEngine.receives_weights`` False: SGLang servers fed by replica 0) skips the sync.
If the engine fails half-way, the holder still drains the stream so the senders finish;
the closing all-reduce over all ranks then tells every rank, and every rank raises
``RolloutEngineError`` (the holder its own, the others one quoting the failed engines).

``checksum=True``: the holder also computes the checksum of what it delivers over the
scope of ``engine.weights_checksum`` (every weight, or the engine's spot-check), so
``SyncStats.checksum`` compares with the engine's reading.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from megappo.parallel.collectives import all_reduce
from megappo.rollout.engine import RolloutEngine, RolloutEngineError, combine_checksums, spot_checksum, tensor_checksum
from megappo.rollout.group import failures_in_group, holder_rank, holds_engine, model_parallel_group
from megappo.weights import iter_hf_tensors

if TYPE_CHECKING:
    from megappo.parallel.state import ParallelLayout

NamedTensors = Iterable[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class SyncStats:
    """One sync as this rank saw it: on the holder the bytes the engine received, on a
    sending stage the bytes it sent, elsewhere 0."""

    seconds: float
    bytes: int
    gbps: float
    """Bytes per second / 1e9 over the whole sync (gather, transfer and load)."""
    num_buckets: int
    checksum: Optional[float] = None
    """``checksum_of`` the delivered tensors over the engine's checksum scope (holder only,
    when asked for): compare with ``engine.weights_checksum()``."""
    peak_bucket_bytes: int = 0
    """The largest bucket assembled (the sync's extra memory is about this)."""


def iter_buckets(named_tensors: NamedTensors, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of at most ``bucket_bytes`` (or one larger tensor). A yielded list
    is emptied when the next bucket is requested, so the consumer holds one at a time."""
    if bucket_bytes <= 0:
        raise ValueError(f"the weight-sync bucket size must be > 0 bytes, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket.clear()
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket
        bucket.clear()


class _Meter:
    """Counts what passes through a bucket stream (bytes, buckets, largest, checksum terms:
    of whole tensors, or of their first rows when ``spot``)."""

    def __init__(self, checksum: bool, spot: bool = False):
        self.bytes = self.num_buckets = self.peak = 0
        self.terms: Optional[dict[str, float]] = {} if checksum else None
        self.term = spot_checksum if spot else tensor_checksum

    def watch(self, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> Iterator[list[tuple[str, torch.Tensor]]]:
        for bucket in buckets:
            size = sum(t.numel() * t.element_size() for _, t in bucket)
            self.bytes += size
            self.num_buckets += 1
            self.peak = max(self.peak, size)
            if self.terms is not None:
                for name, t in bucket:
                    if name in self.terms:
                        raise RolloutEngineError(f"weight sync: tensor {name!r} was sent twice")
                    self.terms[name] = self.term(name, t)
            yield bucket

    def stats(self, seconds: float, scope: Optional[Sequence[str]] = None) -> SyncStats:
        """``scope``: the names the checksum covers (None: all that passed)."""
        terms = self.terms
        if terms is not None and scope is not None:
            missing = [n for n in scope if n not in terms]
            if missing:
                raise RolloutEngineError(f"weight sync: the engine spot-checks {missing}, which this sync did not send")
            terms = {n: terms[n] for n in scope}
        checksum = combine_checksums(terms) if terms is not None else None
        gbps = self.bytes / seconds / 1e9 if seconds > 0 else 0.0
        return SyncStats(seconds, self.bytes, gbps, self.num_buckets, checksum, self.peak)


def stream_to_engine(
    named_tensors: NamedTensors, engine: RolloutEngine, *, bucket_mb: float, checksum: bool = False
) -> SyncStats:
    """Bucket ``named_tensors`` into ``engine.update_weights`` (one process, no groups).

    The stream is always consumed to its end (so peers feeding it finish) before an
    engine error is raised; an engine that returns before the end is an error too.
    """
    start = time.perf_counter()
    meter = _Meter(checksum, spot=engine.spot_checked)
    buckets = meter.watch(iter_buckets(named_tensors, int(bucket_mb * 2**20)))
    try:
        engine.update_weights(buckets)
    except BaseException:
        _drain(buckets)
        raise
    if _drain(buckets):
        raise RolloutEngineError(f"{engine.name}: update_weights returned before the end of the weight stream")
    return meter.stats(time.perf_counter() - start, engine.checksum_scope() if checksum and engine.spot_checked else None)


def _drain(buckets: Iterator) -> int:
    return sum(1 for _ in buckets)


def sync_weights(
    policy_models: Sequence,
    engine: Optional[RolloutEngine],
    layout: "ParallelLayout",
    *,
    bucket_mb: float,
    checksum: bool = False,
) -> SyncStats:
    """Send the actor's weights to this replica's engine (module docstring). Every rank
    calls it with its model chunks; ``engine`` is None except on the holder."""

    start = time.perf_counter()
    is_holder = holds_engine(layout)
    if is_holder != (engine is not None):
        raise ValueError(f"rank {layout.rank}: the engine must be passed exactly on the tp0/pp0 rank of each replica")
    error: Optional[BaseException] = None
    stats = SyncStats(0.0, 0, 0.0, 0)
    if _replica_takes_weights(engine, layout):
        own = iter_hf_tensors(policy_models, dst=0)
        if is_holder:
            stages = [own] + [_receive_stage(_stage_rank(layout, k), layout.device) for k in range(1, layout.pp)]
            try:
                stats = stream_to_engine(itertools.chain(*stages), engine, bucket_mb=bucket_mb, checksum=checksum)
            except Exception as e:  # noqa: BLE001 - raised after the closing all-reduce
                error = e
        elif layout.tp_rank == 0:
            stats = _send_stage(own, _first_stage_rank(), int(bucket_mb * 2**20), start, layout.device)
        else:
            _drain(iter(own))  # takes part in the gathers; receives nothing
    _raise_on_every_rank(error, layout)
    return stats


def _raise_on_every_rank(error: Optional[BaseException], layout: "ParallelLayout") -> None:
    """The closing collective of a sync (over all ranks): when any holder failed, every
    rank raises; the holder its own error, the others a ``RolloutEngineError`` quoting all."""

    if layout.world_size > 1:
        failed = all_reduce(torch.tensor([0.0 if error is None else 1.0]), "max", dist.group.WORLD)
        if failed.item() > 0:
            quoted = failures_in_group(error, dist.group.WORLD, "rank")
            if error is None:
                raise RolloutEngineError(f"weight sync failed on {quoted}")
    if error is not None:
        raise error


def _replica_takes_weights(engine: Optional[RolloutEngine], layout: "ParallelLayout") -> bool:
    """The holder's ``engine.receives_weights``, known to every rank of the replica."""
    takes = bool(engine.receives_weights) if engine is not None else False
    group = model_parallel_group(layout)
    if group is None:
        return takes
    flag = torch.tensor([1 if takes else 0], dtype=torch.int32, device=layout.device)
    dist.broadcast(flag, src=holder_rank(layout), group=group)
    return bool(flag.item())


def _stage_rank(layout: "ParallelLayout", stage: int) -> int:
    from megatron.core import parallel_state as mpu

    return dist.get_global_rank(mpu.get_pipeline_model_parallel_group(), stage)


def _first_stage_rank() -> int:
    from megatron.core import parallel_state as mpu

    return mpu.get_pipeline_model_parallel_first_rank()


def _send_stage(
    named_tensors: NamedTensors, dst: int, bucket_bytes: int, start: float, device: torch.device
) -> SyncStats:
    meter = _Meter(checksum=False)
    ack = torch.zeros(1, dtype=torch.int32, device=device)
    for bucket in meter.watch(iter_buckets(named_tensors, bucket_bytes)):
        header = [[(name, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for name, t in bucket]]
        dist.send_object_list(header, dst=dst)
        for _, t in bucket:
            dist.send(t.contiguous(), dst=dst)
        dist.recv(ack, src=dst)
        # .item() blocks the host until the ack has arrived (on NCCL, recv only orders the
        # stream), so the next bucket is not gathered while this one is still queued.
        ack.item()
    dist.send_object_list([None], dst=dst)
    return meter.stats(time.perf_counter() - start)


def _receive_stage(src: int, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors ``_send_stage`` sends from ``src``, one at a time, until its end marker."""
    while True:
        header: list = [None]
        dist.recv_object_list(header, src=src)
        if header[0] is None:
            return
        last = len(header[0]) - 1
        for i, (name, dtype, shape) in enumerate(header[0]):
            t = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
            dist.recv(t, src=src)
            if i == last:  # the whole bucket is here: the sender may gather the next one
                dist.send(torch.ones(1, dtype=torch.int32, device=device), dst=src)
            yield name, t
