"""Prompt data and rule-based rewards.

Modules (import them directly; this package imports nothing, so that reward worker
processes, which import ``megappo.data.rewards``, stay free of torch and transformers):

  sources         jsonl / parquet rows, bad rows reported
  dataset         ``PromptDataset``, ``PromptItem``: rendering, chat templates, length filter
  loader          ``PromptLoader`` (DP shards, seeded shuffle, resumable cursor), ``iter_eval_batches``
  answers         GSM8K ``####`` and MATH ``\\boxed{}`` answer extraction
  rewards         ``RewardFunction``, ``RewardResult``, the reward registry
  reward_pool     spawn worker pool with per-item timeouts
  toy             the toy arithmetic task (dataset, SFT pairs, reward)
  char_tokenizer  an offline character-level tokenizer
"""
