"""One step's experience: prompts -> sampled responses -> scores, as typed tensors.

Shape legend: B = responses of this data-parallel rank (prompts x group size),
S = prompt + response positions, T = response positions (max response length of the batch).

Placement: each data-parallel replica owns one rollout engine on its first rank (TP rank 0,
PP stage 0). That rank generates and scores its replica's prompts, then broadcasts the
result to the other ranks of its model-parallel group, so every rank builds the same
``Experience``. ``generate`` and ``score`` run only where ``engine`` is not None.
``rollout_metrics`` reduces a step's rollout statistics over the data-parallel ranks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from megappo.models.batch import TokenBatch


@dataclass
class Experience:
    """What the RL step learns from, for this rank's share of the global batch."""

    batch: TokenBatch
    rollout_logprobs_BT: torch.Tensor
    scores_B: torch.Tensor
    correct_B: torch.Tensor
    truncated_B: torch.Tensor
    group_ids_B: torch.Tensor
    response_texts: list[str] = field(default_factory=list)
    reward_errors: int = 0
    reward_timeouts: int = 0
    reward_seconds: float = 0.0
    sampling_rounds: int = 1
    # Filled in by the step:
    old_logprobs_BT: torch.Tensor | None = None
    ref_logprobs_BT: torch.Tensor | None = None
    values_BT: torch.Tensor | None = None
    advantages_BT: torch.Tensor | None = None
    returns_BT: torch.Tensor | None = None
    loss_mask_BT: torch.Tensor | None = None

    @property
    def mask_BT(self) -> torch.Tensor:
        return self.batch.response_mask_BT

    def __len__(self) -> int:
        return self.scores_B.shape[0]

    def select(self, rows: torch.Tensor) -> "Experience":
        """The rows ``rows`` of every per-response tensor (a mini-batch)."""
        picked = {}
        for name in ("rollout_logprobs_BT", "scores_B", "correct_B", "truncated_B", "group_ids_B",
                     "old_logprobs_BT", "ref_logprobs_BT", "values_BT", "advantages_BT", "returns_BT", "loss_mask_BT"):
            value = getattr(self, name)
            picked[name] = None if value is None else value[rows]
        texts = [self.response_texts[i] for i in rows.tolist()] if self.response_texts else []
        return replace(self, batch=self.batch.select(rows), response_texts=texts, **picked)


def pad_right(rows: list[list[float]] | list[list[int]], width: int, value, dtype) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, row in enumerate(rows):
        if row:
            out[i, : len(row)] = torch.tensor(row, dtype=dtype)
    return out


def build_experience(payload: dict[str, Any]) -> Experience:
    """Tensors from the broadcastable payload of ``generate_and_score``."""
    prompts, responses = payload["prompt_ids"], payload["response_ids"]
    seqs = [p + r for p, r in zip(prompts, responses)]
    width_S = max(len(s) for s in seqs)
    width_T = max(1, max(len(r) for r in responses))
    batch = TokenBatch(
        input_ids_BS=pad_right(seqs, width_S, 0, torch.long),
        prompt_lens_B=torch.tensor([len(p) for p in prompts], dtype=torch.long),
        response_lens_B=torch.tensor([len(r) for r in responses], dtype=torch.long),
    )
    return Experience(
        batch=batch,
        rollout_logprobs_BT=pad_right(payload["logprobs"], width_T, 0.0, torch.float32),
        scores_B=torch.tensor(payload["scores"], dtype=torch.float32),
        correct_B=torch.tensor(payload["correct"], dtype=torch.bool),
        truncated_B=torch.tensor(payload["truncated"], dtype=torch.bool),
        group_ids_B=torch.tensor(payload["group_ids"], dtype=torch.long),
        response_texts=payload["texts"],
        reward_errors=payload["reward_errors"],
        reward_timeouts=payload["reward_timeouts"],
        reward_seconds=payload.get("reward_seconds", 0.0),
        sampling_rounds=payload.get("rounds", 1),
    )


