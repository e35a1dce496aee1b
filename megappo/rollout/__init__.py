"""Rollout engines (embedded, SGLang colocated, SGLang servers), weight sync and the
trainer/engine mismatch metrics. See ``engine`` for the interface and its contracts.

Public API:
  RolloutEngine, SamplingParams, Sample, RolloutEngineError     the interface (engine.py)
  build_engine(rollout_cfg, *, hf_config, hf_dir, layout, eos_token_ids, seed)
  checksum_of(named_tensors), checksums_match(a, b)              weights fingerprint
  generate_in_group(engine_or_None, prompts, params, layout)      holder generates, replica receives
  sync_weights(policy_models, engine_or_None, layout, *, bucket_mb, checksum=False) -> SyncStats
  group.run_on_holder(work, layout), group.raise_if_any_replica_failed(...)   failures on every rank
  mismatch.mismatch_sums / mismatch_from_sums                     the metrics over data-parallel ranks
The engine modules (``embedded``, ``sglang_engine``, ``sglang_server``) are imported on
demand by ``build_engine``; nothing here imports SGLang.
"""

from megappo.rollout.engine import (
    RolloutEngine,
    RolloutEngineError,
    Sample,
    SamplingParams,
    build_engine,
    checksum_of,
    checksums_match,
)
from megappo.rollout.group import generate_in_group, holds_engine
from megappo.rollout.weight_sync import SyncStats, sync_weights

__all__ = [
    "RolloutEngine",
    "RolloutEngineError",
    "Sample",
    "SamplingParams",
    "SyncStats",
    "build_engine",
    "checksum_of",
    "checksums_match",
    "generate_in_group",
    "holds_engine",
    "sync_weights",
]
