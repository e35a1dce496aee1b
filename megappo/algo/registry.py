"""The advantage-estimator registry: one name -> one function, one signature.

Shape legend: B = responses in this rank's batch, T = response tokens (right padded).

Every estimator is `fn(inputs: AdvantageInputs, params: AdvantageParams) ->
(advantages_BT, returns_BT or None)`; the trainer calls `estimate_advantages(name, ...)`
and never branches on the name. Token-level rewards are built the same way for every
token-level estimator: the scalar score on the last valid token, plus the optional dense
`token_rewards_BT`, minus `kl_coef * kl_BT` when KL is in the reward. Outcome-level
estimators (grpo, rloo) see only the scores and refuse dense rewards or a KL reward.

Registered:
  gae                    `compute_gae` on the token rewards; needs values_BT; returns
                         the critic targets.
  grpo                   `outcome_advantages` with mean_level / std_level /
                         batch_std_of (GRPO, LitePPO, Dr.GRPO are settings of these).
  rloo                   `rloo_advantages`.
  reinforce_pp           `reinforce_pp_returns` (gamma, KL in the reward), then
                         `masked_whiten` over all valid tokens of the global batch.
  reinforce_pp_baseline  as reinforce_pp after subtracting the group mean from each
                         score (REINFORCE++-baseline, Hu et al., arXiv 2501.03262).

Global statistics come through `reduce_sums` (see `megappo.algo.stats`): grpo uses it for
batch-level mean / std, reinforce_pp* for the whitening statistics. Post-processing
(`whiten_advantages`, `advantage_clip`) is `postprocess_advantages`, applied after any
estimator.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from megappo.algo.advantages import (
    BATCH_STD_OF,
    MEAN_LEVELS,
    STD_LEVELS,
    BatchStdOf,
    MeanLevel,
    StdLevel,
    broadcast_to_tokens,
    clip_advantages,
    outcome_advantages,
    outcome_std_population,
    rloo_advantages,
)
from megappo.algo.returns import compute_gae, reinforce_pp_returns, scores_to_token_rewards
from megappo.algo.stats import SumReducer, group_moments, masked_whiten, moment_sums, moments_from_sums


@dataclass(frozen=True)
class AdvantageInputs:
    """The tensors of one rank's batch. `scores_B` one scalar reward per response (after
    `shape_rewards`); `mask_BT` the response mask; `group_ids_B` the prompt of each
    response; `values_BT` critic values (gae); `kl_BT` per-token KL to the reference
    (for KL in the reward); `token_rewards_BT` optional dense per-token rewards."""

    scores_B: Tensor
    mask_BT: Tensor
    group_ids_B: Optional[Tensor] = None
    values_BT: Optional[Tensor] = None
    kl_BT: Optional[Tensor] = None
    token_rewards_BT: Optional[Tensor] = None
    reduce_sums: Optional[SumReducer] = None


@dataclass(frozen=True)
class AdvantageParams:
    """The knobs; fields not used by an estimator are ignored by it."""

    gamma: float = 1.0
    """Discount (gae, reinforce_pp*)."""
    lambd: float = 1.0
    """GAE lambda (gae)."""
    mean_level: MeanLevel = "group"
    """grpo: population of the subtracted mean: group | batch | none."""
    std_level: StdLevel = "group"
    """grpo: population of the dividing std: group | batch | none."""
    batch_std_of: BatchStdOf = "raw"
    """grpo, std_level=batch: std of raw scores (LitePPO) or group_centered (AReaL)."""
    eps: float = 1e-6
    """grpo: added to the std."""
    kl_coef: float = 0.0
    """KL-in-reward coefficient (gae, reinforce_pp*); 0 disables it."""

    def __post_init__(self) -> None:
        levels = (("mean_level", MEAN_LEVELS), ("std_level", STD_LEVELS), ("batch_std_of", BATCH_STD_OF))
        for name, allowed in levels:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {', '.join(map(repr, allowed))}")
        for name in ("gamma", "lambd"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.eps < 0 or self.kl_coef < 0:
            raise ValueError("eps and kl_coef must be >= 0")


AdvantageOutput = tuple[Tensor, Optional[Tensor]]
AdvantageEstimator = Callable[[AdvantageInputs, AdvantageParams], AdvantageOutput]
_ESTIMATORS: dict[str, AdvantageEstimator] = {}


def register_advantage_estimator(name: str) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator: register `fn(inputs, params) -> (advantages_BT, returns_BT | None)`."""

    def deco(fn: AdvantageEstimator) -> AdvantageEstimator:
        if name in _ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        _ESTIMATORS[name] = fn
        return fn

    return deco


