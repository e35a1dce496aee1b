"""Training machinery around the model chunks: Megatron DDP (gradient buckets), the
Megatron optimizer (Adam, optionally distributed), the learning-rate schedule, and the one
function that scales the loss Megatron back-propagates (STYLE point 9).

Loss scaling, once. ``MegatronPolicy.train_step`` asks the trainer's ``loss_fn`` for each
micro-batch's share of the *global* batch loss (already divided by the global token or
sequence count, ``megappo.algo.aggregate_loss``), so the batch loss is the plain sum of
``loss_fn`` over all micro-batches of all data-parallel ranks. Megatron then changes that
sum in two places:
  1. ``schedules.forward_step_calc_loss`` divides every micro-batch loss by the number of
     micro-batches (the two-value ``loss_func`` path; with context parallelism it also
     multiplies by the CP size, which DDP divides out again);
  2. DDP scales gradients by 1 / (data-parallel size) before summing them over ranks
     (``gradient_scaling_factor``, ``average_in_collective=False``).
``loss_scale_factor`` returns the number that undoes both, so that after the gradient
all-reduce every rank holds d(batch loss)/d(params); it is applied in one place
(``MegatronPolicy._loss_func``) and unit-tested in ``tests/test_models_units.py``.
Tensor and pipeline parallelism need no factor: the loss is replicated on TP ranks and
lives on the last stage only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional

import torch

from megappo.config.passthrough import DDP, OPTIMIZER, check_megatron_section
from megappo.models.builder import ddp_fp8_fields

log = logging.getLogger("megappo")


def loss_scale_factor(num_microbatches: int, dp_size: int) -> float:
    """The factor each micro-batch's ``loss_fn`` value is multiplied by before Megatron
    back-propagates it: ``num_microbatches * dp_size`` (see the module docstring)."""
    if num_microbatches < 1 or dp_size < 1:
        raise ValueError(f"need num_microbatches >= 1 and dp_size >= 1, got {num_microbatches}, {dp_size}")
    return float(num_microbatches * dp_size)


@dataclass(frozen=True)
class OptimizerSettings:
    """Optimizer and schedule of one trainable model (from ``cfg.optim`` / ``cfg.parallel``)."""

    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    lr_warmup_steps: int = 0
    lr_decay_style: Literal["constant", "cosine"] = "constant"
    lr_decay_steps: Optional[int] = None
    """Optimizer steps of the cosine decay (after which ``min_lr`` holds); required for cosine."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state (and fp32 master weights) over data-parallel ranks."""
    megatron: Mapping[str, Any] = field(default_factory=dict)
    """Extra ``OptimizerConfig`` fields (``optim.megatron``)."""
    ddp: Mapping[str, Any] = field(default_factory=dict)
    """``DistributedDataParallelConfig`` fields (``optim.ddp``), laid over megappo's defaults
    (``config.passthrough.DDP_DEFAULTS``: gradients reduced in fp32)."""

    @property
    def overlap_grad_reduce(self) -> bool:
        """DP gradient reduction overlapped with backward (``optim.ddp.overlap_grad_reduce``)."""
        return bool({**DDP.defaults, **self.ddp}["overlap_grad_reduce"])


def wrap_ddp(chunks: list, config, settings: OptimizerSettings) -> list:
    """Wrap each model chunk in Megatron's ``DistributedDataParallel`` (contiguous gradient
    buffers; ``param.main_grad`` holds the gradient). Only the first chunk is bucketed, as
    Megatron-LM does for interleaved pipelines."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=settings.use_distributed_optimizer,
        **ddp_fp8_fields(bool(config.fp8 and config.fp8_param), settings.use_distributed_optimizer),
        **{**DDP.defaults, **check_megatron_section(DDP, settings.ddp)},
    )
    return [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]


def build_optimizer(chunks: list, settings: OptimizerSettings, dtype: torch.dtype):
    """Megatron's optimizer over the DDP-wrapped chunks: Adam with decoupled weight decay
    (AdamW), fp32 master weights and gradient clipping; TE/apex fused Adam when installed,
    torch's AdamW otherwise (CPU)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    bf16 = dtype == torch.bfloat16
    extra = check_megatron_section(OPTIMIZER, settings.megatron)
    # Megatron-LM gives the optimizer the DDP's overlap_param_gather; one key sets both.
    overlap_param_gather = bool(check_megatron_section(DDP, settings.ddp).get("overlap_param_gather", False))
    config = OptimizerConfig(
        optimizer="adam",
        lr=settings.lr,
        min_lr=settings.min_lr,
        weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1,
        adam_beta2=settings.adam_beta2,
        adam_eps=settings.adam_eps,
        clip_grad=settings.clip_grad,
        bf16=bf16,
        params_dtype=dtype,
        use_distributed_optimizer=settings.use_distributed_optimizer,
        overlap_param_gather=overlap_param_gather,
        **extra,
    )
    return get_megatron_optimizer(config, chunks)


def build_scheduler(optimizer, settings: OptimizerSettings):
    """Megatron's ``OptimizerParamScheduler``: linear warmup from 0 over
    ``lr_warmup_steps``, then constant or cosine down to ``min_lr`` at ``lr_decay_steps``.

    Step k (1-based) uses the rate of ``num_steps = k``: ``MegatronPolicy`` advances the
    scheduler before each optimizer step, so warmup's first step is lr / warmup, not 0.
    """
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    warmup = settings.lr_warmup_steps
    if warmup < 0:
        raise ValueError(f"optim.lr_warmup_steps must be >= 0, got {warmup}")
    if settings.lr_decay_style == "cosine":
        if settings.lr_decay_steps is None or settings.lr_decay_steps <= warmup:
            raise ValueError(
                f"optim.lr_decay_style=cosine needs lr_decay_steps > lr_warmup_steps; got "
                f"{settings.lr_decay_steps} and {warmup}"
            )
        decay_steps = settings.lr_decay_steps
    elif settings.lr_decay_style == "constant":
        decay_steps = warmup + 1
    else:
        raise ValueError(f"optim.lr_decay_style must be constant or cosine, got {settings.lr_decay_style!r}")
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=settings.lr,
        min_lr=settings.min_lr if settings.lr_decay_style == "cosine" else settings.lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=decay_steps,
        lr_decay_style=settings.lr_decay_style,
        start_wd=settings.weight_decay,
        end_wd=settings.weight_decay,
        wd_incr_steps=1,
        wd_incr_style="constant",
    )


def current_lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])
