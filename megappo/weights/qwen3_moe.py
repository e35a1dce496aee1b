"""Qwen3-MoE: Qwen3 attention (QK-norm), routed experts without a shared expert; layers
listed in ``mlp_only_layers`` (or off the ``decoder_sparse_step``) keep a dense MLP."""

from megappo.weights.base import FamilyTable
from megappo.weights.dense import DENSE_RULES, no_output_bias
from megappo.weights.moe import moe_rules

TABLE = FamilyTable(
    "qwen3_moe",
    ("Qwen3MoeForCausalLM",),
    DENSE_RULES + moe_rules("mlp", "gate_proj", "up_proj", "down_proj"),
    config_problems=no_output_bias,
)
