"""The decoupled PPO objective for off-policy (asynchronous) rollouts, and stale-token masks.

Shape legend: B = responses in this micro-batch, T = response tokens (right padded).

Three policies meet in an asynchronous step (AReaL, Fu et al. 2025, arXiv 2505.24298,
sec. 5.2, eq. 5): the behaviour policy pi_behav that sampled the tokens (its log-probs come
from the rollout engine: ``behav_logprobs_BT``, possibly several policy versions old), the
proximal policy pi_prox the update is kept close to (the trainer's own recompute with the
weights before this step's first optimizer step: ``prox_logprobs_BT``, our ``old_logprobs``),
and the policy being trained pi_theta (``logprobs_BT``, with grad). Per token,

    J = w * min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A),
    r = pi_theta / pi_prox,      w = min(pi_prox / pi_behav, behav_weight_cap)   (detached)

and the loss is -J, aggregated by ``aggregate_loss``. Plain PPO clips r against pi_behav,
which for a stale sample is a policy the trainer has moved away from, so the trust region
is centred in the wrong place; here it is centred on pi_prox and the behaviour -> proximal
gap is corrected by importance weighting.

Where this departs from AReaL: AReaL *masks* a token whose weight exceeds its cap
(``behav_imp_weight_cap``: w set to 0); we *truncate* it to the cap (the truncated IS of
Ionides 2008 / Espeholt et al. 2018, as the issue asks), which keeps the token's gradient
direction with a bounded weight. With behav = prox (an on-policy sample whose engine
log-probs equal the trainer's) w = 1 and the loss is exactly ``policy_loss``'s.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from megappo.algo.losses import LOG_RATIO_CLAMP, LossAggMode, _masked_extreme, aggregate_loss
from megappo.algo.stats import masked_mean


def decoupled_policy_loss(
    logprobs: Tensor,
    prox_logprobs: Tensor,
    behav_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    behav_weight_cap: float,
    dual_clip_c: Optional[float] = None,
    loss_agg_mode: LossAggMode = "token-mean",
    num_tokens: Optional[Tensor | float] = None,
    num_seqs: Optional[Tensor | float] = None,
    norm_len: Optional[float] = None,
    entropy: Optional[Tensor] = None,
    entropy_coef: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The decoupled PPO loss (module docstring), a scalar, and its metrics.

    Per token: L = w * max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)); with
    ``dual_clip_c`` (arXiv 1912.09729) the A < 0 branch is further bounded by -A c before
    the weight is applied. Entropy bonus: ``- entropy_coef * aggregate(entropy)``.

    Metrics (masked token means over this micro-batch unless noted): pg_loss,
    pg_clipfrac (A > 0 and r > 1 + clip_high, or A < 0 and r < 1 - clip_low),
    dual_clip_frac, ppo_kl (mean of prox - logprobs), ratio_mean, ratio_min, ratio_max,
    behav_weight_mean (after truncation), behav_weight_clipfrac (truncated tokens),
    behav_prox_kl (mean of behav - prox over the sampled tokens: the k1 estimate of
    KL(pi_behav || pi_prox)), entropy (if given), num_tokens_local (a count).
    """
    logprobs_BT, prox_BT, behav_BT, advantages_BT, mask_BT = logprobs, prox_logprobs, behav_logprobs, advantages, mask
    if not (logprobs_BT.shape == prox_BT.shape == behav_BT.shape == advantages_BT.shape == mask_BT.shape):
        raise ValueError("logprobs, prox_logprobs, behav_logprobs, advantages and mask must share one [B, T] shape")
    if not 0.0 <= clip_low < 1.0:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low}")
    if clip_high < 0.0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")
    if behav_weight_cap < 1.0:
        raise ValueError(f"behav_weight_cap must be >= 1 (w = 1 on policy), got {behav_weight_cap}")
    if dual_clip_c is not None and dual_clip_c <= 1.0:
        raise ValueError(f"dual_clip_c must be > 1, got {dual_clip_c}")

    dt = torch.promote_types(logprobs_BT.dtype, torch.float32)
    adv_BT = advantages_BT.detach().to(dt)
    prox_BT = prox_BT.detach().to(dt)
    behav_BT = behav_BT.detach().to(dt)
    log_ratio_BT = (logprobs_BT.to(dt) - prox_BT).clamp(min=-LOG_RATIO_CLAMP, max=LOG_RATIO_CLAMP)
    ratio_BT = torch.exp(log_ratio_BT)
    surrogate_BT = torch.maximum(-adv_BT * ratio_BT, -adv_BT * ratio_BT.clamp(min=1.0 - clip_low, max=1.0 + clip_high))
    neg_adv_BT = adv_BT < 0
    if dual_clip_c is not None:
        dual_bound_BT = -adv_BT * dual_clip_c
        dual_active_BT = neg_adv_BT & (dual_bound_BT < surrogate_BT)
        surrogate_BT = torch.where(neg_adv_BT, torch.minimum(surrogate_BT, dual_bound_BT), surrogate_BT)
    else:
        dual_active_BT = torch.zeros_like(neg_adv_BT)
    raw_w_BT = torch.exp((prox_BT - behav_BT).clamp(min=-LOG_RATIO_CLAMP, max=LOG_RATIO_CLAMP))
    w_BT = raw_w_BT.clamp(max=behav_weight_cap)
    surrogate_BT = surrogate_BT * w_BT

    agg = dict(num_tokens=num_tokens, num_seqs=num_seqs, norm_len=norm_len)
    pg_loss = aggregate_loss(surrogate_BT, mask_BT, loss_agg_mode, **agg)
    loss = pg_loss
    metrics: dict[str, Tensor] = {}
    if entropy is not None:
        if entropy.shape != mask_BT.shape:
            raise ValueError(f"entropy must be [B, T] like mask, got {tuple(entropy.shape)}")
        loss = loss - entropy_coef * aggregate_loss(entropy.to(dt), mask_BT, loss_agg_mode, **agg)
        metrics["entropy"] = masked_mean(entropy.detach().to(dt), mask_BT)
    with torch.no_grad():
        r_BT = ratio_BT.detach()
        clipped_BT = (neg_adv_BT & (r_BT < 1.0 - clip_low)) | ((adv_BT > 0) & (r_BT > 1.0 + clip_high))
        metrics.update(
            pg_loss=pg_loss.detach(),
            pg_clipfrac=masked_mean(clipped_BT.float(), mask_BT),
            dual_clip_frac=masked_mean(dual_active_BT.float(), mask_BT),
            ppo_kl=masked_mean(-log_ratio_BT.detach(), mask_BT),
            ratio_mean=masked_mean(r_BT, mask_BT),
            ratio_min=_masked_extreme(r_BT, mask_BT, largest=False),
            ratio_max=_masked_extreme(r_BT, mask_BT, largest=True),
            behav_weight_mean=masked_mean(w_BT, mask_BT),
            behav_weight_clipfrac=masked_mean((raw_w_BT > behav_weight_cap).float(), mask_BT),
            behav_prox_kl=masked_mean(behav_BT - prox_BT, mask_BT),
            num_tokens_local=mask_BT.sum().float(),
        )
    return loss, metrics


def stale_token_mask(mask_BT: Tensor, token_versions_BT: Tensor, trained_version: int, max_lag: int) -> Tensor:
    """``mask_BT`` with the tokens sampled more than ``max_lag`` policy versions before
    ``trained_version`` (the version of the weights the step starts from) set to 0. The
    objective takes its loss denominators from the returned mask, so a masked token leaves
    both the loss and the token count."""
    if max_lag < 0:
        raise ValueError(f"max_lag must be >= 0, got {max_lag}")
    keep_BT = (trained_version - token_versions_BT) <= max_lag
    return mask_BT * keep_BT.to(mask_BT.dtype)
