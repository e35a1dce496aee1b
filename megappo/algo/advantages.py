"""Outcome advantages from one scalar score per response, and advantage post-processing.

Shape legend: B = responses in this rank's batch, T = response tokens (right padded).
`group_ids_B` is an integer tensor: responses sharing an id were sampled from the same
prompt. Groups must not straddle ranks (the data layer keeps a prompt's responses on one
data-parallel rank); batch-level statistics may be global and are passed in.

Population of every statistic here: one value per *response* (per sample), never per
token. (AReaL normalizes per token under its loss mask, so its batch statistics weigh long
responses more.)
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

from megappo.algo.stats import group_moments

MEAN_LEVELS = ("group", "batch", "none")
STD_LEVELS = ("group", "batch", "none")
BATCH_STD_OF = ("raw", "group_centered")

MeanLevel = Literal["group", "batch", "none"]
StdLevel = Literal["group", "batch", "none"]
BatchStdOf = Literal["raw", "group_centered"]


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}")


def outcome_std_population(
    scores_B: Tensor, group_ids_B: Optional[Tensor], batch_std_of: BatchStdOf
) -> Tensor:
    """The per-response values whose batch std `outcome_advantages` divides by.

    "raw": the scores themselves (LitePPO, verl, ROLL). "group_centered": each score minus
    its group mean (AReaL). The parallel layer all-reduces `moment_sums` of this tensor
    to get the global batch std.
    """
    _check_choice("batch_std_of", batch_std_of, BATCH_STD_OF)
    if batch_std_of == "raw":
        return scores_B
    if group_ids_B is None:
        raise ValueError('batch_std_of="group_centered" needs group_ids')
    mean_B, _, _ = group_moments(scores_B, group_ids_B)
    return (scores_B.to(torch.float64) - mean_B).to(scores_B.dtype)


def outcome_advantages(
    scores: Tensor,
    group_ids: Optional[Tensor],
    mean_level: MeanLevel,
    std_level: StdLevel,
    eps: float = 1e-6,
    *,
    batch_std_of: BatchStdOf = "raw",
    batch_mean: Optional[Tensor | float] = None,
    batch_std: Optional[Tensor | float] = None,
) -> Tensor:
    """A_i = (r_i - mean) / (std + eps), one advantage per response, [B].

    `mean_level` / `std_level` choose the population of each statistic:
      - "group": the responses of the same prompt (GRPO, Shao et al. 2024, arXiv
        2402.03300, sec. 4.1.2: A = (r - mean(group)) / std(group));
      - "batch": all responses of the global batch;
      - "none": mean 0 / std 1 (no centring / no scaling; Dr.GRPO, arXiv 2503.20783,
        drops the std).
    LitePPO (Liu et al. 2025, arXiv 2508.08221, sec. 4.1 and its LitePPO recipe) is mean_level="group",
    std_level="batch": A = (r - mean_group) / (std_batch + eps), std_batch taken over the
    *raw* scores of the whole batch (`batch_std_of="raw"`, as the paper, verl and ROLL).
    AReaL instead takes its batch std around the group means, i.e. the std of the
    group-centred residuals r - mean_group (`batch_std_of="group_centered"`). With
    mean_level="batch" the two coincide.

    Stds are Bessel-corrected (torch.std); a group (or batch) of one response has no
    sample std and is not scaled (std 1). A singleton group with mean_level="group" has
    advantage 0 (its own mean; verl uses mean 0 there and passes the raw score through).

    Multi-rank: `batch_mean` / `batch_std` supply the global batch statistics (the
    parallel layer computes them from `moment_sums` of `scores` and of
    `outcome_std_population(...)` respectively); when omitted they are this tensor's own.
    Computed in float64, returned in the scores' float dtype (at least float32).
    """
    scores_B = scores
    _check_choice("mean_level", mean_level, MEAN_LEVELS)
    _check_choice("std_level", std_level, STD_LEVELS)
    _check_choice("batch_std_of", batch_std_of, BATCH_STD_OF)
    if scores_B.dim() != 1:
        raise ValueError(f"scores must be 1-D [B], got shape {tuple(scores_B.shape)}")
    needs_groups = "group" in (mean_level, std_level) or (
        std_level == "batch" and batch_std_of == "group_centered" and batch_std is None
    )
    if needs_groups and group_ids is None:
        raise ValueError(
            f"mean_level={mean_level!r}, std_level={std_level!r} need group_ids (one id per prompt)"
        )
    out_dtype = torch.promote_types(scores_B.dtype, torch.float32)
    x64_B = scores_B.detach().to(torch.float64)
    if needs_groups:
        g_mean_B, g_std_B, _ = group_moments(scores_B, group_ids)

    if mean_level == "group":
        centred_B = x64_B - g_mean_B
    elif mean_level == "batch":
        mean = x64_B.mean() if batch_mean is None else batch_mean
        centred_B = x64_B - torch.as_tensor(mean, dtype=torch.float64, device=x64_B.device)
    else:
        centred_B = x64_B

    if std_level == "group":
        std_B = g_std_B
    elif std_level == "batch":
        if batch_std is None:
            pop_B = x64_B if batch_std_of == "raw" else x64_B - g_mean_B
            batch_std = pop_B.std() if pop_B.numel() > 1 else torch.ones((), dtype=torch.float64)
        std_B = torch.as_tensor(batch_std, dtype=torch.float64, device=x64_B.device)
    else:
        return centred_B.to(out_dtype)
    return (centred_B / (std_B + eps)).to(out_dtype)


def rloo_advantages(scores: Tensor, group_ids: Tensor) -> Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024, arXiv 2402.14740,
    "RLOO"): A_i = r_i - mean_{j != i in group} r_j = n/(n-1) * (r_i - mean_group), [B].

    No std scaling. A group of one response has no leave-one-out baseline; its advantage
    is 0 (verl passes the raw score through instead).
    """
    scores_B = scores
    if scores_B.dim() != 1:
        raise ValueError(f"scores must be 1-D [B], got shape {tuple(scores_B.shape)}")
    out_dtype = torch.promote_types(scores_B.dtype, torch.float32)
    mean_B, _, count_B = group_moments(scores_B, group_ids)
    x64_B = scores_B.detach().to(torch.float64)
    scale_B = torch.where(count_B > 1, count_B / (count_B - 1).clamp(min=1), torch.zeros_like(count_B))
    return (scale_B * (x64_B - mean_B)).to(out_dtype)


def broadcast_to_tokens(advantages_B: Tensor, mask_BT: Tensor) -> Tensor:
    """Copy each response's scalar advantage onto its valid tokens: [B] -> [B, T]."""
    if advantages_B.dim() != 1 or mask_BT.dim() != 2 or advantages_B.shape[0] != mask_BT.shape[0]:
        raise ValueError(
            f"advantages [B] and mask [B, T] disagree: {tuple(advantages_B.shape)} vs {tuple(mask_BT.shape)}"
        )
    return advantages_B[:, None] * mask_BT.to(advantages_B.dtype)


def clip_advantages(advantages: Tensor, clip: Optional[float]) -> Tensor:
    """Clamp advantages to [-clip, clip] (ROLL's `advantage_clip`); None leaves them."""
    if clip is None:
        return advantages
    if clip <= 0:
        raise ValueError(f"advantage_clip must be positive or None, got {clip}")
    return advantages.clamp(min=-clip, max=clip)
