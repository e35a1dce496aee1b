"""``RolloutBatch``: one step's samples as typed tensors, from the engine to the losses.

Shape legend: B = responses of this data-parallel rank (prompts x group size),
S = prompt + response positions, T = response positions (the longest response of the batch).

The rollout side builds it from the engine's ``Sample`` lists and the reward scores
(``from_samples``); the step then fills in the model passes (old / reference log-probs,
values) and the objective the advantages, returns and loss mask. Every rank of a replica
holds the same batch (the engine holder builds it and ``run_on_holder`` broadcasts it:
it is a picklable dataclass of CPU tensors, no string-keyed payload).

``policy_version_B``: the policy version each response was sampled under, i.e. the number
of actor updates the engine's weights had seen (the synchronous loop samples step k with
version k - 1, so its staleness is always 0; off-policy modes record their lag here); with
partial rollouts the oldest version among its tokens, and ``token_versions_BT`` each token's.

``tokens.routed_experts_BSLK`` (L = routed layers, K = top-k): the experts the engine routed
each token to, from ``Sample.routed_experts``, int16, -1 where unreported (padding, each
row's last token, samples without them); None when no sample of the batch has them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import torch
from torch import Tensor

from megappo.models.batch import TokenBatch
from megappo.rollout.engine import Sample


@dataclass(frozen=True)
class RolloutStats:
    """Counters of the rollout that produced a batch (this replica's)."""

    reward_errors: int = 0
    """Responses whose reward function raised (scored 0)."""
    reward_timeouts: int = 0
    """Responses whose reward function timed out (scored 0)."""
    reward_seconds: float = 0.0
    """Wall time spent scoring."""
    sampling_rounds: int = 1
    """Generation rounds (dynamic sampling may need more than one)."""

    def __add__(self, other: "RolloutStats") -> "RolloutStats":
        return RolloutStats(
            self.reward_errors + other.reward_errors,
            self.reward_timeouts + other.reward_timeouts,
            self.reward_seconds + other.reward_seconds,
            self.sampling_rounds + other.sampling_rounds,
        )


_PER_ROW = ("rollout_logprobs_BT", "scores_B", "correct_B", "truncated_B", "group_ids_B", "policy_version_B", "token_versions_BT",
            "old_logprobs_BT", "ref_logprobs_BT", "values_BT", "advantages_BT", "returns_BT", "loss_mask_BT")


@dataclass
class RolloutBatch:
    """What the RL step learns from, for this rank's share of the global batch."""

    tokens: TokenBatch
    """Prompt + response token ids, right-padded, with each row's prompt and response length."""
    rollout_logprobs_BT: Tensor
    """float32: the engine's log-prob of each response token (temperature-scaled; 0 on padding)."""
    scores_B: Tensor
    """float32: the reward of each response."""
    correct_B: Tensor
    """bool: the reward function judged the response correct."""
    truncated_B: Tensor
    """bool: the response ended without a stop token: it hit the length limit (finish reason
    ``length``) or was cut off by an abort (``abort``, a partial rollout)."""
    group_ids_B: Tensor
    """int64: responses to the same prompt share an id (unique over data-parallel ranks)."""
    policy_version_B: Tensor
    """int64: the policy version each response was sampled under (see the module doc)."""
    token_versions_BT: Optional[Tensor] = None
    """int64: the policy version each response token was sampled under (partial rollouts;
    padding holds the row's ``policy_version_B``); None: every token has its row's version."""
    prompt_texts: list[str] = field(default_factory=list)
    """The rendered prompt of each response."""
    response_texts: list[str] = field(default_factory=list)
    """Each response decoded without special tokens (what the reward function saw)."""
    stats: RolloutStats = field(default_factory=RolloutStats)
    # Filled in by the step (model passes, then the objective):
    old_logprobs_BT: Optional[Tensor] = None
    ref_logprobs_BT: Optional[Tensor] = None
    values_BT: Optional[Tensor] = None
    advantages_BT: Optional[Tensor] = None
    returns_BT: Optional[Tensor] = None
    loss_mask_BT: Optional[Tensor] = None

    @property
    def mask_BT(self) -> Tensor:
        """float32: 1 on response tokens."""
        return self.tokens.response_mask_BT

    def versions_BT(self) -> Tensor:
        """int64: each response token's policy version (``token_versions_BT`` or the row's)."""
        if self.token_versions_BT is not None:
            return self.token_versions_BT
        return self.policy_version_B[:, None].expand(len(self), self.rollout_logprobs_BT.shape[1])

    def __len__(self) -> int:
        return self.scores_B.shape[0]

    @classmethod
    def from_samples(
        cls,
        prompt_ids: Sequence[Sequence[int]],
        samples: Sequence[Sequence[Sample]],
        *,
        scores: Sequence[float],
        correct: Sequence[bool],
        prompt_texts: Sequence[str],
        response_texts: Sequence[str],
        first_group_id: int,
        policy_version: int,
        stats: RolloutStats,
    ) -> "RolloutBatch":
        """Responses in prompt order (``samples[i]`` are prompt ``i``'s); ``scores``,
        ``correct`` and ``response_texts`` per response, ``prompt_texts`` per prompt."""
        prompts, responses, logprobs, truncated, groups, versions = [], [], [], [], [], []
        for i, (prompt, group) in enumerate(zip(prompt_ids, samples)):
            for sample in group:
                prompts.append(list(prompt))
                responses.append(list(sample.token_ids))
                logprobs.append(list(sample.logprobs))
                versions.append(list(sample.token_versions) or [policy_version] * len(sample.token_ids))
                truncated.append(sample.finish_reason in ("length", "abort"))  # no stop token either way
                groups.append(first_group_id + i)
        per_prompt = [len(g) for g in samples]
        texts = [t for t, k in zip(prompt_texts, per_prompt) for _ in range(k)]
        B = len(responses)
        assert len(scores) == len(correct) == len(response_texts) == B, (len(scores), len(correct), len(response_texts), B)
        seqs = [p + r for p, r in zip(prompts, responses)]
        T = max(1, max((len(r) for r in responses), default=1))
        row_version_B = torch.tensor([min(v, default=policy_version) for v in versions], dtype=torch.long)
        token_versions_BT = None
        if any(s.token_versions for group in samples for s in group):
            token_versions_BT = row_version_B[:, None].repeat(1, T)
            for b, v in enumerate(versions):
                token_versions_BT[b, : len(v)] = torch.tensor(v, dtype=torch.long)
        S = max((len(s) for s in seqs), default=1)
        return cls(
            tokens=TokenBatch(
                input_ids_BS=_pad_right(seqs, S, 0, torch.long),
                prompt_lens_B=torch.tensor([len(p) for p in prompts], dtype=torch.long),
                response_lens_B=torch.tensor([len(r) for r in responses], dtype=torch.long),
                routed_experts_BSLK=_routed_experts([s.routed_experts for group in samples for s in group], S),
            ),
            rollout_logprobs_BT=_pad_right(logprobs, T, 0.0, torch.float32),
            scores_B=torch.tensor(list(scores), dtype=torch.float32),
            correct_B=torch.tensor([bool(c) for c in correct], dtype=torch.bool),
            truncated_B=torch.tensor(truncated, dtype=torch.bool),
            group_ids_B=torch.tensor(groups, dtype=torch.long),
            policy_version_B=row_version_B.reshape(B),
            token_versions_BT=token_versions_BT,
            prompt_texts=texts,
            response_texts=list(response_texts),
            stats=stats,
        )

    def select(self, rows: Tensor) -> "RolloutBatch":
        """The rows ``rows`` (int64 indices) of every per-response field (a mini-batch)."""
        picked = {name: None if getattr(self, name) is None else getattr(self, name)[rows] for name in _PER_ROW}
        index = rows.tolist()
        return replace(
            self,
            tokens=self.tokens.select(rows),
            prompt_texts=[self.prompt_texts[i] for i in index] if self.prompt_texts else [],
            response_texts=[self.response_texts[i] for i in index] if self.response_texts else [],
            **picked,
        )

    @classmethod
    def concat(cls, parts: Sequence["RolloutBatch"], *, stats: RolloutStats) -> "RolloutBatch":
        """The rows of ``parts`` one after another (as sampled: nothing filled in yet), with
        ``stats`` for the whole; the widths become the longest sequence S and the longest
        response T (at least 1) of the rows, as ``from_samples`` makes them."""
        assert parts, "concat needs at least one batch"
        assert all(p.old_logprobs_BT is None and p.advantages_BT is None for p in parts), "concat before the step fills a batch"
        prompt_lens_B = torch.cat([p.tokens.prompt_lens_B for p in parts])
        response_lens_B = torch.cat([p.tokens.response_lens_B for p in parts])
        S = int((prompt_lens_B + response_lens_B).max()) if len(prompt_lens_B) else 1
        T = max(1, int(response_lens_B.max()) if len(response_lens_B) else 1)
        routed = [p.tokens.routed_experts_BSLK for p in parts]
        shape = next((r.shape[2:] for r in routed if r is not None), None)
        routed_BSLK = None if shape is None else torch.cat([
            torch.full((len(p), S, *shape), -1, dtype=torch.int16) if r is None else _fit(r, S, -1)
            for p, r in zip(parts, routed)])
        return cls(
            tokens=TokenBatch(torch.cat([_fit(p.tokens.input_ids_BS, S) for p in parts]), prompt_lens_B, response_lens_B,
                              routed_experts_BSLK=routed_BSLK),
            rollout_logprobs_BT=torch.cat([_fit(p.rollout_logprobs_BT, T) for p in parts]),
            scores_B=torch.cat([p.scores_B for p in parts]),
            correct_B=torch.cat([p.correct_B for p in parts]),
            truncated_B=torch.cat([p.truncated_B for p in parts]),
            group_ids_B=torch.cat([p.group_ids_B for p in parts]),
            policy_version_B=torch.cat([p.policy_version_B for p in parts]),
            token_versions_BT=(torch.cat([_fit_versions(p, T) for p in parts])
                               if any(p.token_versions_BT is not None for p in parts) else None),
            prompt_texts=[t for p in parts for t in p.prompt_texts],
            response_texts=[t for p in parts for t in p.response_texts],
            stats=stats,
        )

    def first_rows(self, k: int) -> "RolloutBatch":
        return self if k >= len(self) else self.select(torch.arange(k))


def _pad_right(rows: Sequence[Sequence], width: int, value, dtype) -> Tensor:
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, row in enumerate(rows):
        if row:
            out[i, : len(row)] = torch.tensor(list(row), dtype=dtype)
    return out


def _routed_experts(per_row: Sequence[Optional[Tensor]], width: int) -> Optional[Tensor]:
    """``Sample.routed_experts`` of each row ([n_b, L, K] or None) as int16 [B, width, L, K], -1 where absent."""
    shape = next((tuple(r.shape[1:]) for r in per_row if r is not None), None)
    if shape is None:
        return None
    out = torch.full((len(per_row), width, *shape), -1, dtype=torch.int16)
    for b, r in enumerate(per_row):
        if r is not None:
            assert tuple(r.shape[1:]) == shape and r.shape[0] < width + 1, (tuple(r.shape), shape, width)
            assert r.numel() == 0 or int(r.max()) < 2**15, "expert ids beyond int16"
            out[b, : r.shape[0]] = r.to(torch.int16)
    return out


def _fit_versions(part: "RolloutBatch", width: int) -> Tensor:
    """``part``'s per-token versions, cut or padded (with each row's version) to ``width``."""
    versions_BT = part.versions_BT()
    pad_BT = part.policy_version_B[:, None].expand(len(part), max(0, width - versions_BT.shape[1]))
    return torch.cat([versions_BT[:, :width], pad_BT], dim=1)


def _fit(x: Tensor, width: int, value: float = 0) -> Tensor:
    """Cut or right-pad (with ``value``) dimension 1 to ``width``."""
    if x.shape[1] >= width:
        return x[:, :width]
    return torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, width - x.shape[1]), value=value)
