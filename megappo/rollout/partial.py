"""Partial rollouts: generation that a weight update interrupts, continued with the new weights.

AReaL's interruptible generation (Fu et al. 2025, arXiv 2505.24298, sec. 4.2): when the
trainer publishes new weights, the requests in flight are not waited for; they stop, the
weights are loaded, and each continues from the tokens it has, under the new weights. The
tokens keep the policy version they were sampled under, so a response that spans an update
holds tokens of two (or more) versions, and its log-probs are, token by token, those of the
weights that sampled it.

How, on every engine through the one interface: the updater calls
``engine.abort_requests()``; ``generate`` returns the aborted samples with their tokens and
log-probs so far (``finish_reason == "abort"``); ``generate_across_updates`` then waits for
the update (``await_update``, which hands the engine over and returns the new version) and
resubmits each aborted sample as its own prompt, ``prompt + tokens so far``, with the tokens
it has left. The engine prefills that prompt with the new weights (no key or value of the
old weights survives), so every later token is the new policy's, exactly as the trainer
computes it. One resubmission call per interruption, at the longest remaining budget; a
continuation longer than its own budget is cut there and ends as ``length`` (it drew no stop
token within the budget, or it would have ended there).

Seeds: the first call uses ``params.seed``; the continuation after the r-th interruption a
seed derived from it and r, so a run is deterministic given where the updates fell.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional, Sequence

import torch

from megappo.rollout.engine import Progress, RolloutEngine, Sample, SamplingParams


def generate_across_updates(
    engine: RolloutEngine,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    *,
    version: int,
    await_update: Callable[[], int],
    on_progress: Optional[Progress] = None,
) -> list[list[Sample]]:
    """``params.n`` samples per prompt like ``engine.generate``, every one finished
    (``stop`` or ``length``), with ``token_versions`` filled in: ``version`` (the engine's
    weights when the call starts) for the tokens sampled before the first interruption, the
    version ``await_update()`` returns for those after it, and so on. ``await_update`` is
    called once per interruption, in this thread, while this function holds no engine call:
    it must wait for the weight update that aborted the requests and return its version.
    ``on_progress`` is told about the first call's prompts only (continuations are silent)."""
    first = engine.generate(prompts, params) if on_progress is None else engine.generate(prompts, params, on_progress=on_progress)
    out = [[_versioned(s, version) for s in group] for group in first]
    interruption = 0
    while True:
        pending = [(i, j) for i, group in enumerate(out) for j, s in enumerate(group) if s.finish_reason == "abort"]
        if not pending:
            return out
        interruption += 1
        version = await_update()
        budgets = [params.max_new_tokens - len(out[i][j].token_ids) for i, j in pending]
        resubmit = [(i, j, b) for (i, j), b in zip(pending, budgets) if b > 0]
        for (i, j), b in zip(pending, budgets):
            if b <= 0:  # the abort came after the last token it was allowed
                out[i][j] = replace(out[i][j], finish_reason="length")
        if not resubmit:
            continue
        seed = None if params.seed is None else (params.seed * 1_000_003 + interruption * 7919) % (2**31 - 1)
        cont_params = replace(params, n=1, max_new_tokens=max(b for _, _, b in resubmit), seed=seed)
        cont = engine.generate([list(prompts[i]) + out[i][j].token_ids for i, j, _ in resubmit], cont_params)
        for (i, j, budget), (more,) in zip(resubmit, cont):
            out[i][j] = _extend(out[i][j], more, version, budget)


def _versioned(sample: Sample, version: int) -> Sample:
    return replace(sample, token_versions=[version] * len(sample.token_ids))


def _extend(prefix: Sample, more: Sample, version: int, budget: int) -> Sample:
    """``prefix`` followed by at most ``budget`` tokens of ``more`` (sampled by ``version``)."""
    tokens, logprobs = more.token_ids[:budget], more.logprobs[:budget]
    reason = more.finish_reason
    if len(more.token_ids) > budget or (len(more.token_ids) == budget and reason != "stop"):
        reason = "length"  # it used up its tokens (a stop token is always a response's last)
    return Sample(prefix.token_ids + tokens, prefix.logprobs + logprobs, reason,
                  prefix.token_versions + [version] * len(tokens), _spliced_routing(prefix, more, len(tokens)))


def _spliced_routing(prefix: Sample, more: Sample, kept: int) -> Optional[torch.Tensor]:
    """``Sample.routed_experts`` of the joined sample: each position as the engine routed it when
    it drew the next token (the prefix's rows, then the continuation's rows past them: the
    continuation re-ran the prefix under the new weights), cut to the ``kept`` new tokens."""
    if more.routed_experts is None:
        return None
    cont = more.routed_experts[: more.routed_experts.shape[0] - (len(more.token_ids) - kept)]
    if prefix.routed_experts is None:
        return cont
    return torch.cat([prefix.routed_experts, cont[prefix.routed_experts.shape[0]:]])
