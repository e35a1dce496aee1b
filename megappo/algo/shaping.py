"""Reward shaping on the scalar scores: normalization, clipping, overlong handling.

Shape legend: B = responses, T = response tokens (right padded). `scores_B` is one scalar
reward per response (before any advantage estimation); `lengths_B` the response lengths
in tokens; `truncated_B` a bool per response, True when generation stopped without an
end-of-sequence token: at the length limit (the rollout layer's finish_reason "length") or
cut off by an abort ("abort", a partial rollout).

Order inside `shape_rewards`: overlong penalty (added to the raw score), then
normalization, then clipping, so `reward_clip` bounds what the estimator sees.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
from torch import Tensor

from megappo.algo.stats import SumReducer, group_index, group_moments, moment_sums

REWARD_NORMS = ("batch", "group", "running", "none")
RewardNorm = Literal["batch", "group", "running", "none"]


class RunningMeanStd:
    """Running mean and (Bessel) std of every score seen so far, for reward_norm="running".

    Batches are merged exactly with Chan et al.'s parallel update (1979), from a batch's
    (count, mean, M2) — M2 being the sum of squared deviations from the batch mean. The
    state is three python numbers, saved by checkpoints via `state_dict`. Before any data
    the mean is 0 and the std 1 (no normalization); with one sample the std is 1 too.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    @property
    def var(self) -> float:
        return self.m2 / (self.count - 1) if self.count > 1 else 1.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def update_from_moments(self, count: int, mean: float, m2: float) -> None:
        """Merge a batch given by its count, mean and M2 (sum of squared deviations)."""
        count = int(count)
        if count < 0 or m2 < -1e-9:
            raise ValueError(f"invalid batch moments: count={count}, m2={m2}")
        if count == 0:
            return
        total = self.count + count
        delta = float(mean) - self.mean
        self.mean += delta * count / total
        self.m2 += float(m2) + delta * delta * self.count * count / total
        self.count = total

    def update_from_sums(self, sums: Tensor) -> None:
        """Merge a batch given as all-reduced `moment_sums` ([count, sum, sumsq])."""
        count, total, sumsq = (float(v) for v in sums.to(torch.float64).tolist())
        if count <= 0:
            return
        mean = total / count
        self.update_from_moments(round(count), mean, max(sumsq - total * mean, 0.0))

    def update(self, x: Tensor, reduce_sums: Optional[SumReducer] = None) -> None:
        """Merge the values of `x` (all ranks' values when `reduce_sums` is given)."""
        sums = moment_sums(x.reshape(-1))
        self.update_from_sums(sums if reduce_sums is None else reduce_sums(sums))

    def state_dict(self) -> dict:
        return {"count": int(self.count), "mean": float(self.mean), "m2": float(self.m2)}

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])
        self.mean = float(state["mean"])
        self.m2 = float(state["m2"])


def clip_rewards(scores_B: Tensor, clip: Optional[float]) -> Tensor:
    """Clamp scores to [-clip, clip] (ROLL's `reward_clip`); None leaves them."""
    if clip is None:
        return scores_B
    if clip <= 0:
        raise ValueError(f"reward_clip must be positive or None, got {clip}")
    return scores_B.clamp(min=-clip, max=clip)


def normalize_rewards(
    scores_B: Tensor,
    mode: RewardNorm,
    *,
    group_ids_B: Optional[Tensor] = None,
    tracker: Optional[RunningMeanStd] = None,
    reward_shift: bool = False,
    reward_scale: bool = False,
    eps: float = 1e-6,
    reduce_sums: Optional[SumReducer] = None,
) -> Tensor:
    """Normalize scalar scores before advantage estimation (ROLL's `reward_norm`).

    mode: "batch" (mean / Bessel std of all responses of the global batch; pass
    `reduce_sums` for multi-rank), "group" (of the responses of one prompt; a group of
    one response is centred to 0 and not scaled), "running" (of every score seen so far:
    `tracker` is updated with this batch first, from the `reduce_sums`-reduced moments of
    all ranks, then used; this is the tracker's only update, so call once per step),
    "none" (unchanged).
    `reward_shift` only subtracts the mean, `reward_scale` only divides by (std + eps);
    neither means (r - mean) / (std + eps). Population: one value per response.
    """
    if mode not in REWARD_NORMS:
        raise ValueError(f"reward_norm {mode!r} is not one of {', '.join(map(repr, REWARD_NORMS))}")
    if reward_shift and reward_scale:
        raise ValueError("reward_shift and reward_scale are exclusive (set neither for full normalization)")
    if mode == "none":
        return scores_B
    x64_B = scores_B.detach().to(torch.float64)
    if mode == "group":
        if group_ids_B is None:
            raise ValueError('reward_norm="group" needs group_ids')
        mean, std = group_moments(scores_B, group_ids_B)[:2]
    elif mode == "batch":
        sums = moment_sums(scores_B)
        if reduce_sums is not None:
            sums = reduce_sums(sums)
        count, total, sumsq = sums.unbind()
        mean = total / count.clamp(min=1)
        var = (sumsq - total * mean).clamp(min=0) / (count - 1).clamp(min=1)
        std = torch.where(count > 1, var.sqrt(), torch.ones_like(var))
    else:
        if tracker is None:
            raise ValueError('reward_norm="running" needs a RunningMeanStd tracker')
        tracker.update(scores_B, reduce_sums)
        mean, std = tracker.mean, tracker.std
    if reward_shift:
        out_B = x64_B - mean
    elif reward_scale:
        out_B = x64_B / (std + eps)
    else:
        out_B = (x64_B - mean) / (std + eps)
    return out_B.to(torch.promote_types(scores_B.dtype, torch.float32))


