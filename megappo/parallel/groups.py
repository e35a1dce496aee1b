"""The process groups the RL loop reduces over, named by what they mean to it.

- data-parallel group: ranks holding different prompts with the same model shard; global
  batch statistics are sums over it.
- model-parallel group: the TP x PP ranks of one data-parallel replica; they share one
  rollout engine, which lives on the group's first rank (TP rank 0, PP stage 0).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _mpu():
    from megatron.core import parallel_state

    return parallel_state


def dp_group():
    return _mpu().get_data_parallel_group()


def mp_group():
    return _mpu().get_model_parallel_group()


def engine_rank() -> int:
    """Global rank of the rollout-engine rank of this rank's model-parallel group."""
    return dist.get_process_group_ranks(mp_group())[0]


def is_engine_rank() -> bool:
    return dist.get_rank() == engine_rank()


def dp_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the data-parallel group (a new tensor; the input is unchanged)."""
    out = x.detach().clone()
    if dist.is_initialized() and dist.get_world_size(dp_group()) > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=dp_group())
    return out


def dp_max(x: torch.Tensor) -> torch.Tensor:
    out = x.detach().clone()
    if dist.is_initialized() and dist.get_world_size(dp_group()) > 1:
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=dp_group())
    return out


def world_any(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (e.g. a preemption signal)."""
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def dp_mean_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Average scalar metrics over data-parallel ranks (same keys on every rank)."""
    if not metrics or not dist.is_initialized() or dist.get_world_size(dp_group()) == 1:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=dp_group())
    t /= dist.get_world_size(dp_group())
    return dict(zip(keys, t.tolist()))


# The engine ranks of all replicas form one data-parallel group (TP rank 0, PP stage 0),
# so these reductions are called on engine ranks only.


def all_engines_done(done: bool) -> bool:
    """True when every replica's engine rank says ``done`` (dynamic sampling rounds)."""
    t = torch.tensor([1.0 if done else 0.0])
    if dist.is_initialized() and dist.get_world_size(dp_group()) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=dp_group())
    return bool(t.item() > 0)


def engines_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the engine ranks of all replicas."""
    return dp_sum(x)
