"""Held-out accuracy of an HF-format policy, outside training (``tools/evaluate.py``).

The trainer evaluates periodically on ``data.eval_path`` (``eval/accuracy``); this runs the
same measurement on a saved actor (``<run_dir>/hf/final``, a ``save_hf_every`` snapshot, or
a training checkpoint converted by ``tools/convert_megatron_to_hf.py``): greedy decoding
(``rollout.eval_temperature``) with the embedded engine, scored by ``reward.fn``.
"""

from __future__ import annotations

import json
import os

import torch

from megappo.config import Config


def _hf_buckets(hf_dir: str, bucket_bytes: int = 256 << 20):
    """The directory's tensors as ``(hf_name, tensor)`` buckets, read one tensor at a time."""
    from megappo.weights.hf_io import HFCheckpoint

    with HFCheckpoint(hf_dir) as ckpt:
        bucket, size = [], 0
        for name in sorted(ckpt.shapes()):
            t = ckpt.read(name, None, 0, 0)
            bucket.append((name, t))
            size += t.numel() * t.element_size()
            if size >= bucket_bytes:
                yield bucket
                bucket, size = [], 0
        if bucket:
            yield bucket


def evaluate_hf_dir(cfg: Config, hf_dir: str, *, eval_path: str | None = None, max_samples: int | None = None) -> dict:
    """Greedy accuracy of the model in ``hf_dir`` on ``eval_path`` (default ``data.eval_path``)."""
    from dataclasses import replace

    from transformers import AutoTokenizer

    from megappo.data import PromptDataset, RewardFunction
    from megappo.experience import generate_and_score
    from megappo.rollout import SamplingParams
    from megappo.rollout.embedded import EmbeddedEngine

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
    engine.update_weights(_hf_buckets(hf_dir))
    params = SamplingParams(n=1, temperature=cfg.rollout.eval_temperature, top_p=1.0, top_k=-1,
                            max_new_tokens=cfg.rollout.response_length, stop_token_ids=eos, seed=cfg.train.seed)
    reward_fn = RewardFunction.from_config(replace(cfg.reward))
    try:
        payload = generate_and_score(engine, items, params, reward_fn, tokenizer, group_offset=0)
    finally:
        reward_fn.close()
        engine.shutdown()
    n = len(payload["correct"])
    return {
        "hf_dir": hf_dir,
        "data": path,
        "num_samples": n,
        "accuracy": sum(payload["correct"]) / max(n, 1),
        "reward_mean": sum(payload["scores"]) / max(n, 1),
        "truncated_frac": sum(payload["truncated"]) / max(n, 1),
        "reward_errors": payload["reward_errors"],
        "reward_timeouts": payload["reward_timeouts"],
    }