def generate_and_score(engine, prompts, params, reward_fn, tokenizer, *, group_offset: int, on_progress=None) -> dict[str, Any]:
    """On an engine rank: sample ``params.n`` responses per prompt and score them.

    Returns plain Python lists so the result can be broadcast to the model-parallel group.
    ``group_offset`` makes group ids unique over data-parallel ranks. ``on_progress``:
    passed to ``engine.generate`` (called with the number of prompts just finished).
    """
    ids = [p.prompt_ids for p in prompts]
    samples = engine.generate(ids, params) if on_progress is None else engine.generate(ids, params, on_progress=on_progress)
    out = {k: [] for k in ("prompt_ids", "response_ids", "logprobs", "truncated", "group_ids", "texts", "answers", "prompts")}
    for i, (prompt, group) in enumerate(zip(prompts, samples)):
        for sample in group:
            out["prompt_ids"].append(list(prompt.prompt_ids))
            out["response_ids"].append(list(sample.token_ids))
            out["logprobs"].append(list(sample.logprobs))
            out["truncated"].append(sample.finish_reason == "length")
            out["group_ids"].append(group_offset + i)
            out["texts"].append(tokenizer.decode(sample.token_ids, skip_special_tokens=True))
            out["answers"].append(prompt.answer)
            out["prompts"].append(prompt.text)
    t0 = time.perf_counter()
    result = reward_fn.score(out["texts"], out["answers"], out["prompts"])
    out.update(
        reward_seconds=time.perf_counter() - t0,
        scores=list(result.scores),
        correct=[bool(c) for c in result.correct],
        reward_errors=result.num_errors,
        reward_timeouts=result.num_timeouts,
    )
    del out["answers"], out["prompts"]
    return out


def rollout_metrics(exp: Experience, *, reduce, dynamic_sampling: bool) -> dict[str, float]:
    """The step's rollout metrics over the global batch. ``reduce(x, op)`` all-reduces a
    float64 vector over the data-parallel ranks (``op`` "sum" or "max"); it is called twice.
    Means and standard deviations come from global sums: per response for rewards and
    lengths, per valid token for the mismatch metrics (``megappo.rollout.mismatch``) and
    the critic's explained variance (1 - Var(R - V) / Var(R), Bessel-corrected, NaN when
    the returns do not vary); maxima are maxima over ranks."""
    from megappo.algo import moment_sums, moments_from_sums
    from megappo.rollout.mismatch import mismatch_from_sums, mismatch_sums

    f64 = torch.float64
    lens_B = exp.batch.response_lens_B.to(f64)
    mm_sums, mm_max = mismatch_sums(exp.old_logprobs_BT, exp.rollout_logprobs_BT, exp.mask_BT.float())
    parts = {
        "scores": moment_sums(exp.scores_B),
        "lens": moment_sums(lens_B),
        "counts": torch.tensor([exp.correct_B.sum().item(), exp.truncated_B.sum().item(), exp.reward_errors, exp.reward_timeouts], dtype=f64),
        "mismatch": mm_sums,
    }
    critic = exp.values_BT is not None and exp.returns_BT is not None
    if critic:
        mask_BT, returns_BT = exp.mask_BT.to("cpu", f64), exp.returns_BT.to("cpu", f64)
        parts["returns"] = moment_sums(returns_BT, mask_BT)
        parts["residuals"] = moment_sums(returns_BT - exp.values_BT.to("cpu", f64), mask_BT)
    flat = reduce(torch.cat(list(parts.values())), "sum")
    sums = dict(zip(parts, flat.split([len(v) for v in parts.values()])))
    len_max = lens_B.max().reshape(1) if len(lens_B) else torch.zeros(1, dtype=f64)
    maxima = reduce(torch.cat([len_max, torch.tensor([exp.reward_seconds], dtype=f64), mm_max]), "max")

    score_mean, score_var = moments_from_sums(sums["scores"])
    num, lens = sums["scores"][0].item(), sums["lens"]
    correct, truncated, reward_errors, reward_timeouts = sums["counts"].tolist()
    out = {
        "reward/mean": float(score_mean),
        "reward/std": float(score_var.clamp(min=0).sqrt()),
        "reward/accuracy": correct / num,
        "reward/errors": reward_errors,
        "reward/timeouts": reward_timeouts,
        "response_length/mean": float(lens[1] / lens[0]),
        "response_length/max": float(maxima[0]),
        "response_length/truncated_frac": truncated / num,
        "time/reward": float(maxima[1]),
    }
    if dynamic_sampling:
        out["rollout/sampling_rounds"] = float(exp.sampling_rounds)
    if critic:
        _, var_r = moments_from_sums(sums["returns"])
        _, var_e = moments_from_sums(sums["residuals"])
        out["critic/explained_variance"] = float(1.0 - var_e / var_r) if var_r > 0 else float("nan")
    out.update(mismatch_from_sums(sums["mismatch"], maxima[2:]))
    return out
