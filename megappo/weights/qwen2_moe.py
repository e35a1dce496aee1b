"""Qwen2-MoE: Qwen2 attention (QKV bias), routed experts plus a shared expert scaled by a
sigmoid gate; layers in ``mlp_only_layers`` (or off the ``decoder_sparse_step``) stay dense."""

from megappo.weights.base import FamilyTable
from megappo.weights.dense import DENSE_RULES
from megappo.weights.moe import moe_rules, shared_expert_rules

TABLE = FamilyTable(
    "qwen2_moe",
    ("Qwen2MoeForCausalLM",),
    DENSE_RULES + moe_rules("mlp", "gate_proj", "up_proj", "down_proj") + shared_expert_rules(),
)
