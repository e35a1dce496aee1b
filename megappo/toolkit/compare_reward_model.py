"""Reward-model parity behind ``tools/compare_reward_model.py``: the Megatron reward model
at a TP / PP layout against ``transformers``' ``AutoModelForSequenceClassification`` on the
same weights (STYLE point 10).

Shape legend: N = sequences.

Sequences: seeded random ids in [1, vocab) of varied lengths (``seq_len`` down to a
quarter of it), right-padded with ``pad_token_id`` for transformers, which pools the last
token that is not padding; ids equal to the pad id are redrawn so the two read the same
position. One dict: max / mean absolute score difference.
"""

from __future__ import annotations

import torch

from megappo.models.builder import BuildOptions
from megappo.models.reward_model import RewardModel, SequenceBatch
from megappo.parallel.state import init_parallel
from megappo.weights.reward import load_hf_into_reward_model, reward_spec


def varied_sequences(vocab_size: int, num: int, seq_len: int, seed: int, pad_id: int) -> list[list[int]]:
    """``num`` random sequences of lengths spread over [seq_len / 4, seq_len], without ``pad_id``."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.linspace(max(1, seq_len // 4), seq_len, num).round().long().tolist()
    seqs = []
    for n in lengths:
        ids = torch.randint(1, vocab_size, (n,), generator=g)
        ids[ids == pad_id] = (pad_id % (vocab_size - 1)) + 1
        seqs.append(ids.tolist())
    return seqs


def hf_scores_N(hf_dir: str, seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    """transformers' scores [N] in float32 of right-padded ``seqs``."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(hf_dir, dtype=torch.float32).eval()
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[:, 0].float()


def compare_reward_model(
    hf_dir: str, *, tp: int = 1, pp: int = 1, num_seqs: int = 6, seq_len: int = 24, seed: int = 0,
    max_tokens_per_microbatch: int = 64,
) -> list[dict]:
    """Collective over all ranks; the result rows on rank 0 (an empty list elsewhere).
    ``max_tokens_per_microbatch`` is small by default so several micro-batches run."""
    import json
    import os

    import torch.distributed as dist


    spec = reward_spec(hf_dir)
    with open(os.path.join(hf_dir, "config.json")) as f:
        pad_id = json.load(f).get("pad_token_id")
    if pad_id is None:
        raise ValueError(f"{hf_dir}/config.json has no pad_token_id: transformers cannot score a padded batch")
    layout = init_parallel(tp, pp)
    rm = RewardModel(spec, BuildOptions(tp=tp, pp=pp), max_tokens_per_microbatch=max_tokens_per_microbatch)
    load_hf_into_reward_model(rm.models, hf_dir)
    seqs = varied_sequences(spec.vocab_size, num_seqs, seq_len, seed, pad_id)
    ours = rm.score(SequenceBatch.from_lists(seqs, pad_id)).cpu()
    if dist.get_rank() != 0:
        return []
    diff = (ours.double() - hf_scores_N(hf_dir, seqs, pad_id).double()).abs()
    return [{
        "compare": "megatron_rm_vs_transformers",
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "num_seqs": len(seqs),
        "lengths": [len(s) for s in seqs],
        "tp": layout.tp,
        "pp": layout.pp,
        "dp": layout.dp,
    }]
