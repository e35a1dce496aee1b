"""The RL objective of a run: ``cfg.algo`` turned into calls of ``megappo.algo``.

``megappo.algo`` is pure tensor math; this module supplies what it needs from outside:
global statistics over the data-parallel group (``reduce_sums``), the KL coefficient
controller and the running reward tracker (both checkpointed), and the global loss
denominators of each mini-batch, so that the pieces every micro-batch and rank
back-propagate sum to the loss of the whole mini-batch (STYLE point 9; the factor that
undoes Megatron's own averaging lives in ``megappo.models``).

Shape legend: B = responses of this rank, T = response positions.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch

from megappo import algo
from megappo.algo.stats import SumReducer
from megappo.config import Config
from megappo.rollout.batch import RolloutBatch


@dataclass(frozen=True)
class Denominators:
    """Global (all data-parallel ranks) counts of one mini-batch, for ``aggregate_loss``."""

    num_tokens: float
    num_seqs: float


class Objective:
    def __init__(self, cfg: Config, reduce_sums: SumReducer):
        self.algo_cfg = cfg.algo
        self.response_length = cfg.rollout.response_length
        self.temperature = cfg.rollout.temperature
        self.reduce_sums = reduce_sums
        a = cfg.algo
        self.kl_ctl = algo.make_kl_controller(a.init_kl_coef, a.target_kl, a.kl_horizon)
        self.reward_tracker = algo.RunningMeanStd()
        self.clip_low = a.pg_clip if a.pg_clip_low is None else a.pg_clip_low
        self.clip_high = a.pg_clip if a.pg_clip_high is None else a.pg_clip_high

    @property
    def needs_reference(self) -> bool:
        return self.algo_cfg.use_kl_loss or self.algo_cfg.add_token_level_kl

    @property
    def exact_kl_loss(self) -> bool:
        """The KL loss term is the exact KL over the vocabulary (``kl_penalty=full`` with
        ``use_kl_loss``). Only the model layer has both models' full logits, so it computes
        ``kl_BT`` inside the actor's ``train_step`` (see `actor_loss_reference`)."""
        return self.algo_cfg.use_kl_loss and self.algo_cfg.kl_penalty == "full"

    def actor_loss_reference(self, reference):
        """The model the actor's ``train_step`` computes the exact per-token KL against
        (``ref=``): ``reference`` when `exact_kl_loss`, else None (the sampled estimators
        need only the reference log-probs already in the experience)."""
        return reference if self.exact_kl_loss else None

    @property
    def sampled_kl_kind(self) -> str:
        """The per-token estimator applied to the sampled tokens' log-probs. ``full`` needs
        the whole vocabulary distributions, which exist only inside the actor update; where
        only the sampled tokens' log-probs are at hand (the ``actor/kl_ref`` metric) it falls
        back to k1, the unbiased sampled estimate of the same KL(actor || reference).
        (``full`` with KL in the reward is rejected by validation.)"""
        kind = self.algo_cfg.kl_penalty
        return "kl" if kind == "full" else kind

    # -- advantages -------------------------------------------------------------------

    def compute_advantages(self, batch: RolloutBatch, *, trained_version: int = 0) -> dict[str, float]:
        """Shape the scores, estimate advantages (and critic returns), post-process them,
        and set the loss mask (overlong filter; ``algo.mask_stale_tokens`` against
        ``trained_version``, the policy version the step's update starts from). Fills
        ``batch`` in place; returns metrics."""
        a = self.algo_cfg
        mask_BT = batch.mask_BT.to(torch.float32)
        # With reward_norm=running, shape_rewards merges this step's scores (after the
        # overlong penalty: the values it normalizes) into the tracker exactly once, from
        # moment sums all-reduced over data-parallel ranks, then normalizes with it.
        scores_B = algo.shape_rewards(
            batch.scores_B,
            group_ids_B=batch.group_ids_B,
            lengths_B=batch.tokens.response_lens_B,
            reward_norm=a.reward_norm,
            reward_shift=a.reward_shift,
            reward_scale=a.reward_scale,
            reward_clip=a.reward_clip,
            tracker=self.reward_tracker,
            overlong_max_len=self.response_length,
            overlong_buffer_len=a.overlong_buffer_len,
            overlong_penalty_factor=a.overlong_penalty_factor,
            reduce_sums=self.reduce_sums,
        )
        kl_BT = None
        if batch.ref_logprobs_BT is not None:
            kl_BT = algo.kl_penalty(batch.old_logprobs_BT, batch.ref_logprobs_BT, self.sampled_kl_kind)
        advantages_BT, returns_BT = algo.estimate_advantages(
            a.adv_estimator,
            scores_B=scores_B,
            mask_BT=mask_BT,
            group_ids_B=batch.group_ids_B,
            values_BT=batch.values_BT,
            kl_BT=kl_BT if a.add_token_level_kl else None,
            reduce_sums=self.reduce_sums,
            gamma=a.gamma,
            lambd=a.lambd,
            mean_level=a.adv_norm.mean_level,
            std_level=a.adv_norm.std_level,
            batch_std_of=a.batch_std_of,
            eps=a.adv_norm.eps,
            kl_coef=self.kl_ctl.value if a.add_token_level_kl else 0.0,
        )
        batch.advantages_BT = algo.postprocess_advantages(
            advantages_BT, mask_BT, whiten=a.whiten_advantages, clip=a.advantage_clip, reduce_sums=self.reduce_sums
        )
        batch.returns_BT = returns_BT
        batch.loss_mask_BT = algo.overlong_filter(mask_BT, batch.truncated_B) if a.overlong_filter else mask_BT
        if a.mask_stale_tokens is not None:
            batch.loss_mask_BT = algo.stale_token_mask(batch.loss_mask_BT, batch.versions_BT(), trained_version, a.mask_stale_tokens)
        metrics = {"reward/shaped_mean": self._global_mean(scores_B)}
        adv_sums = self.reduce_sums(algo.moment_sums(batch.advantages_BT, mask_BT))
        adv_mean, adv_var = algo.moments_from_sums(adv_sums)
        metrics.update({"adv/mean": float(adv_mean), "adv/std": float(adv_var.clamp(min=0).sqrt())})
        if kl_BT is not None:
            kl = self._global_token_mean(kl_BT, mask_BT)
            metrics.update({"actor/kl_ref": kl, "actor/kl_coef": self.kl_ctl.value})
            self.kl_ctl.update(kl, n_steps=int(self.reduce_sums(algo.moment_sums(batch.scores_B))[0]))
        return metrics

    def _global_mean(self, x_B: torch.Tensor) -> float:
        count, total, _ = self.reduce_sums(algo.moment_sums(x_B)).tolist()
        return total / max(count, 1.0)

    def _global_token_mean(self, x_BT: torch.Tensor, mask_BT: torch.Tensor) -> float:
        count, total, _ = self.reduce_sums(algo.moment_sums(x_BT, mask_BT)).tolist()
        return total / max(count, 1.0)

    # -- losses -----------------------------------------------------------------------

    def denominators(self, mini: RolloutBatch) -> Denominators:
        """Global token and sequence counts of a mini-batch (over data-parallel ranks)."""
        count, total, _ = self.reduce_sums(algo.moment_sums(mini.loss_mask_BT.sum(dim=1))).tolist()
        return Denominators(num_tokens=total, num_seqs=count)

    def actor_loss_fn(self, mini: RolloutBatch, den: Denominators):
        """``loss_fn(outputs, rows)`` for ``MegatronPolicy.train_step`` on mini-batch ``mini``."""
        a = self.algo_cfg

        def loss_fn(outputs: dict[str, torch.Tensor], rows: torch.Tensor):
            logprobs_bT = outputs["logprobs_BT"]
            take = _rows_of(rows, like=logprobs_bT)
            mask_bT = take(mini.loss_mask_BT)
            common = dict(clip_low=self.clip_low, clip_high=self.clip_high, dual_clip_c=a.dual_clip_c if a.dual_clip_loss else None,
                          loss_agg_mode=a.loss_agg_mode, num_tokens=den.num_tokens, num_seqs=den.num_seqs,
                          norm_len=self.response_length, entropy=outputs.get("entropy_BT"), entropy_coef=a.entropy_coef)
            if a.policy_loss == "decoupled":  # proximal = the trainer's recompute, behaviour = the engine's
                loss, metrics = algo.decoupled_policy_loss(
                    logprobs_bT, take(mini.old_logprobs_BT), take(mini.rollout_logprobs_BT), take(mini.advantages_BT), mask_bT,
                    behav_weight_cap=a.behav_weight_cap, **common)
            else:
                loss, metrics = algo.policy_loss(
                    logprobs_bT, take(mini.old_logprobs_BT), take(mini.advantages_BT), mask_bT,
                    rollout_logprobs=take(mini.rollout_logprobs_BT) if a.tis_clip is not None else None, tis_clip=a.tis_clip,
                    **common)
            if a.use_kl_loss:
                if self.exact_kl_loss:
                    assert "kl_BT" in outputs, "kl_penalty=full: train_step needs ref=actor_loss_reference(...)"
                    kl_bT = outputs["kl_BT"]
                else:
                    kl_bT = algo.kl_penalty(logprobs_bT, take(mini.ref_logprobs_BT), a.kl_penalty)
                kl = algo.aggregate_loss(
                    kl_bT,
                    mask_bT,
                    a.loss_agg_mode,
                    num_tokens=den.num_tokens,
                    num_seqs=den.num_seqs,
                    norm_len=self.response_length,
                )
                loss = loss + a.kl_loss_coef * kl
                metrics["kl_loss"] = kl.detach()
            if "entropy_BT" in outputs:
                metrics["entropy"] = algo.masked_mean(outputs["entropy_BT"].detach(), mask_bT)
            return loss, metrics

        return loss_fn

    def critic_loss_fn(self, mini: RolloutBatch, den: Denominators):
        a = self.algo_cfg

        def loss_fn(outputs: dict[str, torch.Tensor], rows: torch.Tensor):
            values_bT = outputs["values_BT"]
            take = _rows_of(rows, like=values_bT)
            mask_bT = take(mini.loss_mask_BT)
            loss, metrics = algo.value_loss(
                values_bT,
                take(mini.values_BT),
                take(mini.returns_BT),
                mask_bT,
                value_clip=a.value_clip,
                loss_agg_mode=a.loss_agg_mode,
                num_tokens=den.num_tokens,
                num_seqs=den.num_seqs,
                norm_len=self.response_length,
            )
            return a.value_loss_coef * loss, metrics

        return loss_fn

    # -- state ------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"kl_ctl": self.kl_ctl.state_dict(), "reward_tracker": self.reward_tracker.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.reward_tracker.load_state_dict(state["reward_tracker"])


def _rows_of(rows: torch.Tensor, *, like: torch.Tensor):
    """``take(x_BT)``: the micro-batch's rows of a mini-batch tensor, shaped and placed like
    the model output ``like`` ([b, T'] on its device)."""
    return lambda x_BT: _fit(x_BT[rows], like.shape[1]).to(like.device)


def _fit(x_bT: torch.Tensor, T: int) -> torch.Tensor:
    """Cut or right-pad (with zeros) the response dimension to ``T`` columns: a micro-batch's
    outputs may be narrower than the mini-batch (its longest response is shorter)."""
    if x_bT.shape[1] >= T:
        return x_bT[:, :T]
    return torch.nn.functional.pad(x_bT, (0, T - x_bT.shape[1]))
