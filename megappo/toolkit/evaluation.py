"""Held-out accuracy of an HF-format policy, outside training (``tools/evaluate.py``).

The trainer evaluates periodically on ``data.eval_path`` (``eval/accuracy``); this runs the
same measurement on a saved actor (``<run_dir>/hf/final``, a ``save_hf_every`` snapshot, or
a training checkpoint converted by ``tools/convert_megatron_to_hf.py``): greedy decoding
(``rollout.eval_temperature``) with the embedded engine, scored by ``reward.fn``.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Iterator

import torch
from transformers import AutoTokenizer

from megappo.config import Config
from megappo.data.dataset import PromptDataset
from megappo.data.rewards import RewardFunction
from megappo.loop.rollout_side import generate_and_score
from megappo.rollout import SamplingParams
from megappo.rollout.embedded import EmbeddedEngine
from megappo.rollout.weight_sync import iter_buckets
from megappo.weights.hf_io import HFCheckpoint


def _hf_tensors(ckpt: HFCheckpoint) -> Iterator[tuple[str, torch.Tensor]]:
    """The directory's tensors as ``(hf_name, tensor)``, read one tensor at a time."""
    for name in sorted(ckpt.shapes()):
        yield name, ckpt.read(name, None, 0, 0)


def evaluate_hf_dir(cfg: Config, hf_dir: str, *, eval_path: str | None = None, max_samples: int | None = None) -> dict:
    """Greedy accuracy of the model in ``hf_dir`` on ``eval_path`` (default ``data.eval_path``)."""
    path = eval_path or cfg.data.eval_path
    if path is None:
        raise ValueError("no held-out data: pass --data or set data.eval_path")
    with open(os.path.join(hf_dir, "config.json")) as f:
        hf_config = json.load(f)
    tokenizer = AutoTokenizer.from_pretrained(cfg.data.tokenizer_path or hf_dir)
    items = list(PromptDataset.from_config(cfg.data, tokenizer, path=path))
    items = items[: max_samples or cfg.data.max_eval_samples]
    eos = sorted({tokenizer.eos_token_id} | set(cfg.rollout.stop_token_ids))
    device = "cuda" if torch.cuda.is_available() and cfg.rollout.device != "cpu" else "cpu"
    engine = EmbeddedEngine(hf_config, device=device, eos_token_ids=tuple(eos))
    with HFCheckpoint(hf_dir) as ckpt:
        engine.update_weights(iter_buckets(_hf_tensors(ckpt), 256 << 20))
    params = SamplingParams.from_config(cfg.rollout, eos_token_ids=eos, seed=cfg.train.seed, evaluation=True)
    reward_fn = RewardFunction.from_config(replace(cfg.reward))
    try:
        batch = generate_and_score(engine, items, params, reward_fn, tokenizer, first_group_id=0, policy_version=-1)
    finally:
        reward_fn.close()
        engine.shutdown()
    n = len(batch)
    return {
        "hf_dir": hf_dir,
        "data": path,
        "num_samples": n,
        "accuracy": float(batch.correct_B.sum()) / max(n, 1),
        "reward_mean": float(batch.scores_B.sum()) / max(n, 1),
        "truncated_frac": float(batch.truncated_B.sum()) / max(n, 1),
        "reward_errors": batch.stats.reward_errors,
        "reward_timeouts": batch.stats.reward_timeouts,
    }
