"""Pure-torch RL algorithm math: advantages, returns, KL, losses, reward shaping.

Imports torch only: no torch.distributed, Megatron or SGLang. A statistic that covers
the global batch (batch std over data-parallel ranks, global token / sequence counts) is
computed by the parallel layer and passed in, so one function serves one rank and many:
either as finished numbers (`batch_mean=`, `batch_std=`, `num_tokens=`, `num_seqs=`,
`mean=`/`var=`) or as a `reduce_sums` callable that all-reduces the float64 moment sums
`[count, sum, sum_of_squares]` produced by `moment_sums` (see `megappo.algo.stats`).

Tensors are right-padded [B, T] over response tokens with a 0/1 `mask` that is 1 on a
prefix of each row; names carry their shape (`logprobs_BT`, `scores_B`).

Modules:
  stats       masked / grouped statistics, moment sums, masked whitening
  returns     GAE and REINFORCE++ returns (vectorized reverse discounted cumsum)
  advantages  outcome advantages (group / batch mean and std levels, LitePPO), RLOO
  kl          per-token KL estimators, exact KL, fixed / adaptive KL coefficient
  losses      loss aggregation, PPO policy loss, clipped value loss, KL loss
  decoupled   the decoupled PPO loss of asynchronous RL (AReaL), stale-token masks
  shaping     reward normalization, clipping, overlong penalty and filter, dynamic sampling's group filter
  registry    advantage estimators by name

The advantage registry. The trainer calls one function for every algorithm:

    advantages_BT, returns_BT = estimate_advantages(
        name,                       # "gae" | "grpo" | "rloo" | "reinforce_pp" | "reinforce_pp_baseline"
        scores_B=..., mask_BT=..., group_ids_B=..., values_BT=..., kl_BT=...,
        token_rewards_BT=None, reduce_sums=None,
        params=AdvantageParams(gamma, lambd, mean_level, std_level, batch_std_of, eps, kl_coef),
    )                               # or the AdvantageParams fields as keyword arguments
    advantages_BT = postprocess_advantages(advantages_BT, mask_BT, whiten=..., clip=...)

`returns_BT` is None for the outcome estimators (no critic targets). Each registered
estimator has the signature `fn(AdvantageInputs, AdvantageParams) -> (advantages_BT,
returns_BT | None)`; `register_advantage_estimator(name)` adds one. Named algorithms are
settings of these knobs: GRPO = grpo(group, group) + seq-mean-token-mean; LitePPO =
grpo(group, batch, batch_std_of="raw") + token-mean; Dr.GRPO = grpo(group, none) +
seq-mean-token-sum-norm.
"""

from megappo.algo.advantages import (
    BATCH_STD_OF,
    MEAN_LEVELS,
    STD_LEVELS,
    broadcast_to_tokens,
    clip_advantages,
    outcome_advantages,
    outcome_std_population,
    rloo_advantages,
)
from megappo.algo.kl import (
    KL_KINDS,
    AdaptiveKLController,
    FixedKLController,
    add_token_level_kl,
    full_kl,
    kl_penalty,
    make_kl_controller,
)
from megappo.algo.decoupled import decoupled_policy_loss, stale_token_mask
from megappo.algo.losses import (
    LOSS_AGG_MODES,
    aggregate_loss,
    explained_variance,
    kl_loss,
    policy_loss,
    tis_weights,
    value_loss,
)
from megappo.algo.registry import (
    AdvantageInputs,
    AdvantageParams,
    advantage_estimator_names,
    estimate_advantages,
    postprocess_advantages,
    register_advantage_estimator,
)
from megappo.algo.returns import (
    compute_gae,
    reinforce_pp_returns,
    reverse_discounted_cumsum,
    scores_to_token_rewards,
)
from megappo.algo.shaping import (
    REWARD_NORMS,
    RunningMeanStd,
    clip_rewards,
    groups_with_signal,
    normalize_rewards,
    overlong_filter,
    overlong_penalty,
    shape_rewards,
)
from megappo.algo.stats import (
    group_moments,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    moment_sums,
    moments_from_sums,
)

__all__ = [
    "decoupled_policy_loss",
    "stale_token_mask",
    "BATCH_STD_OF",
    "KL_KINDS",
    "LOSS_AGG_MODES",
    "MEAN_LEVELS",
    "REWARD_NORMS",
    "STD_LEVELS",
    "AdaptiveKLController",
    "AdvantageInputs",
    "AdvantageParams",
    "FixedKLController",
    "RunningMeanStd",
    "add_token_level_kl",
    "advantage_estimator_names",
    "aggregate_loss",
    "broadcast_to_tokens",
    "clip_advantages",
    "clip_rewards",
    "compute_gae",
    "estimate_advantages",
    "explained_variance",
    "full_kl",
    "group_moments",
    "kl_loss",
    "groups_with_signal",
    "kl_penalty",
    "make_kl_controller",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "moment_sums",
    "moments_from_sums",
    "normalize_rewards",
    "outcome_advantages",
    "outcome_std_population",
    "overlong_filter",
    "overlong_penalty",
    "policy_loss",
    "postprocess_advantages",
    "register_advantage_estimator",
    "reinforce_pp_returns",
    "reverse_discounted_cumsum",
    "rloo_advantages",
    "scores_to_token_rewards",
    "shape_rewards",
    "tis_weights",
    "value_loss",
]
