"""Where the engine sits in the process grid, and how its results reach the other ranks.

One engine per model-parallel group (the TP x PP ranks of one data-parallel replica), held
by the group's rank with tp_rank == 0 and pp_rank == 0. Each replica generates its own
data-parallel shard of prompts; every rank of the replica then needs the same rollouts,
so ``generate_in_group`` broadcasts them from the holder. Ranks without an engine pass
None; the trainer calls the same function everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import torch.distributed as dist

from megappo.rollout.engine import RolloutEngine, RolloutEngineError, Sample, SamplingParams

if TYPE_CHECKING:
    from megappo.parallel.state import ParallelLayout


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


def generate_in_group(
    engine: Optional[RolloutEngine],
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    layout: "ParallelLayout",
) -> list[list[Sample]]:
    """Generate on the holder and give every rank of the replica the same samples.

    A failure on the holder is broadcast too, so the other ranks raise the same
    ``RolloutEngineError`` instead of waiting in the broadcast.
    """
    group = model_parallel_group(layout)
    is_holder = holds_engine(layout)
    assert is_holder == (engine is not None), "exactly the (tp0, pp0) rank of a replica holds an engine"
    payload: list = [None]
    error: Optional[BaseException] = None
    if is_holder:
        try:
            payload[0] = ("ok", engine.generate(prompts, params))
        except Exception as e:  # noqa: BLE001 - re-raised below on every rank
            error = e
            payload[0] = ("error", f"{type(e).__name__}: {e}")
    if group is not None:
        src = holder_rank(layout)
        assert (src == layout.rank) == is_holder, (src, layout)
        dist.broadcast_object_list(payload, src=src, group=group)
    if error is not None:
        raise error
    status, value = payload[0]
    if status == "error":
        raise RolloutEngineError(f"rollout engine of this replica (rank {holder_rank(layout)}) failed: {value}")
    return value
