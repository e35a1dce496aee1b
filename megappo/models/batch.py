"""Token batches for the Megatron models and their split into micro-batches.

Shape legend: B = sequences (one data-parallel rank's share), S = prompt + response
positions (right padded), T = response positions, b = sequences of one micro-batch.

``TokenBatch(input_ids_BS, prompt_lens_B, response_lens_B)``: response token t of row i
sits at position ``prompt_lens_B[i] + t``; its log-prob and value are read from the
model output at the position before it, ``prompt_lens_B[i] + t - 1`` (CONTRACTS.md).
Per-token tensors of a batch are [B, T] with T = ``batch.T`` (the longest response, or
``response_width`` when the trainer pads its tensors wider).

Micro-batches (``microbatch_rows``): rows are sorted by length (longest first, stable)
and packed greedily while rows x longest row <= ``max_tokens_per_microbatch`` (padded
tokens count); a row longer than the budget gets a micro-batch of its own. Each
micro-batch is sliced to its own longest row, so padding is at most the spread within
it. Packed sequences (THD, no padding at all) need the Transformer Engine spec and are
not implemented: ``check_packed_sequences`` says so.
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
        """The rows ``rows`` (a LongTensor of indices), cut to their longest sequence if
        ``trim``; the response width becomes theirs (the caller pads outputs back)."""
        rows = rows.to(self.input_ids_BS.device)
        seq = self.seq_lens_B[rows]
        width = int(seq.max()) if (trim and rows.numel()) else self.S
        return TokenBatch(self.input_ids_BS[rows, :width], self.prompt_lens_B[rows], self.response_lens_B[rows])

    def split(self, num: int) -> list["TokenBatch"]:
        """``num`` contiguous shares of the rows (sizes differ by at most one), e.g. one per
        data-parallel rank; each keeps the batch's response width."""
        if not 1 <= num <= max(self.B, 1):
            raise ValueError(f"cannot split {self.B} rows into {num} parts")
        parts = torch.arange(self.B).tensor_split(num)
        return [
            TokenBatch(self.input_ids_BS[r], self.prompt_lens_B[r], self.response_lens_B[r], response_width=self.T)
            for r in parts
        ]

    def to(self, device) -> "TokenBatch":
        ids, p, r = self.input_ids_BS.to(device), self.prompt_lens_B.to(device), self.response_lens_B.to(device)
        return TokenBatch(ids, p, r, self.response_width)


def microbatch_rows(seq_lens_B: Tensor, max_tokens: int, *, min_microbatches: int = 1) -> list[Tensor]:
    """Row indices of each micro-batch under a padded-token budget (see the module doc).

    With ``min_microbatches`` (e.g. the pipeline size, so that stages overlap) the
    micro-batch with the most rows is halved until there are that many (or one row each).
    Deterministic: the same lengths give the same split on every rank.
    """
    if max_tokens < 1:
        raise ValueError(f"train.max_tokens_per_microbatch must be >= 1, got {max_tokens}")
    lens = seq_lens_B.tolist()
    order = sorted(range(len(lens)), key=lambda i: -lens[i])
    groups: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        # Sorted longest first, so the group's longest row is its first.
        if cur and lens[cur[0]] * (len(cur) + 1) > max_tokens:
            groups.append(cur)
            cur = []
        cur.append(i)
    if cur:
        groups.append(cur)
    while len(groups) < min(min_microbatches, len(lens)):
        k = max(range(len(groups)), key=lambda j: len(groups[j]))
        g = groups.pop(k)
        groups[k:k] = [g[: len(g) // 2], g[len(g) // 2 :]]
    return [torch.tensor(g, dtype=torch.long) for g in groups]


def check_packed_sequences(packed: bool, transformer_impl: str) -> None:
    """``train.packed_sequences`` is not implemented: THD packing needs the TE spec's
    attention, and megappo's micro-batches are right-padded. Ask for it and get an error."""
    if packed:
        raise ValueError(
            "train.packed_sequences=true is not supported yet: packing (THD layout via PackedSeqParams) needs "
            f"model.transformer_impl=transformer_engine (have {transformer_impl}) and is not implemented in "
            "megappo; set train.packed_sequences=false (micro-batches are right-padded, sorted by length)"
        )
