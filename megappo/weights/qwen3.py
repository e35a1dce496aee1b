"""Qwen3 (dense): QK-norm (RMSNorm over head_dim on q and k), explicit head_dim, no QKV bias."""

from megappo.weights.base import FamilyTable
from megappo.weights.dense import DENSE_RULES, no_output_bias

TABLE = FamilyTable("qwen3", ("Qwen3ForCausalLM",), DENSE_RULES, ("Qwen3ForSequenceClassification",), config_problems=no_output_bias)
