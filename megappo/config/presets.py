"""Named algorithms as settings of the same knobs.

A preset is a flat mapping of dotted config paths to values. `algo.preset` (from the recipe
or the command line) selects one; the loader lays its values over the schema defaults and
under everything the recipe and the command line set explicitly, so ``algo.preset: grpo``
plus ``algo.use_kl_loss: false`` is GRPO without the KL loss. The resolved config printed by
``--dry-run`` shows the expanded values. ``none`` expands to nothing.

Each preset sets the same core knobs (estimator, mean / std levels, loss aggregation, KL,
whitening) so that switching presets never inherits a knob from the previous one.
"""

from __future__ import annotations

from typing import Any

from megappo.config.schema import Config

PRESETS: dict[str, dict[str, Any]] = {
    # PPO with a learned critic and GAE (Schulman et al. 2017, arXiv 1707.06347; GAE arXiv
    # 1506.02438), token-level loss and whitened advantages, as in verl / ROLL PPO examples.
    # The critic is implied by adv_estimator=gae (see `uses_critic`).
    "ppo": {
        "algo.adv_estimator": "gae",
        "algo.adv_norm.mean_level": "none",
        "algo.adv_norm.std_level": "none",
        "algo.loss_agg_mode": "token-mean",
        "algo.gamma": 1.0,
        "algo.lambd": 0.95,
        "algo.whiten_advantages": True,
        "algo.use_kl_loss": False,
    },
    # GRPO (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300, sec. 4.1): A = (r - mean_group)
    # / std_group, per-sequence mean of per-token losses, k3 KL to the reference in the loss.
    # The coefficient 0.001 is the common open-source setting (verl, ROLL); the paper used 0.04.
    "grpo": {
        "algo.adv_estimator": "grpo",
        "algo.adv_norm.mean_level": "group",
        "algo.adv_norm.std_level": "group",
        "algo.loss_agg_mode": "seq-mean-token-mean",
        "algo.use_kl_loss": True,
        "algo.kl_loss_coef": 0.001,
        "algo.kl_penalty": "low_var_kl",
        "algo.whiten_advantages": False,
    },
    # LitePPO (Liu et al. 2025, "Tricks or Traps?", arXiv 2508.08221): group mean, batch std of
    # the raw scores, token-level loss; no critic, no KL, nothing else.
    "liteppo": {
        "algo.adv_estimator": "grpo",
        "algo.adv_norm.mean_level": "group",
        "algo.adv_norm.std_level": "batch",
        "algo.batch_std_of": "raw",
        "algo.loss_agg_mode": "token-mean",
        "algo.use_kl_loss": False,
        "algo.whiten_advantages": False,
    },
    # Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv 2503.20783):
    # group mean without the std division, token sums divided by a constant (the maximum
    # response length) instead of each response's length.
    "dr_grpo": {
        "algo.adv_estimator": "grpo",
        "algo.adv_norm.mean_level": "group",
        "algo.adv_norm.std_level": "none",
        "algo.loss_agg_mode": "seq-mean-token-sum-norm",
        "algo.use_kl_loss": False,
        "algo.whiten_advantages": False,
    },
    # REINFORCE++-baseline (Hu et al. 2025, arXiv 2501.03262): group-mean baseline on the
    # outcome score, KL to the reference in the token rewards, then global whitening. The
    # estimator itself whitens the returns over all valid tokens of the global batch, so
    # whiten_advantages would whiten them a second time (a no-op up to rounding): off.
    "reinforce_pp_baseline": {
        "algo.adv_estimator": "reinforce_pp_baseline",
        "algo.adv_norm.mean_level": "group",
        "algo.adv_norm.std_level": "none",
        "algo.loss_agg_mode": "token-mean",
        "algo.use_kl_loss": False,
        "algo.add_token_level_kl": True,
        "algo.init_kl_coef": 0.001,
        "algo.whiten_advantages": False,
    },
}

PRESET_SUMMARIES: dict[str, str] = {
    "none": "No expansion: every knob is the schema default unless set.",
    "ppo": "PPO with a critic and GAE, token-mean loss, whitened advantages (arXiv 1707.06347, 1506.02438).",
    "grpo": "GRPO: group mean and std, seq-mean-token-mean, k3 KL loss 0.001 (DeepSeekMath, arXiv 2402.03300).",
    "liteppo": "LitePPO: group mean, batch std of raw scores, token-mean, no critic, no KL (arXiv 2508.08221).",
    "dr_grpo": "Dr.GRPO: group mean, no std, seq-mean-token-sum-norm (arXiv 2503.20783).",
    "reinforce_pp_baseline": "REINFORCE++-baseline: group-mean baseline, KL in the reward (0.001), global whitening (arXiv 2501.03262).",
}


def preset_tree(name: str) -> dict[str, Any]:
    """The preset ``name`` as a nested tree (``{"algo": {"adv_norm": {...}}}``); ``none`` is empty."""
    if name == "none":
        return {}
    tree: dict[str, Any] = {}
    for path, value in PRESETS[name].items():
        *sections, key = path.split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
        node[key] = value
    return tree


def uses_critic(cfg: Config) -> bool:
    """True iff the run trains a critic: GAE is the only estimator that needs values."""
    return cfg.algo.adv_estimator == "gae"
