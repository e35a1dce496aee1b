"""Global statistics over the data-parallel group and broadcasts within the model-parallel
group: the only place the trainer's numbers cross ranks (STYLE point 2: ``megappo.algo``
receives the results as arguments).

Shape legend: B = sequences of this data-parallel rank, T = response tokens.

Groups. "Data-parallel group" is Megatron's (ranks with the same TP and PP rank, so each
holds a different share of the batch); "pipeline group" the ranks of one pipeline. Every
function here is collective over the group it names: all its ranks must call it, in the
same order. Before ``init_parallel`` (a plain single process) the functions compute the
local result and communicate nothing.

Devices. NCCL needs CUDA tensors, gloo CPU tensors; inputs are moved to the group's
device for the collective and results returned on the input's device, so callers may
keep their statistics on either.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from megappo.algo.stats import SumReducer, moment_sums, moments_from_sums


def _mpu():
    if not dist.is_initialized():
        return None
    from megatron.core import parallel_state as mpu

    return mpu if mpu.model_parallel_is_initialized() else None


def dp_group():
    """Megatron's data-parallel group, or None before ``init_parallel``."""
    mpu = _mpu()
    return mpu.get_data_parallel_group() if mpu is not None else None


def dp_size() -> int:
    mpu = _mpu()
    return mpu.get_data_parallel_world_size() if mpu is not None else 1


def _group_size(group) -> int:
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _comm_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(x: Tensor, op: str = "sum", group=None) -> Tensor:
    """All-reduce a copy of ``x`` (``op``: sum, max, min) over ``group``; ``x`` is unchanged.

    The copy is made on the group's device and returned on ``x``'s device. Not
    differentiable (statistics only; see ``vocab_parallel`` for autograd-aware reductions).
    """
    if _group_size(group) == 1:
        return x.detach().clone()
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if op not in ops:
        raise ValueError(f"op must be one of {', '.join(ops)}; got {op!r}")
    buf = x.detach().to(_comm_device(group), copy=True)
    dist.all_reduce(buf, op=ops[op], group=group)
    return buf.to(x.device)


def dp_all_reduce(x: Tensor, op: str = "sum") -> Tensor:
    """``all_reduce`` over the data-parallel group."""
    return all_reduce(x, op, dp_group())


def dp_sum_reducer() -> SumReducer:
    """The ``reduce_sums`` callable of ``megappo.algo`` (float64 moment sums, SUM over DP)."""
    return lambda sums: dp_all_reduce(sums.to(torch.float64), "sum")


