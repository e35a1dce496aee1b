"""The algorithm section of the configuration tree (``algo``): advantages, losses and their
tricks. Part of ``schema.py`` (which imports it); documented the same way, by the string
literal after each field, from which ``docs/config.md`` is generated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

NormLevel = Literal["group", "batch", "none"]
LossAggMode = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
KLKind = Literal["kl", "abs", "mse", "low_var_kl", "full"]
AdvEstimator = Literal["gae", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"]
Preset = Literal["none", "ppo", "grpo", "liteppo", "dr_grpo", "reinforce_pp_baseline"]


@dataclass(frozen=True)
class AdvNormConfig:
    mean_level: NormLevel = "group"
    """Population the baseline mean of outcome scores is taken over: ``group`` (responses to
    one prompt), ``batch`` (the global batch) or ``none``."""
    std_level: NormLevel = "group"
    """Population the standard deviation of outcome scores is taken over (Bessel corrected):
    ``group`` (the raw scores of one prompt's responses), ``batch`` (the global batch, of the
    raw or the group-centred scores as ``algo.batch_std_of`` says) or ``none`` (do not divide)."""
    eps: float = 1e-6
    """Added to the standard deviation before dividing."""


@dataclass(frozen=True)
class AlgoConfig:
    preset: Preset = "none"
    """Named algorithm; expands to knob values before the recipe's and command line's own
    settings, which win. ``ppo``: GAE with a critic; ``grpo``: group mean and std,
    seq-mean-token-mean; ``liteppo``: group mean, batch std, token-mean, no critic;
    ``dr_grpo``: group mean, no std, seq-mean-token-sum-norm; ``reinforce_pp_baseline``:
    group-mean baseline then global whitening."""
    adv_estimator: AdvEstimator = "grpo"
    """Advantage estimator: ``gae`` (needs the critic), ``grpo`` (outcome scores normalized
    by ``adv_norm``), ``rloo`` (leave-one-out group mean), ``reinforce_pp`` and
    ``reinforce_pp_baseline`` (token-level discounted returns with KL, whitened)."""
    adv_norm: AdvNormConfig = field(default_factory=AdvNormConfig)
    """Mean and std levels of outcome-advantage normalization (LitePPO: group / batch)."""
    batch_std_of: Literal["raw", "group_centered"] = "raw"
    """For ``std_level: batch``: the std of the raw scores (the LitePPO paper, verl, ROLL) or
    of the group-centred scores (AReaL)."""
    loss_agg_mode: LossAggMode = "token-mean"
    """How per-token losses become a scalar: ``token-mean`` over all valid tokens of the
    global batch; ``seq-mean-token-sum``; ``seq-mean-token-mean``; ``seq-mean-token-sum-norm``
    (token sums divided by ``rollout.response_length``, Dr.GRPO)."""
    gamma: float = 1.0
    """Discount factor of GAE and REINFORCE++ returns."""
    lambd: float = 0.95
    """GAE lambda."""
    pg_clip: float = 0.2
    """PPO ratio clip epsilon, used for both sides unless ``pg_clip_low``/``pg_clip_high`` are set."""
    pg_clip_low: Optional[float] = None
    """Lower clip epsilon (ratio >= 1 - pg_clip_low); None uses ``pg_clip``."""
    pg_clip_high: Optional[float] = None
    """Upper clip epsilon (ratio <= 1 + pg_clip_high, clip-higher); None uses ``pg_clip``."""
    dual_clip_loss: bool = False
    """Dual-clip PPO (Ye et al. 2020): bound the loss of negative-advantage tokens by ``dual_clip_c`` x |A|."""
    dual_clip_c: float = 3.0
    """The dual-clip constant c (> 1)."""
    value_clip: Optional[float] = None
    """Clip range of the value update around the old values (PPO style); None disables."""
    value_loss_coef: float = 1.0
    """Scale of the critic loss."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient of the actor loss."""
    kl_penalty: KLKind = "kl"
    """Per-token KL estimator to the reference: ``kl`` (k1), ``abs``, ``mse`` (k2),
    ``low_var_kl`` (k3, clamped) or ``full`` (exact over the vocabulary, from both models'
    logits in the actor update: a loss term only, needs pipeline size 1; the
    ``actor/kl_ref`` metric then uses k1)."""
    use_kl_loss: bool = False
    """Add ``kl_loss_coef`` x KL(actor || reference) to the actor loss."""
    kl_loss_coef: float = 0.001
    """Coefficient of the KL loss term."""
    add_token_level_kl: bool = False
    """Subtract the KL coefficient x per-token KL from the token rewards (in-reward KL)."""
    init_kl_coef: float = 0.2
    """Initial (or fixed) coefficient of the in-reward KL."""
    target_kl: Optional[float] = None
    """Target KL of the adaptive controller (Ziegler et al. 2019); None keeps the coefficient fixed."""
    kl_horizon: int = 10000
    """Horizon of the adaptive KL controller."""
    whiten_advantages: bool = False
    """Whiten advantages (masked, global mean and std over valid tokens) after estimation."""
    advantage_clip: Optional[float] = None
    """Clip advantages to [-advantage_clip, advantage_clip]; None disables."""
    reward_clip: Optional[float] = None
    """Clip rewards to [-reward_clip, reward_clip] after the overlong penalty and
    ``reward_norm`` (so it bounds what the advantage estimator sees); None disables."""
    reward_norm: Literal["batch", "group", "running", "none"] = "none"
    """Reward normalization before advantage estimation, Bessel std of one score per response:
    ``batch`` (global batch), ``group`` (one prompt's responses), ``running`` (every score so far;
    merged once per step from the global batch, checkpointed) or ``none``."""
    reward_shift: bool = False
    """With ``reward_norm``: only subtract the mean (exclusive with ``reward_scale``)."""
    reward_scale: bool = False
    """With ``reward_norm``: only divide by the standard deviation (exclusive with ``reward_shift``)."""
    overlong_filter: bool = False
    """Zero the loss of truncated responses (finish reason ``length``, or ``abort``: cut off without a stop token)."""
    overlong_buffer_len: Optional[int] = None
    """DAPO soft overlong penalty: penalize linearly within this many tokens before
    ``rollout.response_length``; None disables."""
    overlong_penalty_factor: float = 1.0
    """Maximum penalty of the soft overlong punishment."""
    tis_clip: Optional[float] = None
    """Truncated importance sampling: weight each token's loss by min(pi_old/pi_rollout,
    tis_clip) to correct the trainer/engine mismatch; None disables."""
    policy_loss: Literal["ppo", "decoupled"] = "ppo"
    """``ppo``: the clipped ratio against the trainer's recomputed old log-probs (with
    ``tis_clip`` optional). ``decoupled``: the decoupled PPO objective of asynchronous RL
    (AReaL, arXiv 2505.24298): the ratio is clipped against the proximal policy (the trainer's
    recompute) and each token is weighted by min(pi_prox / pi_behaviour, ``behav_weight_cap``),
    pi_behaviour being the engine's log-probs of the version that sampled it."""
    behav_weight_cap: float = 5.0
    """With ``policy_loss: decoupled``: the truncation of the behaviour -> proximal importance weight (>= 1)."""
    mask_stale_tokens: Optional[int] = None
    """Drop from the policy loss (and its token counts) every token sampled more than this many
    policy versions before the weights the step starts from; None keeps every token."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: drop groups whose rewards are all equal and sample more prompts to fill the batch."""
    max_sampling_rounds: int = 4
    """With ``dynamic_sampling``: most generation rounds per step before training on what there is."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    critic_warmup_steps: int = 0
    """Steps at the start that train only the critic."""
    routing_replay: bool = False
    """Mixture-of-experts actors: record each token's experts in the old-log-prob pass and use them
    in the update's forward passes, so the ratio's two log-probs come from the same experts
    (``megappo.models.routing``; needs ``train.packed_sequences=false``). Router metrics
    (``moe/*``) are logged either way."""
    routing_replay_source: Literal["old", "rollout"] = "old"
    """With ``routing_replay``, whose experts are replayed: ``old`` (the trainer's old-log-prob
    pass, replayed in the update) or ``rollout`` (the experts the rollout engine routed each
    token to, replayed in the old-log-prob pass and the update, "R3"): the embedded engine
    reports them for MoE models; ``rollout.engine: sglang`` needs
    ``rollout.sglang.enable_return_routed_experts: true``; ``sglang_server`` servers need
    ``--enable-return-routed-experts``."""

