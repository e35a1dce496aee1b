"""Mixtral: Mistral attention, every layer routed; experts named ``w1`` (gate), ``w3`` (up),
``w2`` (down) under ``block_sparse_moe``."""

from megappo.weights.base import FamilyTable
from megappo.weights.dense import DENSE_RULES
from megappo.weights.moe import moe_rules

TABLE = FamilyTable("mixtral", ("MixtralForCausalLM",), DENSE_RULES + moe_rules("block_sparse_moe", "w1", "w3", "w2"))