def advantage_estimator_names() -> tuple[str, ...]:
    return tuple(sorted(_ESTIMATORS))


def estimate_advantages(
    name: str,
    *,
    scores_B: Tensor,
    mask_BT: Tensor,
    group_ids_B: Optional[Tensor] = None,
    values_BT: Optional[Tensor] = None,
    kl_BT: Optional[Tensor] = None,
    token_rewards_BT: Optional[Tensor] = None,
    reduce_sums: Optional[SumReducer] = None,
    params: Optional[AdvantageParams] = None,
    **knobs,
) -> AdvantageOutput:
    """Run the estimator `name`: (advantages_BT, returns_BT or None), 0 on padding.

    Knobs come either as `params` (an `AdvantageParams`) or as keyword arguments named
    like its fields (gamma, lambd, mean_level, std_level, batch_std_of, eps, kl_coef).
    """
    if name not in _ESTIMATORS:
        allowed = ", ".join(map(repr, advantage_estimator_names()))
        raise ValueError(f"advantage estimator {name!r} is not one of {allowed}")
    if params is None:
        fields = {f.name for f in dataclasses.fields(AdvantageParams)}
        unknown = sorted(set(knobs) - fields)
        if unknown:
            raise ValueError(f"unknown advantage knobs {unknown}; allowed: {sorted(fields)}")
        params = AdvantageParams(**knobs)
    elif knobs:
        raise ValueError("pass the knobs either as params or as keyword arguments, not both")
    inputs = AdvantageInputs(scores_B, mask_BT, group_ids_B, values_BT, kl_BT, token_rewards_BT, reduce_sums)
    with torch.no_grad():
        advantages_BT, returns_BT = _ESTIMATORS[name](inputs, params)
    assert advantages_BT.shape == mask_BT.shape, f"{name} returned shape {tuple(advantages_BT.shape)}"
    return advantages_BT, returns_BT


def postprocess_advantages(
    advantages_BT: Tensor,
    mask_BT: Tensor,
    *,
    whiten: bool = False,
    clip: Optional[float] = None,
    reduce_sums: Optional[SumReducer] = None,
) -> Tensor:
    """ROLL's `whiten_advantages` (masked token-level whitening, global statistics via
    `reduce_sums`) then `advantage_clip`, in that order, as ROLL does."""
    if whiten:
        sums = _reduced_sums(advantages_BT, mask_BT, reduce_sums)
        advantages_BT = masked_whiten(advantages_BT, mask_BT, sums=sums)
    return clip_advantages(advantages_BT, clip)


def _reduced_sums(x: Tensor, mask: Optional[Tensor], reduce_sums: Optional[SumReducer]) -> Tensor:
    sums = moment_sums(x, mask)
    return sums if reduce_sums is None else reduce_sums(sums)


def _token_rewards(inputs: AdvantageInputs, params: AdvantageParams, scores_B: Tensor) -> Tensor:
    rewards_BT = scores_to_token_rewards(scores_B, inputs.mask_BT)
    if inputs.token_rewards_BT is not None:
        rewards_BT = rewards_BT + inputs.token_rewards_BT.to(rewards_BT.dtype)
    if params.kl_coef != 0.0:
        if inputs.kl_BT is None:
            raise ValueError("kl_coef > 0 (KL in the reward) needs kl_BT")
        rewards_BT = rewards_BT - params.kl_coef * inputs.kl_BT.to(rewards_BT.dtype)
    return rewards_BT * inputs.mask_BT.to(rewards_BT.dtype)


