"""Megatron-core models: spec, builder, token batches, the policy wrapper and its factory.

    spec          ModelSpec from an HF config.json
    builder       TransformerConfig, layer spec, GPT model / critic value head per stage
    batch         TokenBatch and token-budget micro-batches
    model_inputs  a micro-batch's GPTModel inputs, right-padded or packed (mask / THD)
    optimizer     DDP, Megatron optimizer, LR schedule, the loss-scale factor
    policy        MegatronPolicy (actor / critic / reference): forward passes, train_step
    factory       build_policy(cfg, spec, role, layout)
"""

from megappo.models.batch import TokenBatch, microbatch_rows
from megappo.models.builder import BuildOptions, build_model, build_model_chunks
from megappo.models.factory import build_options, build_policy, optimizer_settings
from megappo.models.optimizer import OptimizerSettings, loss_scale_factor
from megappo.models.policy import MegatronPolicy
from megappo.models.spec import ModelSpec

__all__ = [
    "BuildOptions",
    "MegatronPolicy",
    "ModelSpec",
    "OptimizerSettings",
    "TokenBatch",
    "build_model",
    "build_model_chunks",
    "build_options",
    "build_policy",
    "loss_scale_factor",
    "microbatch_rows",
    "optimizer_settings",
]
