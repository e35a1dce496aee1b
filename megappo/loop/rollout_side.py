"""The rollout side of a run: this replica's engine, prompt cursor and reward, behind one
call per use: ``sample(step)`` returns the step's ``RolloutBatch``, ``evaluate()`` the
held-out accuracy, ``sync_weights(actor)`` brings the engine up to the actor.

Placement: each data-parallel replica owns one engine on its first rank (TP rank 0, PP
stage 0). That rank generates and scores its replica's prompts; ``run_on_holder`` hands the
batch to the replica's other ranks, who move their prompt cursors as the holder did, so
every rank of the replica holds the same batch and the same cursor.

Failures: an engine or reward error on any replica raises ``RolloutEngineError`` on every
rank (``megappo.rollout.group``): within a replica through ``run_on_holder``, across
replicas through the failure flag in the per-round all-reduce.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from megappo import algo
from megappo.config.schema import RolloutConfig
from megappo.data.dataset import PromptItem
from megappo.data.loader import PromptLoader
from megappo.data.rewards import RewardFunction
from megappo.parallel.collectives import dp_all_reduce
from megappo.parallel.state import ParallelLayout
from megappo.rollout import RolloutEngine, RolloutEngineError, SamplingParams, SyncStats, checksums_match, sync_weights
from megappo.rollout.batch import RolloutBatch, RolloutStats
from megappo.rollout.group import raise_if_any_replica_failed, run_on_holder

log = logging.getLogger("megappo")

Progress = Callable[..., Any]
"""``progress(total_or_iterable, desc, leave=...)``: a tqdm-like bar (``megappo.metrics.progress``)."""
Generate = Callable[[Sequence[Sequence[int]], SamplingParams], list]
"""``generate(prompt_ids, params)``: the samples of each prompt (``RolloutEngine.generate``'s result)."""


def generate_and_score(
    engine: RolloutEngine,
    prompts: Sequence[PromptItem],
    params: SamplingParams,
    reward_fn: RewardFunction,
    tokenizer,
    *,
    first_group_id: int,
    policy_version: int,
    on_progress: Optional[Callable[[int], object]] = None,
    generate: Optional[Generate] = None,
) -> RolloutBatch:
    """On an engine rank: ``params.n`` responses per prompt, decoded and scored.
    ``first_group_id`` makes group ids unique over data-parallel ranks and rounds.
    ``generate``: how to generate (partial rollouts); None: ``engine.generate``."""
    ids = [p.prompt_ids for p in prompts]
    if generate is not None:
        samples = generate(ids, params)
    elif on_progress is None:
        samples = engine.generate(ids, params)
    else:
        samples = engine.generate(ids, params, on_progress=on_progress)
    texts = [tokenizer.decode(s.token_ids, skip_special_tokens=True) for group in samples for s in group]
    answers = [p.answer for p, group in zip(prompts, samples) for _ in group]
    prompt_texts = [p.text for p, group in zip(prompts, samples) for _ in group]
    t0 = time.perf_counter()
    result = reward_fn.score(texts, answers, prompt_texts)
    stats = RolloutStats(result.num_errors, result.num_timeouts, time.perf_counter() - t0, 1)
    return RolloutBatch.from_samples(
        ids, samples, scores=result.scores, correct=result.correct, prompt_texts=[p.text for p in prompts],
        response_texts=texts, first_group_id=first_group_id, policy_version=policy_version, stats=stats,
    )


@dataclass
class RolloutSide:
    """This replica's engine (on its holder rank only), prompts and reward."""

    layout: ParallelLayout
    rollout_cfg: RolloutConfig
    data: PromptLoader
    tokenizer: Any
    engine: Optional[RolloutEngine]
    """The engine, on the replica's holder rank; None on its other ranks."""
    reward_fn: Optional[RewardFunction]
    """The reward, on the holder rank; None elsewhere."""
    eval_items: list[PromptItem] = field(default_factory=list)
    seed: int = 0
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: drop groups whose scores are all equal, sample more prompts."""
    max_sampling_rounds: int = 1
    progress: Progress = None
    weights_checked: bool = False
    """Whether a weight sync of this run already compared checksums (the first does)."""

    def _params(self, *, evaluation: bool = False, seed: Optional[int] = None) -> SamplingParams:
        return SamplingParams.from_config(self.rollout_cfg, eos_token_ids=[self.tokenizer.eos_token_id], seed=seed,
                                          evaluation=evaluation)

    # -- training rollouts ----------------------------------------------------------------

    def sample(self, step: int, *, policy_version: int) -> RolloutBatch:
        """Every rank: this replica's rollout batch of ``step``, sampled under the engine's
        current weights (``policy_version``)."""
        batch = run_on_holder(lambda: self._sample_on_holder(step, policy_version), self.layout)
        if self.engine is None:
            for _ in range(batch.stats.sampling_rounds):
                self.data.next_batch()
        return batch

    def _sample_on_holder(self, step: int, policy_version: int) -> RolloutBatch:
        """With dynamic sampling, groups whose scores are all equal
        (``algo.groups_with_signal``) are set aside and more prompts are sampled, up to
        ``max_sampling_rounds`` rounds (the same number on every replica, so the data
        cursors stay in step); a batch still short is topped up with set-aside groups.

        The holders of all replicas (one data-parallel group) all-reduce after each round
        whether they are done and whether one failed; a failure raises
        ``RolloutEngineError`` on all of them there, before any other collective."""
        n, max_rounds = self.rollout_cfg.num_return_sequences_in_group, self.max_sampling_rounds
        kept: list[RolloutBatch] = []
        set_aside: list[RolloutBatch] = []
        stats = RolloutStats(sampling_rounds=0)
        rounds, target_groups = 0, None
        with self.progress(0, f"rollout {step}", leave=False) as bar:
            while True:
                rounds += 1
                error = None
                try:
                    prompts = self.data.next_batch()
                    target_groups = target_groups or len(prompts)
                    bar.total += len(prompts)
                    bar.refresh()
                    batch = self.generate_round(step, rounds, prompts, policy_version=policy_version, on_progress=bar.update)
                    stats = stats + batch.stats
                    if self.dynamic_sampling:
                        keep_B = algo.groups_with_signal(batch.scores_B, batch.group_ids_B)
                        kept.append(batch.select(keep_B.nonzero().flatten()))
                        set_aside.append(batch.select((~keep_B).nonzero().flatten()))
                    else:
                        kept.append(batch)
                except Exception as e:  # noqa: BLE001 - raised on every engine rank below
                    error = e
                kept_groups = sum(len(b) for b in kept) // n
                done = error is not None or not self.dynamic_sampling or kept_groups >= target_groups or rounds >= max_rounds
                not_done, failed = dp_all_reduce(torch.tensor([0.0 if done else 1.0, 0.0 if error is None else 1.0])).tolist()
                raise_if_any_replica_failed(error, failed > 0, self.layout)
                if self.dynamic_sampling:
                    bar.set_postfix(kept_groups=kept_groups, rounds=rounds)
                if not_done == 0:
                    break
        parts, wanted = [], target_groups * n
        for part in kept + set_aside:  # kept groups first, then set-aside ones, in sampling order
            if wanted > 0 and len(part):
                parts.append(part.first_rows(wanted))
                wanted -= len(parts[-1])
        return RolloutBatch.concat(parts, stats=stats)

    def generate_round(self, step: int, round_: int, prompts: Sequence[PromptItem], *, policy_version: int,
                       on_progress: Optional[Callable[[int], object]] = None,
                       generate: Optional[Generate] = None) -> RolloutBatch:
        """On the holder: round ``round_`` (from 1) of step ``step``'s generation, scored. No
        collective, so the asynchronous modes call it from their producer thread (with
        ``generate``, partial rollouts)."""
        # A function of (seed, step, round, replica) only: a resumed run samples as the
        # uninterrupted one would, and so does every rollout mode.
        max_rounds = self.max_sampling_rounds
        seed = self.seed * 1_000_003 + (step * max_rounds + round_) * 7919 + self.layout.dp_rank
        return generate_and_score(
            self.engine, prompts, self._params(seed=int(seed % (2**31 - 1))), self.reward_fn, self.tokenizer,
            first_group_id=(self.layout.dp_rank * max_rounds + round_ - 1) * len(prompts),
            policy_version=policy_version, on_progress=on_progress, generate=generate,
        )

    # -- evaluation -------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Accuracy on the held-out prompts at ``rollout.eval_temperature``, the same dict
        on every rank; a failure raises ``RolloutEngineError`` on every rank."""
        if not self.eval_items:
            return {}
        return run_on_holder(self._evaluate_on_holder, self.layout)

    def _evaluate_on_holder(self) -> dict[str, float]:
        counts = torch.zeros(3, dtype=torch.float64)  # correct, samples, failed replicas
        error = None
        mine = self.eval_items[self.layout.dp_rank :: self.layout.dp]
        try:
            if mine:
                with self.progress(len(mine), "eval", leave=False) as bar:
                    batch = generate_and_score(self.engine, mine, self._params(evaluation=True), self.reward_fn, self.tokenizer,
                                               first_group_id=0, policy_version=-1, on_progress=bar.update)
                counts[:2] += torch.tensor([float(batch.correct_B.sum()), float(len(batch))], dtype=torch.float64)
        except Exception as e:  # noqa: BLE001 - raised on every engine rank below
            error = e
            counts[2] = 1
        counts = dp_all_reduce(counts)  # over the engine ranks of all replicas
        raise_if_any_replica_failed(error, counts[2].item() > 0, self.layout)
        if counts[1] == 0:
            return {}
        return {"eval/accuracy": float(counts[0] / counts[1]), "eval/num_samples": float(counts[1])}

    # -- the engine's weights and memory ------------------------------------------------------

    def sync_weights(self, actor_models: Sequence) -> SyncStats:
        """Actor -> engine (every rank calls it). The first sync of the run also checks the
        weights checksum (the engine's own reading against what the trainer sent) and logs
        the outcome."""
        first = not self.weights_checked
        stats = sync_weights(actor_models, self.engine, self.layout, bucket_mb=self.rollout_cfg.weight_sync_bucket_mb,
                             checksum=first)
        self.weights_checked = True
        if first and self.engine is not None and stats.checksum is not None:
            _log_checksum_check(self.engine, stats.checksum)
        return stats

    def release_memory(self) -> None:
        """Free the engine's memory while the trainer computes; the next weight sync or
        generation resumes it (a no-op for the embedded engine on CPU)."""
        if self.engine is not None:
            self.engine.release_memory()

    def close(self) -> None:
        if self.reward_fn is not None:
            self.reward_fn.close()
        if self.engine is not None:
            self.engine.shutdown()


def _log_checksum_check(engine: RolloutEngine, trainer_checksum: float) -> None:
    """Log whether the engine's own reading of its weights equals what the trainer sent."""
    try:
        held = engine.weights_checksum()
    except RolloutEngineError as e:
        log.warning("cannot check the engine's weights after the first sync: %s", e)
        return
    scope = engine.checksum_scope()
    kind = "every weight" if scope is None else f"a spot-check of {len(scope)} tensors"
    if checksums_match(trainer_checksum, held):
        log.info("%s holds the trainer's weights (checksum %.12g over %s)", engine.name, held, kind)
    else:
        log.warning("%s: weights checksum %.12g differs from the trainer's %.12g (over %s): the engine does not hold "
                    "the weights it was sent, or holds them in another dtype", engine.name, held, trainer_checksum, kind)
