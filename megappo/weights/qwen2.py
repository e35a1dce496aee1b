"""Qwen2 / Qwen2.5: QKV biases (always; ``o_proj`` has none), often tied embeddings."""

from megappo.weights.base import FamilyTable
from megappo.weights.dense import DENSE_RULES

TABLE = FamilyTable("qwen2", ("Qwen2ForCausalLM",), DENSE_RULES, ("Qwen2ForSequenceClassification",))
