"""Masked and grouped statistics shared by the advantage estimators and losses.

Shape legend: B = responses in this rank's batch, T = response tokens (right padded),
G = distinct groups (prompts) among the B responses.

Global statistics. Nothing here talks to other ranks. A statistic that must cover the
global batch is built from *moment sums*: `moment_sums` returns the float64 vector
`[count, sum, sum_of_squares]` of this rank's data; the parallel layer all-reduces it
(SUM over data-parallel ranks) and `moments_from_sums` turns the result into a mean and a
variance. Functions that need a global statistic take such a reducer as `reduce_sums`
(a callable `Tensor[3] -> Tensor[3]`; `None` means one rank, the identity) or accept the
finished mean / variance as keyword arguments. The sums are float64, and the sum of
squares is built from a two-pass local estimate (see `moment_sums`), so the variance keeps
float64-level precision at any offset without float64 passes over the [B, T] data.

Standard deviations use Bessel's correction (divide by n - 1), as `torch.std`, verl and
ROLL do. A population of fewer than two elements has no sample variance; here it is
reported as variance 0 by `masked_var` / `moments_from_sums` (the caller decides what a
zero spread means) and as std 1 by `group_moments` (no scaling; verl's convention).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

SumReducer = Callable[[Tensor], Tensor]
"""Sums a float64 vector of moment sums over data-parallel ranks (all-reduce SUM)."""


def masked_sum(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Sum of `x` where `mask` is 1 (over all elements, or along `dim`)."""
    prod = x * mask
    return prod.sum() if dim is None else prod.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Mean of `x` over the elements where `mask` is 1; 0 where the mask is empty."""
    total = masked_sum(x, mask, dim)
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return total / count.clamp(min=1).to(total.dtype)


def masked_var(x: Tensor, mask: Tensor, *, unbiased: bool = True) -> Tensor:
    """Variance of `x` over the masked elements (a scalar).

    Bessel-corrected (n - 1) when `unbiased`; 0 when fewer than two elements are masked
    (verl raises instead; a micro-batch with one valid token is not an error here).
    """
    count = mask.sum().to(x.dtype)
    mean = masked_mean(x, mask)
    sq = masked_sum((x - mean) ** 2, mask)
    denom = count - 1 if unbiased else count
    return torch.where(denom > 0, sq / denom.clamp(min=1), torch.zeros_like(sq))


EXACT_MOMENTS_MAX_NUMEL = 2**16
"""`moment_sums` of at most this many elements runs in float64 (cheap at that size)."""


def moment_sums(x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Float64 `[count, sum, sum_of_squares]` of `x` (masked elements only, if given; the
    mask is 0/1).

    All-reduce the result over ranks and pass it to `moments_from_sums` to obtain the
    global mean and variance.

    Up to `EXACT_MOMENTS_MAX_NUMEL` elements (per-response and small token tensors) in
    float64, exactly (float32 values square exactly in float64). Larger tensors in `x`'s
    precision (at least float32), not by casting [B, T] to float64 (which made whitening
    cost 3.5x GAE at B=512, T=16384), without losing precision that matters (the mean and
    variance to ~1e-7 relative, the precision of the float32 data):
      1. c = a rough local mean (a BLAS dot product with the mask);
      2. d = (x - c) * mask, one [B, T] temporary; r = sum(d), q = sum(d^2) in place.
    torch's float32 sums are cascaded (pairwise) on CPU and tree-reduced on GPU, and d is
    centred, so r and q have no cancellation; then, in float64, sum(x) = n c + r and
    sum(x^2) = q + 2 c sum(x) - n c^2 (exact identities). The cancellation left in
    `moments_from_sums` (sumsq - sum * mean) thus happens in float64 on accurate terms:
    tests check the variance against float64 to 1e-5 relative at offsets of 1e3 standard
    deviations, where a float32 one-pass sum of squares is off by orders of magnitude.
    """
    xd = x.detach()
    if not xd.is_floating_point() or xd.dtype in (torch.float16, torch.bfloat16) or xd.numel() <= EXACT_MOMENTS_MAX_NUMEL:
        xd = xd.to(torch.float64) if xd.numel() <= EXACT_MOMENTS_MAX_NUMEL else xd.float()
    if mask is None:
        count64 = torch.tensor(float(xd.numel()), dtype=torch.float64, device=xd.device)
        c = xd.sum() / max(xd.numel(), 1)
        d = xd - c
    else:
        m = mask.detach().to(xd.dtype)
        if m.shape != xd.shape:
            xd, m = torch.broadcast_tensors(xd, m)
        # A float32 sum of 0/1 is exact while every partial sum stays below 2^24.
        count = m.sum() if m.numel() < 2**24 else m.sum(dtype=torch.float64)
        count64 = count.to(torch.float64)
        c = torch.dot(xd.reshape(-1), m.reshape(-1)) / count.clamp(min=1).to(xd.dtype)
        d = (xd - c).mul_(m)
    c64 = c.to(torch.float64)  # the shift actually applied (x's precision)
    r64 = d.sum().to(torch.float64)
    q64 = d.mul_(d).sum().to(torch.float64)
    total64 = count64 * c64 + r64
    sumsq = q64 + 2 * c64 * total64 - count64 * c64 * c64
    return torch.stack([count64, total64, sumsq])


