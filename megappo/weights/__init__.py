"""HF <-> Megatron weights: one mapping table per model family (``llama``, ``qwen2``,
``qwen3``, ``mistral``) over a shared engine (``base``), used by model loading, weight
sync, HF export and the offline conversion tools alike.

Public API (``models``: this rank's GPTModel chunks, or a policy with ``.models`` and
``.optimizer``, whose fp32 master copy is then refreshed after a load):
  load_hf_into_model(models, hf_dir, *, strict=True)         HF directory -> this rank's shards
  iter_hf_tensors(models, *, dtype=None, dst=None)             this stage's full HF tensors (TP collective; dst: to one TP rank)
  save_hf(models, out_dir, *, hf_config, tokenizer_dir=None,   all stages -> HF directory (collective)
          max_shard_bytes=5 GiB, dtype=None)
  hf_to_megatron_state / megatron_to_hf_state                  pure functions on state dicts
  save_megatron_model / load_megatron_model                    Megatron distributed checkpoints of a model
  validate_hf_dir(spec, HFCheckpoint(dir), strict=True)        the checks load_hf_into_model runs first
The offline tools' logic (conversion, log-prob parity) is in ``megappo.toolkit``.
"""

from megappo.weights.base import (
    FamilyTable,
    Placement,
    TensorRule,
    hf_to_megatron_state,
    megatron_to_hf_state,
    table_for,
)
from megappo.weights.export import save_hf
from megappo.weights.megatron_ckpt import load_megatron_model, save_megatron_model
from megappo.weights.model_io import iter_hf_tensors, load_hf_into_model, validate_hf_dir

__all__ = [
    "FamilyTable",
    "Placement",
    "TensorRule",
    "hf_to_megatron_state",
    "iter_hf_tensors",
    "load_hf_into_model",
    "load_megatron_model",
    "megatron_to_hf_state",
    "save_hf",
    "save_megatron_model",
    "table_for",
    "validate_hf_dir",
]