def global_moment_sums(x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Float64 ``[count, sum, sum_of_squares]`` of the masked elements of ``x`` over all
    data-parallel ranks (``megappo.algo.moment_sums`` all-reduced)."""
    return dp_all_reduce(moment_sums(x, mask), "sum")


def global_masked_mean_var(x: Tensor, mask: Optional[Tensor] = None, *, unbiased: bool = True) -> tuple[Tensor, Tensor]:
    """Mean and variance (Bessel-corrected unless ``unbiased=False``) of the masked elements
    of ``x`` over the global batch; float64 0-dim tensors. Every valid element counts once
    (a per-token statistic when ``x`` is [B, T])."""
    return moments_from_sums(global_moment_sums(x, mask), unbiased=unbiased)


# ---------------------------------------------------------------------------- metrics

def _reduction(key: str, weight_key: str) -> str:
    if key == weight_key or key.endswith("loss"):
        return "sum"
    if key.endswith("_min"):
        return "min"
    if key.endswith("_max"):
        return "max"
    return "mean"


def _float(v) -> float:
    return float(v.detach()) if isinstance(v, Tensor) else float(v)


def reduce_metrics(
    per_microbatch: Sequence[Mapping[str, Any]], *, weight_key: str = "num_tokens_local", group: Any = "dp"
) -> dict[str, float]:
    """Reduce the metric dicts of this rank's micro-batches, then over ``group`` (default
    the data-parallel group), to plain floats.

    Rules, by key:
      - ``weight_key`` (``num_tokens_local``, a count) and keys ending in ``loss``
        (``loss``, ``pg_loss``, ``vf_loss``, ``kl_loss``: each micro-batch's share of the
        batch loss, already divided by global denominators) are summed;
      - keys ending in ``_min`` / ``_max`` take the min / max, ignoring NaN (NaN only if
        every value is);
      - every other key is a mean weighted by ``weight_key`` where the dict has it (so a
        per-micro-batch masked token mean becomes the global masked token mean) and an
        unweighted mean over micro-batches and ranks otherwise.
    Every rank of the group must pass the same keys.
    """
    if group == "dp":
        group = dp_group()
    keys = sorted({k for m in per_microbatch for k in m})
    sums, weights, mins, maxs = [], [], [], []
    kinds = {k: _reduction(k, weight_key) for k in keys}
    for key in keys:
        vals = [(_float(m[key]), _float(m.get(weight_key, 1.0))) for m in per_microbatch if key in m]
        if kinds[key] == "sum":
            sums.append(sum(v for v, _ in vals))
            weights.append(1.0)
        elif kinds[key] == "mean":
            sums.append(sum(v * w for v, w in vals if w > 0))
            weights.append(sum(w for _, w in vals if w > 0))
        elif kinds[key] == "min":
            mins.append(min((v for v, _ in vals if not math.isnan(v)), default=math.inf))
        else:
            maxs.append(max((v for v, _ in vals if not math.isnan(v)), default=-math.inf))
    sw = all_reduce(torch.tensor(sums + weights, dtype=torch.float64), "sum", group).tolist()
    mn = all_reduce(torch.tensor(mins, dtype=torch.float64), "min", group).tolist() if mins else []
    mx = all_reduce(torch.tensor(maxs, dtype=torch.float64), "max", group).tolist() if maxs else []
    n_sum = len(sums)
    out: dict[str, float] = {}
    i_s = i_min = i_max = 0
    for key in keys:
        kind = kinds[key]
        if kind in ("sum", "mean"):
            total, weight = sw[i_s], sw[n_sum + i_s]
            i_s += 1
            out[key] = total if kind == "sum" else (total / weight if weight > 0 else 0.0)
        elif kind == "min":
            out[key] = mn[i_min] if math.isfinite(mn[i_min]) else math.nan
            i_min += 1
        else:
            out[key] = mx[i_max] if math.isfinite(mx[i_max]) else math.nan
            i_max += 1
    return out


# ---------------------------------------------------------------------------- broadcasts

def _pipeline():
    """(group, source global rank, is this rank the last stage) of this rank's pipeline;
    None when there is no pipeline parallelism."""
    mpu = _mpu()
    if mpu is None or mpu.get_pipeline_model_parallel_world_size() == 1:
        return None
    return (
        mpu.get_pipeline_model_parallel_group(),
        mpu.get_pipeline_model_parallel_last_rank(),
        mpu.is_pipeline_last_stage(ignore_virtual=True),
    )


def broadcast_from_last_stage(
    tensors: Optional[dict[str, Tensor]], shapes: Mapping[str, tuple], *, dtype=torch.float32, device=None
) -> dict[str, Tensor]:
    """Per-token outputs computed on the last pipeline stage, on every stage of the pipeline.

    The last stage passes ``tensors`` (names as in ``shapes``); the other stages pass None
    and receive tensors of ``shapes`` and ``dtype``, on ``device`` (default: the
    communication device). Without pipeline parallelism ``tensors`` is returned as is.
    Tensor-parallel ranks need nothing: their vocab-parallel results are already equal.
    """
    pipe = _pipeline()
    if pipe is None:
        assert tensors is not None
        return tensors
    group, src, is_last = pipe
    comm = _comm_device(group)
    out = {}
    for name in sorted(shapes):
        if is_last:
            buf = tensors[name].detach().to(device=comm, dtype=dtype).contiguous()
        else:
            buf = torch.empty(shapes[name], dtype=dtype, device=comm)
        dist.broadcast(buf, src=src, group=group)
        out[name] = buf if device is None else buf.to(device)
    return out


def broadcast_object_from_last_stage(obj: Any) -> Any:
    """A small picklable object (a metrics dict) from the last pipeline stage to every
    stage; the other stages' argument is ignored."""
    pipe = _pipeline()
    if pipe is None:
        return obj
    group, src, is_last = pipe
    box = [obj if is_last else None]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]
