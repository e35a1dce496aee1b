"""Mistral: Llama's weights (no biases at all); the sliding window changes attention, not weights."""

from megappo.weights.base import FamilyTable
from megappo.weights.dense import DENSE_RULES

TABLE = FamilyTable("mistral", ("MistralForCausalLM",), DENSE_RULES, ("MistralForSequenceClassification",))
