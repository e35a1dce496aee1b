"""One decoding step's token choice and log-prob (pure torch, used by the embedded engine).

Shape legend: b = rows being decoded, V = vocabulary.

The reported log-prob is ``log_softmax(logits / T)`` of the chosen token over the full
vocabulary (docs/CONTRACTS.md), computed from the same float32 logits the token is drawn
from. Top-k keeps the k largest logits, then top-p keeps the smallest prefix of the
sorted, temperature-scaled distribution whose mass reaches p (the most likely token always
stays), as SGLang and vLLM order them; the kept mass is renormalized for drawing only.
``temperature == 0`` is greedy decoding (the first maximum) and reports the T = 1
log-probs, as SGLang does.

Randomness: every row has its own ``torch.Generator`` and draws exactly one
``torch.multinomial`` per step it is decoded, so a row's tokens depend on its seed and its
own logits only, not on which other rows share the batch.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from megappo.rollout.engine import SamplingParams


def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A distinct 63-bit seed for sample ``sample_index`` of prompt ``prompt_index``."""
    x = (seed * 0x9E3779B97F4A7C15 + prompt_index * 0xBF58476D1CE4E5B9 + sample_index * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & (2**64 - 1)
    return (x ^ (x >> 32)) & (2**63 - 1)


def filter_logits_bV(scaled_bV: Tensor, top_k: int, top_p: float) -> Tensor:
    """``scaled_bV`` with the tokens top-k / top-p exclude set to -inf (a new tensor)."""
    out_bV = scaled_bV.clone()
    V = out_bV.shape[-1]
    if 0 < top_k < V:
        kth_b1 = torch.topk(out_bV, top_k, dim=-1).values[:, -1:]
        out_bV = out_bV.masked_fill(out_bV < kth_b1, float("-inf"))
    if top_p < 1.0:
        sorted_bV, order_bV = torch.sort(out_bV, dim=-1, descending=True)
        probs_bV = torch.softmax(sorted_bV, dim=-1)
        mass_before_bV = torch.cumsum(probs_bV, dim=-1) - probs_bV
        drop_sorted_bV = mass_before_bV >= top_p
        drop_sorted_bV[:, 0] = False
        drop_bV = torch.zeros_like(drop_sorted_bV).scatter(-1, order_bV, drop_sorted_bV)
        out_bV = out_bV.masked_fill(drop_bV, float("-inf"))
    return out_bV


def choose_tokens(
    logits_bV: Tensor, params: SamplingParams, generators: Sequence[torch.Generator]
) -> tuple[Tensor, Tensor]:
    """``(tokens_b, logprobs_b)``: the next token of every row and its log-prob."""
    logits_bV = logits_bV.float()
    if params.greedy:
        tokens_b = torch.argmax(logits_bV, dim=-1)
        logp_bV = torch.log_softmax(logits_bV, dim=-1)
        return tokens_b, logp_bV.gather(-1, tokens_b[:, None])[:, 0]
    scaled_bV = logits_bV / params.temperature
    logp_bV = torch.log_softmax(scaled_bV, dim=-1)
    if params.top_k == -1 and params.top_p == 1.0:
        probs_bV = logp_bV.exp()
    else:
        probs_bV = torch.softmax(filter_logits_bV(scaled_bV, params.top_k, params.top_p), dim=-1)
    assert len(generators) == probs_bV.shape[0], (len(generators), probs_bV.shape)
    tokens_b = torch.stack([torch.multinomial(probs_bV[i], 1, generator=g)[0] for i, g in enumerate(generators)])
    return tokens_b, logp_bV.gather(-1, tokens_b[:, None])[:, 0]