def _outcome_only(inputs: AdvantageInputs, params: AdvantageParams, name: str) -> None:
    if inputs.token_rewards_BT is not None or params.kl_coef != 0.0:
        raise ValueError(
            f"{name} uses one score per response: dense token rewards and KL in the reward "
            "(kl_coef > 0) need gae or reinforce_pp; use the KL loss instead"
        )


@register_advantage_estimator("gae")
def _gae(inputs: AdvantageInputs, params: AdvantageParams) -> AdvantageOutput:
    if inputs.values_BT is None:
        raise ValueError("the gae estimator needs values_BT (a critic)")
    rewards_BT = _token_rewards(inputs, params, inputs.scores_B)
    return compute_gae(rewards_BT, inputs.values_BT, inputs.mask_BT, params.gamma, params.lambd)


@register_advantage_estimator("grpo")
def _grpo(inputs: AdvantageInputs, params: AdvantageParams) -> AdvantageOutput:
    _outcome_only(inputs, params, "grpo")
    scores_B, group_ids_B = inputs.scores_B, inputs.group_ids_B
    batch_mean = batch_std = None
    raw_sums = None
    if params.mean_level == "batch" or (params.std_level == "batch" and params.batch_std_of == "raw"):
        raw_sums = _reduced_sums(scores_B, None, inputs.reduce_sums)
    if params.mean_level == "batch":
        batch_mean, _ = moments_from_sums(raw_sums)
    if params.std_level == "batch":
        if params.batch_std_of == "raw":
            sums = raw_sums
        else:
            pop_B = outcome_std_population(scores_B, group_ids_B, params.batch_std_of)
            sums = _reduced_sums(pop_B, None, inputs.reduce_sums)
        _, var = moments_from_sums(sums)
        batch_std = torch.where(sums[0] > 1, var.sqrt(), torch.ones_like(var))
    adv_B = outcome_advantages(
        scores_B,
        group_ids_B,
        params.mean_level,
        params.std_level,
        params.eps,
        batch_std_of=params.batch_std_of,
        batch_mean=batch_mean,
        batch_std=batch_std,
    )
    return broadcast_to_tokens(adv_B, inputs.mask_BT), None


@register_advantage_estimator("rloo")
def _rloo(inputs: AdvantageInputs, params: AdvantageParams) -> AdvantageOutput:
    _outcome_only(inputs, params, "rloo")
    if inputs.group_ids_B is None:
        raise ValueError("the rloo estimator needs group_ids_B")
    return broadcast_to_tokens(rloo_advantages(inputs.scores_B, inputs.group_ids_B), inputs.mask_BT), None


def _reinforce_pp_from_scores(
    inputs: AdvantageInputs, params: AdvantageParams, scores_B: Tensor
) -> AdvantageOutput:
    rewards_BT = _token_rewards(inputs, params, scores_B)
    returns_BT = reinforce_pp_returns(rewards_BT, inputs.mask_BT, params.gamma)
    sums = _reduced_sums(returns_BT, inputs.mask_BT, inputs.reduce_sums)
    return masked_whiten(returns_BT, inputs.mask_BT, sums=sums), returns_BT


@register_advantage_estimator("reinforce_pp")
def _reinforce_pp(inputs: AdvantageInputs, params: AdvantageParams) -> AdvantageOutput:
    return _reinforce_pp_from_scores(inputs, params, inputs.scores_B)


@register_advantage_estimator("reinforce_pp_baseline")
def _reinforce_pp_baseline(inputs: AdvantageInputs, params: AdvantageParams) -> AdvantageOutput:
    if inputs.group_ids_B is None:
        raise ValueError("the reinforce_pp_baseline estimator needs group_ids_B")
    group_mean_B, _, _ = group_moments(inputs.scores_B, inputs.group_ids_B)
    centred_B = inputs.scores_B.to(torch.float64) - group_mean_B
    return _reinforce_pp_from_scores(inputs, params, centred_B.to(torch.float32))