def moments_from_sums(sums: Tensor, *, unbiased: bool = True) -> tuple[Tensor, Tensor]:
    """(mean, variance) from `[count, sum, sum_of_squares]`; float64 0-dim tensors.

    Variance is Bessel-corrected when `unbiased`; 0 for fewer than two elements; the
    mean of an empty population is 0.
    """
    assert sums.shape == (3,), f"expected [count, sum, sumsq], got shape {tuple(sums.shape)}"
    count, total, sumsq = sums.to(torch.float64).unbind()
    n = count.clamp(min=1)
    mean = total / n
    m2 = (sumsq - total * mean).clamp(min=0)
    denom = count - 1 if unbiased else count
    var = torch.where(denom > 0, m2 / denom.clamp(min=1), torch.zeros_like(m2))
    return mean, var


def masked_whiten(
    x: Tensor,
    mask: Tensor,
    *,
    shift_mean: bool = True,
    mean: Optional[Tensor | float] = None,
    var: Optional[Tensor | float] = None,
    sums: Optional[Tensor] = None,
    eps: float = 1e-8,
) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the masked tokens; padded positions become 0.

    Population: every valid token of the batch counts once (a per-token statistic, so a
    long response weighs more than a short one), as verl's and ROLL's `masked_whiten`.
    Variance is Bessel-corrected. The statistics are this tensor's own unless the global
    ones are passed in: either `mean` and `var`, or `sums` (all-reduced `moment_sums`).
    With `shift_mean=False` the mean is added back (scale only).
    """
    if sums is not None:
        if mean is not None or var is not None:
            raise ValueError("masked_whiten: pass either `sums` or `mean`/`var`, not both")
        mean, var = moments_from_sums(sums)
    elif (mean is None) != (var is None):
        raise ValueError("masked_whiten: pass both `mean` and `var`, or neither")
    elif mean is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device)
    var_t = torch.as_tensor(var, dtype=x.dtype, device=x.device)
    # One new [B, T] tensor, updated in place (three temporaries before: a third of the time).
    out = x - mean_t
    out.mul_(torch.rsqrt(var_t + eps))
    if not shift_mean:
        out.add_(mean_t)
    return out.mul_(mask)


def group_index(group_ids_B: Tensor) -> tuple[Tensor, int]:
    """Dense group index in [0, G) for each sample, and G."""
    if group_ids_B.dim() != 1:
        raise ValueError(f"group_ids must be 1-D [B], got shape {tuple(group_ids_B.shape)}")
    if group_ids_B.is_floating_point():
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids_B.dtype}")
    uniq_G, inverse_B = torch.unique(group_ids_B, return_inverse=True)
    return inverse_B, int(uniq_G.numel())


def group_moments(x_B: Tensor, group_ids_B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample (group mean, group std, group size), each [B], computed in float64.

    The std is Bessel-corrected (torch.std); a group of one response has no sample std
    and gets std 1 (no scaling), as verl does.
    """
    if x_B.shape != group_ids_B.shape:
        raise ValueError(
            f"scores {tuple(x_B.shape)} and group_ids {tuple(group_ids_B.shape)} differ in shape"
        )
    inverse_B, num_groups = group_index(group_ids_B)
    x64_B = x_B.detach().to(torch.float64)
    count_G = torch.zeros(num_groups, dtype=torch.float64, device=x_B.device)
    count_G.index_add_(0, inverse_B, torch.ones_like(x64_B))
    sum_G = torch.zeros_like(count_G).index_add_(0, inverse_B, x64_B)
    mean_G = sum_G / count_G
    resid_B = x64_B - mean_G[inverse_B]
    sq_G = torch.zeros_like(count_G).index_add_(0, inverse_B, resid_B * resid_B)
    std_G = torch.where(
        count_G > 1, (sq_G / (count_G - 1).clamp(min=1)).sqrt(), torch.ones_like(sq_G)
    )
    return mean_G[inverse_B], std_G[inverse_B], count_G[inverse_B]