def overlong_penalty(
    lengths_B: Tensor, max_len: int, buffer_len: int, penalty_factor: float = 1.0
) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476, eq. 13), [B].

    With L_max = `max_len` (the response length limit) and L_cache = `buffer_len`:
      0                                 if |y| <= L_max - L_cache,
      ((L_max - L_cache) - |y|) / L_cache   if L_max - L_cache < |y| <= L_max,
      -1                                if |y| > L_max,
    times `penalty_factor` (1 in the paper). Added to the score of each response.
    """
    if buffer_len <= 0 or buffer_len > max_len:
        raise ValueError(f"overlong buffer_len must be in (0, max_len={max_len}], got {buffer_len}")
    expected = max_len - buffer_len
    excess_B = (lengths_B.to(torch.float64) - expected).clamp(min=0)
    pen_B = (-excess_B / buffer_len).clamp(min=-1.0) * penalty_factor
    return pen_B.to(torch.float32)


def overlong_filter(mask_BT: Tensor, truncated_B: Tensor) -> Tensor:
    """Overlong filtering (DAPO, arXiv 2503.14476, sec. 3.4; LitePPO sec. 4.4): zero the
    loss mask of truncated responses so they add nothing to the loss. They still count
    in `num_seqs` (see `aggregate_loss`) and in the reward statistics."""
    if truncated_B.dim() != 1 or truncated_B.shape[0] != mask_BT.shape[0]:
        raise ValueError(f"truncated must be [B] for mask {tuple(mask_BT.shape)}, got {tuple(truncated_B.shape)}")
    keep_B1 = (~truncated_B.bool())[:, None]
    return mask_BT * keep_B1.to(mask_BT.dtype)


def groups_with_signal(scores_B: Tensor, group_ids_B: Tensor) -> Tensor:
    """Dynamic sampling's filter (DAPO, arXiv 2503.14476, sec. 3.2, eq. 11: keep a prompt
    only if ``0 < |{correct}| < G``), on raw scores: bool [B], True for every response of a
    group whose scores are not all equal. A group of one response has no spread and is
    dropped. Group-relative advantages of an all-equal group are zero, so it would add
    nothing but noise to the batch statistics."""
    inverse_B, num_groups = group_index(group_ids_B)
    x_B = scores_B.detach().to(torch.float64)
    low_G = torch.full((num_groups,), float("inf"), dtype=torch.float64).scatter_reduce(0, inverse_B, x_B, "amin")
    high_G = torch.full((num_groups,), float("-inf"), dtype=torch.float64).scatter_reduce(0, inverse_B, x_B, "amax")
    return (high_G > low_G)[inverse_B]


def shape_rewards(
    scores_B: Tensor,
    *,
    group_ids_B: Optional[Tensor] = None,
    lengths_B: Optional[Tensor] = None,
    reward_norm: RewardNorm = "none",
    reward_shift: bool = False,
    reward_scale: bool = False,
    reward_clip: Optional[float] = None,
    tracker: Optional[RunningMeanStd] = None,
    overlong_max_len: Optional[int] = None,
    overlong_buffer_len: Optional[int] = None,
    overlong_penalty_factor: float = 1.0,
    eps: float = 1e-6,
    reduce_sums: Optional[SumReducer] = None,
) -> Tensor:
    """All scalar shaping in one call: overlong penalty (when `overlong_buffer_len` is
    set; needs `lengths_B` and `overlong_max_len`), `normalize_rewards`, `clip_rewards`."""
    out_B = scores_B.to(torch.promote_types(scores_B.dtype, torch.float32))
    if overlong_buffer_len is not None:
        if lengths_B is None or overlong_max_len is None:
            raise ValueError("the overlong penalty needs lengths_B and overlong_max_len")
        out_B = out_B + overlong_penalty(
            lengths_B, overlong_max_len, overlong_buffer_len, overlong_penalty_factor
        ).to(out_B.device, out_B.dtype)
    out_B = normalize_rewards(
        out_B,
        reward_norm,
        group_ids_B=group_ids_B,
        tracker=tracker,
        reward_shift=reward_shift,
        reward_scale=reward_scale,
        eps=eps,
        reduce_sums=reduce_sums,
    )
    return clip_rewards(out_B, reward_clip)
