"""Where the engine sits in the process grid, how its results reach the other ranks, and
how its failures reach every rank.

One engine per model-parallel group (the TP x PP ranks of one data-parallel replica), held
by the group's rank with tp_rank == 0 and pp_rank == 0. Each replica generates its own
data-parallel shard of prompts; every rank of the replica then needs the same rollouts,
so ``run_on_holder`` broadcasts them from the holder. Ranks without an engine pass
None; the trainer calls the same function everywhere.

Failures never leave a rank waiting in a collective:
  - within a replica, ``run_on_holder`` broadcasts the holder's error instead of its
    result, and every rank of the replica raises ``RolloutEngineError``;
  - across replicas, holders that run collectives among themselves between generations
    (dynamic sampling's rounds, evaluation's counts) put a failure flag into the same
    all-reduce and call ``raise_if_any_replica_failed``, so every holder raises before
    the next data-parallel collective, and then every rank through ``run_on_holder``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Sequence, TypeVar

import torch.distributed as dist

from megappo.parallel.collectives import dp_group
from megappo.rollout.engine import RolloutEngine, RolloutEngineError, Sample, SamplingParams

if TYPE_CHECKING:
    from megappo.parallel.state import ParallelLayout

T = TypeVar("T")


def holds_engine(layout: "ParallelLayout") -> bool:
    """This rank holds its replica's engine (tp_rank == 0 and pp_rank == 0)."""
    return layout.tp_rank == 0 and layout.pp_rank == 0


def model_parallel_group(layout: "ParallelLayout"):
    """The TP x PP group of this replica, or None in a replica of one rank."""
    if layout.tp * layout.pp == 1:
        return None
    from megatron.core import parallel_state as mpu

    return mpu.get_model_parallel_group()


def holder_rank(layout: "ParallelLayout") -> int:
    """Global rank of this replica's engine holder (the lowest rank of the TP x PP group)."""
    group = model_parallel_group(layout)
    return layout.rank if group is None else dist.get_global_rank(group, 0)


def _describe(error: BaseException) -> str:
    """An engine error's own message (it names the engine); others with their type."""
    return str(error) if isinstance(error, RolloutEngineError) else f"{type(error).__name__}: {error}"


def run_on_holder(work: Callable[[], T], layout: "ParallelLayout") -> T:
    """``work()`` on this replica's engine holder, its result on every rank of the replica
    (the other ranks do not call ``work``; it must return a picklable value).

    When ``work`` raises on the holder, the holder broadcasts the error instead, and every
    rank of the replica raises: the holder its ``RolloutEngineError`` as is (any other
    exception wrapped in one, chained), the others a ``RolloutEngineError`` that names the
    holder and quotes its message. Collective over the replica's model-parallel group.
    """
    group = model_parallel_group(layout)
    is_holder = holds_engine(layout)
    payload: list = [None]
    error: Optional[BaseException] = None
    if is_holder:
        try:
            payload[0] = ("ok", work())
        except Exception as e:  # noqa: BLE001 - re-raised below on every rank
            error = e
            payload[0] = ("error", _describe(e))
    if group is not None:
        src = holder_rank(layout)
        assert (src == layout.rank) == is_holder, (src, layout)
        dist.broadcast_object_list(payload, src=src, group=group)
    status, value = payload[0]
    if status == "ok":
        return value
    if isinstance(error, RolloutEngineError):
        raise error
    message = f"rollout on rank {holder_rank(layout)} (data-parallel replica {layout.dp_rank}) failed: {value}"
    raise RolloutEngineError(message) from error


def raise_if_any_replica_failed(error: Optional[BaseException], any_failed: bool, layout: "ParallelLayout") -> None:
    """Among the engine holders of all replicas (Megatron's data-parallel group of the
    tp0/pp0 ranks), after an all-reduce that told every holder whether one failed
    (``any_failed``, the same on all): raise on every holder, naming the failed replicas
    and quoting their errors (``error`` this holder's, or None). Collective over that
    group when ``any_failed``; a no-op otherwise."""
    if not any_failed:
        return

    group = dp_group()
    if group is None or dist.get_world_size(group) == 1:
        assert error is not None
        raise error
    raise RolloutEngineError(f"rollout failed: {failures_in_group(error, group, 'data-parallel replica')}") from error


def failures_in_group(error: Optional[BaseException], group, label: str) -> str:
    """``"{label} i: message; ..."`` for every member ``i`` of ``group`` whose ``error`` is
    not None (``error``: this rank's, or None). Collective over ``group``: call it on every
    member once an all-reduce has told them all that one failed."""
    messages: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(messages, None if error is None else _describe(error), group=group)
    return "; ".join(f"{label} {i}: {m}" for i, m in enumerate(messages) if m is not None)


def generate_in_group(
    engine: Optional[RolloutEngine],
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    layout: "ParallelLayout",
) -> list[list[Sample]]:
    """Generate on the holder and give every rank of the replica the same samples; a
    failure raises ``RolloutEngineError`` on every rank (``run_on_holder``)."""
    assert holds_engine(layout) == (engine is not None), "exactly the (tp0, pp0) rank of a replica holds an engine"
    return run_on_holder(lambda: engine.generate(prompts, params), layout)
