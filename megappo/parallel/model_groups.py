"""A model's own TP x PP layout over the run's ranks: process groups for a model that does not
share the actor's layout (the reward model, ``reward.model.tensor_model_parallel_size`` /
``pipeline_model_parallel_size``), and the exchange of rows between the actor's data-parallel
shards and that model's replicas.

Shape legend: B = rows of this rank's actor data-parallel shard, N = rows of all shards.

Why this works in megatron-core 0.16.1: ``GPTModel``, ``TransformerBlock``, its layers and the
pipeline schedules take a ``ProcessGroupCollection`` (``pg_collection``; the schedules also a
``P2PCommunicator``) and read TP / PP sizes and ranks from it instead of the global
``parallel_state``, which stays the actor's. The layer offset of a pipeline stage comes from
``get_pg_rank(pg_collection.pp)`` (``transformer_layer.py``, ``transformer_block.py``).

Rank order: Megatron's (``parallel_state.RankGenerator``, order ``tp-cp-ep-dp-pp``): TP ranks are
adjacent, then data-parallel replicas, then pipeline stages, as ``initialize_model_parallel``
lays out the actor.

``ModelGroups.pg_collection`` is None for the actor's own layout: a model built without one uses
Megatron's global groups, so a model at the actor's layout is built exactly as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from megappo.parallel.state import get_layout


@dataclass(frozen=True)
class ModelGroups:
    """Where this rank sits in one model's TP x PP x DP grid, and that model's process groups."""

    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    pg_collection: Any = None
    """megatron-core ``ProcessGroupCollection`` (tp, pp, cp, tp_cp, mp, dp, dp_cp, embd,
    pos_embd); None: Megatron's global ``parallel_state`` groups (the actor's layout)."""

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def shares_actor_layout(self) -> bool:
        return self.pg_collection is None

    @property
    def is_replica_leader(self) -> bool:
        """The rank that hands out this replica's results: TP rank 0 of the last stage."""
        return self.tp_rank == 0 and self.is_last_stage


_CACHE: dict[tuple, ModelGroups] = {}


def model_groups(tp: int, pp: int) -> ModelGroups:
    """The groups of a model laid out TP x PP over all ranks. Collective the first time a
    layout other than the actor's is asked for (every rank must call it, in the same order);
    cached per layout. ``ValueError`` naming the sizes when ``tp * pp`` does not divide the
    world size."""
    layout = get_layout()
    if tp < 1 or pp < 1:
        raise ValueError(f"tensor and pipeline parallel sizes must be >= 1, got TP={tp} PP={pp}")
    if (tp, pp) == (layout.tp, layout.pp):
        return ModelGroups(tp=tp, pp=pp, dp=layout.dp, tp_rank=layout.tp_rank, pp_rank=layout.pp_rank, dp_rank=layout.dp_rank)
    if layout.world_size % (tp * pp):
        raise ValueError(
            f"tensor_model_parallel_size {tp} x pipeline_model_parallel_size {pp} = {tp * pp} does not divide "
            f"the world size {layout.world_size}"
        )
    key = (id(dist.group.WORLD), tp, pp)
    if key not in _CACHE:
        _CACHE[key] = _new_groups(tp, pp, layout.world_size)
    return _CACHE[key]


def _new_groups(tp: int, pp: int, world: int) -> ModelGroups:
    from megatron.core.parallel_state import RankGenerator, default_embedding_ranks
    from megatron.core.process_groups_config import ProcessGroupCollection

    dp = world // (tp * pp)
    gen = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    me = dist.get_rank()

    def mine(token: str, ranks_of=lambda r: r):
        """Create every group of ``token`` (collective: all ranks create all of them) and keep
        this rank's, (None, None) when it is in none."""
        found = (None, None)
        for ranks in gen.get_ranks(token):
            ranks = ranks_of(ranks)
            group = dist.new_group(ranks)
            if me in ranks:
                found = (group, ranks)
        return found

    (tp_group, tp_ranks), (pp_group, pp_ranks) = mine("tp"), mine("pp")
    dp_group, dp_ranks = mine("dp")
    mp_group, _ = mine("tp-pp")
    cp_group, _ = mine("cp")
    pgs = ProcessGroupCollection(tp=tp_group, pp=pp_group, mp=mp_group, cp=cp_group, tp_cp=tp_group,
                                 dp=dp_group, dp_cp=dp_group, pos_embd=None)
    # The embedding group ties input and output embeddings across the first and last stage; a
    # model with its own layout here (the reward model) never ties them, but Megatron asks for it.
    pgs.embd, _ = mine("pp", default_embedding_ranks)
    return ModelGroups(tp=tp, pp=pp, dp=dp, tp_rank=tp_ranks.index(me), pp_rank=pp_ranks.index(me),
                       dp_rank=dp_ranks.index(me), pg_collection=pgs)


@dataclass(frozen=True)
class RowShare:
    """How the actor's data-parallel shards' rows were dealt to a model's replicas."""

    shard_sizes: tuple[int, ...]
    """Rows of each actor data-parallel shard, in shard order (their concatenation is the N rows)."""
    bounds: tuple[tuple[int, int], ...]
    """[start, end) of the rows of each replica of the model (by its data-parallel rank)."""


def deal_rows(rows_B: list, groups: ModelGroups) -> tuple[list, RowShare]:
    """Every actor data-parallel shard's rows, concatenated in shard order and cut into
    ``groups.dp`` contiguous, near-equal parts; this rank's replica's part. Collective over all
    ranks. ``rows_B`` must be the same on every rank of one actor shard (its TP and PP ranks):
    the shard's first TP rank of its first stage speaks for it."""
    layout = get_layout()
    speaks = layout.tp_rank == 0 and layout.pp_rank == 0
    gathered = _all_gather_object((layout.dp_rank, list(rows_B)) if speaks else None)
    shards = dict(g for g in gathered if g is not None)
    assert sorted(shards) == list(range(layout.dp)), sorted(shards)
    rows_N = [row for d in range(layout.dp) for row in shards[d]]
    n, k = len(rows_N), groups.dp
    cuts = [n * j // k for j in range(k + 1)]
    bounds = tuple((cuts[j], cuts[j + 1]) for j in range(k))
    start, end = bounds[groups.dp_rank]
    return rows_N[start:end], RowShare(tuple(len(shards[d]) for d in range(layout.dp)), bounds)


def return_results(results: Optional[torch.Tensor], share: RowShare, groups: ModelGroups) -> torch.Tensor:
    """The per-row results [B] of this rank's actor shard, from the replicas that computed them.
    ``results``: this replica's results [its rows] on its leader (``is_replica_leader``), ignored
    elsewhere. Collective over all ranks; the result on the CPU."""
    mine = results.detach().cpu() if groups.is_replica_leader and results is not None else None
    gathered = _all_gather_object((groups.dp_rank, mine) if groups.is_replica_leader else None)
    parts = dict(g for g in gathered if g is not None)
    assert sorted(parts) == list(range(groups.dp)), sorted(parts)
    for j, (start, end) in enumerate(share.bounds):
        got = 0 if parts[j] is None else parts[j].shape[0]
        assert got == end - start, f"replica {j} returned {got} results for {end - start} rows"
    results_N = torch.cat([parts[j] for j in range(groups.dp) if parts[j] is not None])
    dp_rank = get_layout().dp_rank
    first = sum(share.shard_sizes[:dp_rank])
    return results_N[first : first + share.shard_sizes[dp_rank]]


def _all_gather_object(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
