"""Prompt data and rule-based rewards.

Modules:

  sources         jsonl / parquet rows, bad rows reported
  dataset         ``PromptDataset``, ``PromptItem``: rendering, chat templates, length filter
  loader          ``PromptLoader`` (DP shards, seeded shuffle, resumable cursor)
  answers         GSM8K ``####`` and MATH ``\\boxed{}`` answer extraction
  rewards         ``RewardFunction``, ``RewardResult``, the reward registry
  reward_pool     spawn worker pool with per-item timeouts

(The toy arithmetic task and its character tokenizer live in ``megappo.toolkit``.)

The names below are importable from this package, but only load their module on first
use (PEP 562): reward worker processes import ``megappo.data.rewards`` and with it this
package, and must stay free of transformers, pyarrow and torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PromptDataset": "dataset",
    "PromptItem": "dataset",
    "PromptLoader": "loader",
    "RewardFunction": "rewards",
    "RewardResult": "rewards",
    "RewardSpec": "rewards",
    "register_reward": "rewards",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
