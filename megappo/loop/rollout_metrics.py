"""A step's rollout metrics over the global batch (all data-parallel ranks).

Means and standard deviations come from global sums: per response for rewards and lengths,
per valid token for the engine-vs-trainer mismatch (``megappo.rollout.mismatch``) and the
critic's explained variance; maxima are maxima over ranks.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from megappo.algo import moment_sums, moments_from_sums
from megappo.rollout.batch import RolloutBatch
from megappo.rollout.mismatch import mismatch_from_sums, mismatch_sums

Reduce = Callable[[torch.Tensor, str], torch.Tensor]
"""``reduce(x, op)``: all-reduce a float64 vector over the data-parallel ranks (``op`` "sum" or "max")."""


def rollout_metrics(batch: RolloutBatch, *, reduce: Reduce, dynamic_sampling: bool,
                    trained_version: Optional[int] = None) -> dict[str, float]:
    """The step's rollout metrics over the global batch. ``reduce(x, op)`` all-reduces a
    float64 vector over the data-parallel ranks (``op`` "sum" or "max"); it is called twice.
    Means and standard deviations come from global sums: per response for rewards and
    lengths, per valid token for the mismatch metrics (``megappo.rollout.mismatch``) and
    the critic's explained variance (1 - Var(R - V) / Var(R), Bessel-corrected, NaN when
    the returns do not vary); maxima are maxima over ranks. Staleness: ``trained_version``
    (the policy version the step's update starts from) minus each response's
    ``policy_version_B`` (a response's oldest token), per response (``rollout/staleness_mean``,
    ``_max``); per token (``versions_BT``: partial rollouts give a response's tokens several
    versions) the fraction sampled by an older version (``rollout/off_policy_token_frac``) and
    the fraction of responses whose tokens span a weight update (``rollout/partial_frac``);
    without ``trained_version`` the staleness of the newest response's version (0 for it)."""
    f64 = torch.float64
    lens_B = batch.tokens.response_lens_B.to(f64)
    versions_B = batch.policy_version_B
    if trained_version is None:
        trained_version = int(versions_B.max()) if len(versions_B) else 0
    stale_B = (trained_version - versions_B).to(f64)
    mask_BT = batch.mask_BT.to(f64)
    versions_BT = batch.versions_BT()[:, : mask_BT.shape[1]]
    off_policy_tokens = float((mask_BT * (versions_BT < trained_version)).sum())
    newest_B = torch.where(mask_BT > 0, versions_BT, versions_B[:, None]).max(dim=1).values if len(versions_B) else versions_B
    spanning = float((newest_B > versions_B).sum())
    mm_sums, mm_max = mismatch_sums(batch.old_logprobs_BT, batch.rollout_logprobs_BT, batch.mask_BT.float())
    parts = {
        "scores": moment_sums(batch.scores_B),
        "lens": moment_sums(lens_B),
        "counts": torch.tensor([batch.correct_B.sum().item(), batch.truncated_B.sum().item(), batch.stats.reward_errors, batch.stats.reward_timeouts], dtype=f64),
        "mismatch": mm_sums,
        "staleness": torch.tensor([float(stale_B.sum()), off_policy_tokens, float(lens_B.sum()), spanning], dtype=f64),
    }
    critic = batch.values_BT is not None and batch.returns_BT is not None
    if critic:
        mask_BT, returns_BT = batch.mask_BT.to("cpu", f64), batch.returns_BT.to("cpu", f64)
        parts["returns"] = moment_sums(returns_BT, mask_BT)
        parts["residuals"] = moment_sums(returns_BT - batch.values_BT.to("cpu", f64), mask_BT)
    flat = reduce(torch.cat(list(parts.values())), "sum")
    sums = dict(zip(parts, flat.split([len(v) for v in parts.values()])))
    len_max = lens_B.max().reshape(1) if len(lens_B) else torch.zeros(1, dtype=f64)
    stale_max = stale_B.max().reshape(1) if len(stale_B) else torch.zeros(1, dtype=f64)
    maxima = reduce(torch.cat([len_max, torch.tensor([batch.stats.reward_seconds], dtype=f64), stale_max, mm_max]), "max")

    score_mean, score_var = moments_from_sums(sums["scores"])
    num, lens = sums["scores"][0].item(), sums["lens"]
    correct, truncated, reward_errors, reward_timeouts = sums["counts"].tolist()
    out = {
        "reward/mean": float(score_mean),
        "reward/std": float(score_var.clamp(min=0).sqrt()),
        "reward/accuracy": correct / num,
        "reward/errors": reward_errors,
        "reward/timeouts": reward_timeouts,
        "response_length/mean": float(lens[1] / lens[0]),
        "response_length/max": float(maxima[0]),
        "response_length/truncated_frac": truncated / num,
        "time/reward": float(maxima[1]),
        "rollout/staleness_mean": float(sums["staleness"][0] / num),
        "rollout/staleness_max": float(maxima[2]),
        "rollout/off_policy_token_frac": float(sums["staleness"][1] / max(float(sums["staleness"][2]), 1.0)),
        "rollout/partial_frac": float(sums["staleness"][3] / num),
    }
    if dynamic_sampling:
        out["rollout/sampling_rounds"] = float(batch.stats.sampling_rounds)
    if critic:
        _, var_r = moments_from_sums(sums["returns"])
        _, var_e = moments_from_sums(sums["residuals"])
        out["critic/explained_variance"] = float(1.0 - var_e / var_r) if var_r > 0 else float("nan")
    out.update(mismatch_from_sums(sums["mismatch"], maxima[3:]))
    return out
