"""Llama (1/2/3.x): no QKV bias, no QK-norm, optional tied embeddings."""

from megappo.weights.base import FamilyTable
from megappo.weights.dense import DENSE_RULES, no_output_bias

TABLE = FamilyTable("llama", ("LlamaForCausalLM",), DENSE_RULES, ("LlamaForSequenceClassification",), config_problems=no_output_bias)
