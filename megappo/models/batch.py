"""Token batches for the Megatron models and their split into micro-batches.

Shape legend: B = sequences (one data-parallel rank's share), S = prompt + response
positions (right padded), T = response positions, b = sequences of one micro-batch.

``TokenBatch(input_ids_BS, prompt_lens_B, response_lens_B)``: response token t of row i
sits at position ``prompt_lens_B[i] + t``; its log-prob and value are read from the
model output at the position before it, ``prompt_lens_B[i] + t - 1`` (CONTRACTS.md).
Per-token tensors of a batch are [B, T] with T = ``batch.T`` (the longest response, or
``response_width`` when the trainer pads its tensors wider).

Micro-batches (``microbatch_rows``): rows are sorted by length (longest first, stable)
and taken greedily while the micro-batch's cost stays within ``max_tokens_per_microbatch``;
a row longer than the budget gets a micro-batch of its own. The cost is what the model
runs on: right-padded, rows x longest row (each micro-batch is sliced to its own longest
row, so padding is at most the spread within it); packed (``packed=True``,
``megappo.models.model_inputs``), the sum of the real lengths. Pipeline schedules add
count rules on top (at least PP micro-batches so that stages overlap; the interleaved
schedule's divisibility rule, ``interleaved_schedule_accepts``): micro-batches are split
further until the count is one Megatron accepts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class TokenBatch:
    input_ids_BS: Tensor
    """Right-padded prompt + response token ids (int64)."""
    prompt_lens_B: Tensor
    """Prompt tokens of each row (>= 1: the first response token is predicted from the prompt)."""
    response_lens_B: Tensor
    """Response tokens of each row (0 allowed: the row contributes no token)."""
    response_width: Optional[int] = None
    """Width T of the per-token tensors; None is the longest response of the batch."""
    routed_experts_BSLK: Optional[Tensor] = None
    """Mixture-of-experts: int [B, S, L, K], the experts the rollout engine routed each
    position's token to at each routed layer (L, in layer order; K = top-k), -1 where it did
    not report (padding, each row's last token, rows of an engine that reports none); None:
    no rollout routing (``megappo.models.routing``, ``algo.routing_replay_source: rollout``)."""

    def __post_init__(self):
        ids, p, r = self.input_ids_BS, self.prompt_lens_B, self.response_lens_B
        if ids.dim() != 2:
            raise ValueError(f"input_ids_BS must be [B, S], got shape {tuple(ids.shape)}")
        if ids.is_floating_point() or p.is_floating_point() or r.is_floating_point():
            raise ValueError("input_ids_BS, prompt_lens_B and response_lens_B must be integer tensors")
        b, s = ids.shape
        if p.shape != (b,) or r.shape != (b,):
            raise ValueError(f"prompt_lens_B {tuple(p.shape)} and response_lens_B {tuple(r.shape)} must be [B] = [{b}]")
        if b and int(p.min()) < 1:
            raise ValueError("every prompt needs at least one token (prompt_lens_B >= 1)")
        if b and (int(r.min()) < 0 or int((p + r).max()) > s):
            raise ValueError(f"prompt_lens_B + response_lens_B must lie in [1, S={s}]")
        routed = self.routed_experts_BSLK
        if routed is not None and (routed.dim() != 4 or tuple(routed.shape[:2]) != (b, s) or routed.is_floating_point()):
            raise ValueError(f"routed_experts_BSLK must be an integer [B, S, L, K] = [{b}, {s}, L, K], got {tuple(routed.shape)}")
        longest = int(r.max()) if b else 0
        if self.response_width is not None and self.response_width < longest:
            raise ValueError(f"response_width {self.response_width} is shorter than the longest response {longest}")

    @property
    def B(self) -> int:
        return self.input_ids_BS.shape[0]

    @property
    def S(self) -> int:
        return self.input_ids_BS.shape[1]

    @property
    def T(self) -> int:
        if self.response_width is not None:
            return self.response_width
        return int(self.response_lens_B.max()) if self.B else 0

    @property
    def seq_lens_B(self) -> Tensor:
        return self.prompt_lens_B + self.response_lens_B

    @property
    def response_mask_BT(self) -> Tensor:
        """float32 [B, T]: 1 on t < response_lens_B[b]."""
        t_T = torch.arange(self.T, device=self.response_lens_B.device)
        return (t_T.unsqueeze(0) < self.response_lens_B.unsqueeze(1)).float()

    @property
    def response_ids_BT(self) -> Tensor:
        """The response tokens as [B, T] (0 on padding)."""
        pos_BT = self._positions(0).clamp(max=max(self.S - 1, 0))
        ids_BT = self.input_ids_BS.gather(1, pos_BT)
        return torch.where(self.response_mask_BT.bool(), ids_BT, torch.zeros_like(ids_BT))

    def _positions(self, offset: int) -> Tensor:
        t_T = torch.arange(self.T, device=self.prompt_lens_B.device)
        return self.prompt_lens_B.unsqueeze(1) + t_T.unsqueeze(0) + offset

    def output_positions_BT(self) -> Tensor:
        """Model-output positions that predict each response token (prompt_len + t - 1),
        clamped into [0, S) on padding."""
        return self._positions(-1).clamp(min=0, max=max(self.S - 1, 0))

    def select(self, rows: Tensor, *, trim: bool = True) -> "TokenBatch":
        """The rows ``rows`` (a LongTensor of indices). ``trim``: cut to their longest
        sequence, the response width becoming theirs (the caller pads outputs back); else
        the batch's widths are kept (e.g. one data-parallel rank's share of a batch)."""
        rows = rows.to(self.input_ids_BS.device)
        routed = self.routed_experts_BSLK
        if not trim:
            return TokenBatch(self.input_ids_BS[rows], self.prompt_lens_B[rows], self.response_lens_B[rows], response_width=self.T,
                              routed_experts_BSLK=None if routed is None else routed[rows.to(routed.device)])
        seq = self.seq_lens_B[rows]
        width = int(seq.max()) if rows.numel() else self.S
        return TokenBatch(self.input_ids_BS[rows, :width], self.prompt_lens_B[rows], self.response_lens_B[rows],
                          routed_experts_BSLK=None if routed is None else routed[rows.to(routed.device), :width])

    def to(self, device) -> "TokenBatch":
        ids, p, r = self.input_ids_BS.to(device), self.prompt_lens_B.to(device), self.response_lens_B.to(device)
        routed = None if self.routed_experts_BSLK is None else self.routed_experts_BSLK.to(device)
        return TokenBatch(ids, p, r, self.response_width, routed)


def interleaved_schedule_accepts(num_microbatches: int, pp: int, group_size: int) -> bool:
    """Whether Megatron 0.16's interleaved schedule (virtual pipeline stages) runs
    ``num_microbatches``: it runs them in groups of ``group_size``
    (``microbatch_group_size_per_vp_stage``, default PP) and raises unless
    M >= group_size and the last group is whole or has at least PP micro-batches
    (``forward_backward_pipelining_with_interleaving``). With the default group size
    that is: M a multiple of PP."""
    m = num_microbatches
    return m >= group_size and (m % group_size == 0 or m % group_size >= pp)


def microbatch_rows(
    seq_lens_B: Tensor,
    max_tokens: int,
    *,
    min_microbatches: int = 1,
    packed: bool = False,
    interleave: Optional[tuple[int, int]] = None,
) -> list[Tensor]:
    """Row indices of each micro-batch under a token budget (see the module doc).

    ``packed``: the budget counts real tokens (sum of lengths), else padded ones
    (rows x longest). With ``min_microbatches`` (e.g. the pipeline size, so that stages
    overlap) the micro-batch with the most rows is halved until there are that many (or
    one row each). ``interleave = (PP, group size)`` of the interleaved pipeline schedule:
    the count is raised further to the next one it accepts; with too few rows for any
    accepted count it is a ``ValueError`` naming the sizes.
    Deterministic: the same lengths give the same split on every rank.
    """
    if max_tokens < 1:
        raise ValueError(f"train.max_tokens_per_microbatch must be >= 1, got {max_tokens}")
    lens = seq_lens_B.tolist()
    order = sorted(range(len(lens)), key=lambda i: -lens[i])
    groups: list[list[int]] = []
    cur: list[int] = []
    cur_tokens = 0
    for i in order:
        # Sorted longest first, so the group's longest row is its first.
        cost = cur_tokens + lens[i] if packed else (lens[cur[0]] if cur else lens[i]) * (len(cur) + 1)
        if cur and cost > max_tokens:
            groups.append(cur)
            cur, cur_tokens = [], 0
        cur.append(i)
        cur_tokens += lens[i]
    if cur:
        groups.append(cur)
    count = max(len(groups), min(min_microbatches, len(lens)))
    if interleave is not None:
        pp, group_size = interleave
        count = max(count, group_size)
        while not interleaved_schedule_accepts(count, pp, group_size):
            count += 1
        if count > len(lens):
            raise ValueError(
                f"the interleaved pipeline schedule (pipeline_model_parallel_size={pp} with "
                f"virtual_pipeline_model_parallel_size, {group_size} micro-batches per virtual-stage group) needs "
                f"M >= {group_size} micro-batches with M % {group_size} == 0 or >= {pp}; this data-parallel rank has "
                f"{len(lens)} sequences (the token budget needs >= {len(groups)} micro-batches, min "
                f"{min_microbatches} asked), so the nearest valid M = {count} is more than it has: give each "
                f"data-parallel rank at least {count} sequences or drop virtual pipelining"
            )
    while len(groups) < count:
        k = max(range(len(groups)), key=lambda j: len(groups[j]))
        g = groups.pop(k)
        groups[k:k] = [g[: len(g) // 2], g[len(g) // 2 :]]
    return [torch.tensor(g, dtype=torch.long) for g in groups]
