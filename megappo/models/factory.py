"""The config tree -> ``BuildOptions`` + ``OptimizerSettings`` -> ``MegatronPolicy``.

The only place ``cfg.model`` / ``cfg.parallel`` / ``cfg.optim`` / ``cfg.train`` become
model-building arguments, so the trainer asks for a role and gets a ready model. Our typed
keys carry what megappo owns (layout, dtype, FP8 choice, recomputation, Adam and the LR
schedule); Megatron's other options travel as the pass-through dicts ``model.megatron``,
``optim.megatron`` and ``optim.ddp`` (``config.passthrough``), unmirrored.
"""

from __future__ import annotations

import math

import torch

from megappo.models.builder import BuildOptions, Role, resolve_transformer_impl
from megappo.models.optimizer import OptimizerSettings
from megappo.models.policy import MegatronPolicy
from megappo.models.spec import ModelSpec
from megappo.parallel.state import ParallelLayout

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 (fp32 master weights) on GPU, float32 on CPU."""
    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if requested not in _DTYPES:
        raise ValueError(f"model.dtype must be auto, float32 or bfloat16; got {requested!r}")
    return _DTYPES[requested]


def build_options(cfg, layout: ParallelLayout) -> BuildOptions:
    """``BuildOptions`` from ``cfg.model`` and ``cfg.parallel`` for this layout's device."""
    m, p = cfg.model, cfg.parallel
    return BuildOptions(
        tp=p.tensor_model_parallel_size,
        pp=p.pipeline_model_parallel_size,
        vpp=p.virtual_pipeline_model_parallel_size,
        dtype=resolve_dtype(m.dtype, layout.device),
        transformer_impl=resolve_transformer_impl(m.transformer_impl, layout.device),
        fp8_format=m.fp8.format,
        fp8_recipe=m.fp8.recipe,
        fp8_amax_history_len=m.fp8.amax_history_len,
        fp8_amax_compute_algo=m.fp8.amax_compute_algo,
        fp8_param=m.fp8.param_gather,
        recompute_granularity=m.recompute_granularity,
        recompute_num_layers=m.recompute_num_layers,
        sequence_parallel=p.sequence_parallel,
        value_head_init_std=m.value_head_init_std,
        ep=p.expert_model_parallel_size,
        moe_aux_loss_coeff=m.moe.aux_loss_coeff,
        moe_z_loss_coeff=m.moe.z_loss_coeff,
        moe_capacity_factor=m.moe.capacity_factor,
        routing_replay=cfg.algo.routing_replay,
        routing_replay_source=cfg.algo.routing_replay_source,
        megatron=dict(m.megatron),
    )


def total_optimizer_steps(cfg) -> int:
    """Optimizer steps of the whole run: RL steps x PPO epochs x mini-batches per rollout batch."""
    t = cfg.train
    mini = t.mini_batch_size or t.rollout_batch_size
    return t.steps * cfg.algo.ppo_epochs * math.ceil(t.rollout_batch_size / mini)


def optimizer_settings(cfg, role: Role) -> OptimizerSettings:
    """``OptimizerSettings`` of the actor or critic (the critic uses ``optim.critic_lr``
    when set, else ``optim.lr``)."""
    o = cfg.optim
    lr = o.critic_lr if (role == "critic" and o.critic_lr is not None) else o.lr
    decay_steps = o.lr_decay_steps
    if o.lr_decay_style == "cosine" and decay_steps is None:
        decay_steps = total_optimizer_steps(cfg)
    return OptimizerSettings(
        lr=lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        lr_warmup_steps=o.lr_warmup_steps,
        lr_decay_style=o.lr_decay_style,
        lr_decay_steps=decay_steps,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        megatron=dict(o.megatron),
        ddp=dict(o.ddp),
    )


def build_policy(cfg, spec: ModelSpec, role: Role, layout: ParallelLayout) -> MegatronPolicy:
    """The actor, critic or reference of this rank, as the config says (random weights:
    the caller loads the HF or Megatron checkpoint into ``policy.models``)."""
    opts = build_options(cfg, layout)
    spec.check_parallel(opts.tp, opts.pp, opts.vpp, opts.ep)
    if opts.ep != layout.ep:
        raise ValueError(
            f"parallel.expert_model_parallel_size={opts.ep} but the process groups were initialized with EP={layout.ep} "
            "(pass ep= to megappo.parallel.init_parallel)"
        )
    return MegatronPolicy(
        spec,
        role,
        opts,
        optimizer_settings(cfg, role) if role != "reference" else None,
        max_tokens_per_microbatch=cfg.train.max_tokens_per_microbatch,
        offload_to_cpu=role == "reference" and cfg.model.reference_on_cpu,
        packed_sequences=cfg.train.packed_sequences,
    )
