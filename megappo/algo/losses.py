"""Actor and critic losses, and the one function that aggregates per-token losses.

Shape legend: B = responses in this micro-batch, T = response tokens (right padded).
Per-token tensors: `logprobs_BT` (current policy, with grad), `old_logprobs_BT` (the
policy that the trainer recomputed before the update), `rollout_logprobs_BT` (what the
rollout engine reported while sampling), `advantages_BT`, `mask_BT` (1 on a prefix).

Loss aggregation and layout invariance. Every mode is a sum of per-sequence terms over a
denominator (`aggregate_loss`). With the denominators taken over the *global* batch
(`num_tokens`, `num_seqs`, computed by the parallel layer for the whole mini-batch across
micro-batches and data-parallel ranks), the losses of the pieces of a split batch add up
to the loss of the whole batch, and so do their gradients.

Metrics are detached 0-dim tensors (no device sync); the ones called "masked token mean"
average over this micro-batch's valid tokens only, so the trainer should weight them by
the `num_tokens_local` metric when it averages micro-batches.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor

from megappo.algo.kl import kl_penalty
from megappo.algo.stats import masked_mean, masked_var

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
LossAggMode = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]

LOG_RATIO_CLAMP = 20.0
"""log(pi/pi_old) is clamped to +-20 before exp so an outlier token cannot overflow."""


def aggregate_loss(
    loss: Tensor,
    mask: Tensor,
    mode: LossAggMode,
    *,
    num_tokens: Optional[Tensor | float] = None,
    num_seqs: Optional[Tensor | float] = None,
    norm_len: Optional[float] = None,
) -> Tensor:
    """Reduce a per-token loss [B, T] to the scalar that is back-propagated.

    Modes (L_it the per-token loss, m_it the mask, |o_i| = sum_t m_it):
      - "token-mean": sum_it m_it L_it / num_tokens (DAPO, arXiv 2503.14476, sec. 3.3;
        LitePPO's token-level loss). num_tokens defaults to this batch's sum of mask.
      - "seq-mean-token-sum": sum_i (sum_t m_it L_it) / num_seqs.
      - "seq-mean-token-mean": sum_i (sum_t m_it L_it / |o_i|) / num_seqs (GRPO, arXiv
        2402.03300, eq. 3). A row with an empty mask contributes 0.
      - "seq-mean-token-sum-norm": sum_i (sum_t m_it L_it / norm_len) / num_seqs, with
        norm_len a constant, the response length limit (Dr.GRPO, arXiv 2503.20783,
        replaces 1/|o_i| by a constant). `norm_len` is required: the padded T
        of a micro-batch varies and would break layout invariance (verl and ROLL
        default to it).
    num_seqs defaults to B, the rows of this batch, counting rows whose mask is all zero
    (filtered responses still count as sequences, so the denominator does not depend on
    filtering; ROLL counts them too when it is given its global sample count). Pass
    global `num_tokens` / `num_seqs` for micro-batch and data-parallel invariance. A
    denominator below 1 (an empty batch) is taken as 1, so the loss is 0, not NaN.
    """
    loss_BT, mask_BT = loss, mask
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode {mode!r} is not one of {', '.join(map(repr, LOSS_AGG_MODES))}")
    if loss_BT.shape != mask_BT.shape or loss_BT.dim() != 2:
        raise ValueError(
            f"loss and mask must share one [B, T] shape, got {tuple(loss_BT.shape)} and {tuple(mask_BT.shape)}"
        )
    m_BT = mask_BT.to(loss_BT.dtype)
    if mode == "token-mean":
        denom = m_BT.sum() if num_tokens is None else num_tokens
        return (loss_BT * m_BT).sum() / _at_least_one(denom)
    seq_sum_B = (loss_BT * m_BT).sum(dim=-1)
    if mode == "seq-mean-token-mean":
        seq_B = seq_sum_B / m_BT.sum(dim=-1).clamp(min=1)
    elif mode == "seq-mean-token-sum-norm":
        if norm_len is None or norm_len <= 0:
            raise ValueError(
                "loss_agg_mode 'seq-mean-token-sum-norm' needs a positive norm_len (the response length limit)"
            )
        seq_B = seq_sum_B / norm_len
    else:
        seq_B = seq_sum_B
    denom = loss_BT.shape[0] if num_seqs is None else num_seqs
    return seq_B.sum() / _at_least_one(denom)


def _at_least_one(count: Tensor | float) -> Tensor | float:
    """Counts are integers >= 0; an empty batch then yields loss 0 instead of NaN."""
    return count.clamp(min=1) if isinstance(count, Tensor) else max(count, 1)


def tis_weights(old_logprobs_BT: Tensor, rollout_logprobs_BT: Tensor, tis_clip: float) -> Tensor:
    """Truncated importance-sampling weights min(pi_old / pi_rollout, tis_clip), detached.

    Corrects for the rollout engine sampling from a slightly different distribution than
    the trainer's pi_old (kernels, precision): Yao et al. 2025, "Your efficient RL
    framework secretly brings you off-policy RL training" (truncated IS, the per-token
    form verl calls TIS).
    """
    if tis_clip <= 0:
        raise ValueError(f"tis_clip must be positive, got {tis_clip}")
    dt = torch.promote_types(old_logprobs_BT.dtype, torch.float32)
    log_w_BT = (old_logprobs_BT.detach().to(dt) - rollout_logprobs_BT.detach().to(dt)).clamp(max=LOG_RATIO_CLAMP)
    return torch.exp(log_w_BT).clamp(max=tis_clip)


def _masked_extreme(x_BT: Tensor, mask_BT: Tensor, largest: bool) -> Tensor:
    fill = torch.full_like(x_BT, float("-inf") if largest else float("inf"))
    vals_BT = torch.where(mask_BT.bool(), x_BT, fill)
    out = vals_BT.max() if largest else vals_BT.min()
    return torch.where(mask_BT.bool().any(), out, torch.full_like(out, float("nan")))


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip_c: Optional[float] = None,
    loss_agg_mode: LossAggMode = "token-mean",
    num_tokens: Optional[Tensor | float] = None,
    num_seqs: Optional[Tensor | float] = None,
    norm_len: Optional[float] = None,
    rollout_logprobs: Optional[Tensor] = None,
    tis_clip: Optional[float] = None,
    entropy: Optional[Tensor] = None,
    entropy_coef: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, arXiv 1707.06347, eq. 7), as a loss.

    Per token, with ratio = exp(logprobs - old_logprobs):
      L = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high)).
    Symmetric PPO: clip_low = clip_high = pg_clip. Clip-higher (DAPO, arXiv 2503.14476,
    sec. 3.1): clip_high > clip_low. Dual clip (Ye et al. 2020, arXiv 1912.09729):
    for A < 0 the loss is further bounded by -A * dual_clip_c (c > 1, usually 3), so a
    token whose ratio exploded cannot dominate the update. TIS (`rollout_logprobs`,
    `tis_clip`): each token's loss is multiplied by `tis_weights`. Entropy bonus:
    `- entropy_coef * aggregate(entropy)`, same aggregation. Aggregated by
    `aggregate_loss(loss_agg_mode, num_tokens, num_seqs, norm_len)`.

    Metrics (masked token means over this micro-batch unless noted): pg_loss (the
    aggregated surrogate, before the entropy bonus), pg_clipfrac (clip bound active),
    pg_clipfrac_low (A < 0, ratio < 1 - clip_low), pg_clipfrac_high (A > 0,
    ratio > 1 + clip_high), dual_clip_frac (A < 0 and the dual bound active), ppo_kl
    (mean of old_logprobs - logprobs, k1 of pi_old vs pi), ratio_mean, ratio_min and
    ratio_max (extremes over valid tokens, NaN for an empty mask), entropy (if given),
    tis_weight_mean and tis_clipfrac (if TIS), num_tokens_local (count, not a mean).
    """
    logprobs_BT, old_logprobs_BT, advantages_BT, mask_BT = logprobs, old_logprobs, advantages, mask
    if not (logprobs_BT.shape == old_logprobs_BT.shape == advantages_BT.shape == mask_BT.shape):
        raise ValueError("logprobs, old_logprobs, advantages and mask must share one [B, T] shape")
    if not 0.0 <= clip_low < 1.0:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low}")
    if clip_high < 0.0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")
    if dual_clip_c is not None and dual_clip_c <= 1.0:
        raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")
    if (rollout_logprobs is None) != (tis_clip is None):
        raise ValueError("truncated IS needs both rollout_logprobs and tis_clip")

    dt = torch.promote_types(logprobs_BT.dtype, torch.float32)
    adv_BT = advantages_BT.detach().to(dt)
    log_ratio_BT = (logprobs_BT.to(dt) - old_logprobs_BT.detach().to(dt)).clamp(
        min=-LOG_RATIO_CLAMP, max=LOG_RATIO_CLAMP
    )
    ratio_BT = torch.exp(log_ratio_BT)
    unclipped_BT = -adv_BT * ratio_BT
    clipped_BT = -adv_BT * ratio_BT.clamp(min=1.0 - clip_low, max=1.0 + clip_high)
    surrogate_BT = torch.maximum(unclipped_BT, clipped_BT)
    neg_adv_BT = adv_BT < 0
    if dual_clip_c is not None:
        dual_bound_BT = -adv_BT * dual_clip_c
        dual_active_BT = neg_adv_BT & (dual_bound_BT < surrogate_BT)
        surrogate_BT = torch.where(neg_adv_BT, torch.minimum(surrogate_BT, dual_bound_BT), surrogate_BT)
    else:
        dual_active_BT = torch.zeros_like(neg_adv_BT)

    metrics: dict[str, Tensor] = {}
    if rollout_logprobs is not None:
        w_BT = tis_weights(old_logprobs_BT, rollout_logprobs, tis_clip)
        surrogate_BT = surrogate_BT * w_BT
        metrics["tis_weight_mean"] = masked_mean(w_BT, mask_BT)
        metrics["tis_clipfrac"] = masked_mean((w_BT >= tis_clip).float(), mask_BT)

    agg = dict(num_tokens=num_tokens, num_seqs=num_seqs, norm_len=norm_len)
    pg_loss = aggregate_loss(surrogate_BT, mask_BT, loss_agg_mode, **agg)
    loss = pg_loss
    if entropy is not None:
        if entropy.shape != mask_BT.shape:
            raise ValueError(f"entropy must be [B, T] like mask, got {tuple(entropy.shape)}")
        ent = aggregate_loss(entropy.to(dt), mask_BT, loss_agg_mode, **agg)
        loss = loss - entropy_coef * ent
        metrics["entropy"] = masked_mean(entropy.detach().to(dt), mask_BT)

    with torch.no_grad():
        r_BT = ratio_BT.detach()
        low_BT = neg_adv_BT & (r_BT < 1.0 - clip_low)
        high_BT = (adv_BT > 0) & (r_BT > 1.0 + clip_high)
        metrics.update(
            pg_loss=pg_loss.detach(),
            pg_clipfrac=masked_mean((low_BT | high_BT).float(), mask_BT),
            pg_clipfrac_low=masked_mean(low_BT.float(), mask_BT),
            pg_clipfrac_high=masked_mean(high_BT.float(), mask_BT),
            dual_clip_frac=masked_mean(dual_active_BT.float(), mask_BT),
            ppo_kl=masked_mean(-log_ratio_BT.detach(), mask_BT),
            ratio_mean=masked_mean(r_BT, mask_BT),
            ratio_min=_masked_extreme(r_BT, mask_BT, largest=False),
            ratio_max=_masked_extreme(r_BT, mask_BT, largest=True),
            num_tokens_local=mask_BT.sum().float(),
        )
    return loss, metrics


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    value_clip: Optional[float] = None,
    loss_agg_mode: LossAggMode = "token-mean",
    num_tokens: Optional[Tensor | float] = None,
    num_seqs: Optional[Tensor | float] = None,
    norm_len: Optional[float] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss, PPO style (as in OpenAI baselines' ppo2 and verl):
    L = 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2) per token, where
    c = `value_clip`; without it L = 0.5 * (V - R)^2. The 0.5 makes the gradient
    (V - R); scale the critic loss with the critic's learning rate / `vf_coef`.
    Aggregated like the policy loss.

    Metrics (masked token means over this micro-batch): vf_loss, vf_clipfrac (the clipped
    branch was larger), value_mean, value_error (mean of (V - R)^2, unclipped).
    """
    values_BT, old_values_BT, returns_BT, mask_BT = values, old_values, returns, mask
    if not (values_BT.shape == old_values_BT.shape == returns_BT.shape == mask_BT.shape):
        raise ValueError("values, old_values, returns and mask must share one [B, T] shape")
    dt = torch.promote_types(values_BT.dtype, torch.float32)
    v_BT = values_BT.to(dt)
    ret_BT = returns_BT.detach().to(dt)
    unclipped_BT = (v_BT - ret_BT) ** 2
    if value_clip is not None:
        if value_clip <= 0:
            raise ValueError(f"value_clip must be positive or None, got {value_clip}")
        old_BT = old_values_BT.detach().to(dt)
        v_clipped_BT = old_BT + (v_BT - old_BT).clamp(min=-value_clip, max=value_clip)
        clipped_BT = (v_clipped_BT - ret_BT) ** 2
        per_token_BT = 0.5 * torch.maximum(unclipped_BT, clipped_BT)
        clip_active_BT = clipped_BT > unclipped_BT
    else:
        per_token_BT = 0.5 * unclipped_BT
        clip_active_BT = torch.zeros_like(unclipped_BT, dtype=torch.bool)
    loss = aggregate_loss(
        per_token_BT, mask_BT, loss_agg_mode, num_tokens=num_tokens, num_seqs=num_seqs, norm_len=norm_len
    )
    with torch.no_grad():
        metrics = {
            "vf_loss": loss.detach(),
            "vf_clipfrac": masked_mean(clip_active_BT.float(), mask_BT),
            "value_mean": masked_mean(v_BT.detach(), mask_BT),
            "value_error": masked_mean(unclipped_BT.detach(), mask_BT),
        }
    return loss, metrics


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var(R - V) / Var(R) over the valid tokens (Bessel-corrected), a 0-dim tensor.

    1 is a perfect critic, 0 no better than a constant, negative worse. NaN when the
    returns have zero variance.
    """
    if not (values.shape == returns.shape == mask.shape):
        raise ValueError("values, returns and mask must share one shape")
    dt = torch.promote_types(values.dtype, torch.float32)
    v, r = values.detach().to(dt), returns.detach().to(dt)
    var_r = masked_var(r, mask)
    var_resid = masked_var(r - v, mask)
    return torch.where(var_r > 0, 1.0 - var_resid / var_r.clamp(min=1e-30), torch.full_like(var_r, float("nan")))


def kl_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    *,
    kind: str = "low_var_kl",
    loss_agg_mode: LossAggMode = "token-mean",
    num_tokens: Optional[Tensor | float] = None,
    num_seqs: Optional[Tensor | float] = None,
    norm_len: Optional[float] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """KL to the reference as a loss term (`use_kl_loss`; GRPO, arXiv 2402.03300, eq. 4
    uses k3): aggregate(kl_penalty(logprobs, ref_logprobs, kind)). The trainer adds
    `kl_loss_coef` times it to the policy loss. `kind="full"` takes [B, T, V] inputs.
    Metric: kl_loss (the aggregated value, detached).
    """
    kl_BT = kl_penalty(logprobs, ref_logprobs.detach(), kind)
    loss = aggregate_loss(kl_BT, mask, loss_agg_mode, num_tokens=num_tokens, num_seqs=num_seqs, norm_len=norm_len)
    return loss, {"kl_loss": loss.detach()}
