"""Everything a run is built from, in one place: the parallel layout, the models, the
rollout engine, data, rewards, checkpoints and metrics, wired from the config.

``Trainer`` (``megappo/trainer.py``) keeps the loop; this module keeps the plumbing each
phase needs (which rank generates, how a batch is split into mini-batches, how a
checkpoint is laid out), so the loop reads as the algorithm.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from megappo.config import Config, config_to_dict, uses_critic
from megappo.experience import Experience, build_experience, generate_and_score, rollout_metrics
from megappo.models.spec import ModelSpec
from megappo.parallel.collectives import dp_all_reduce

log = logging.getLogger("megappo")


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the vocabulary, so a resume with another tokenizer is caught."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


class PhaseTimer:
    """``with timer("rollout"): ...`` per phase; ``metrics()`` gives seconds, fractions, tokens/s."""

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

    def metrics(self, tokens: int = 0) -> dict[str, float]:
        total = time.perf_counter() - self.start
        out = {f"time/{k}": v for k, v in self.seconds.items()}
        out["time/step"] = total
        if tokens:
            out["perf/tokens_per_s"] = tokens / max(total, 1e-9)
        return out


@dataclass
class RunComponents:
    cfg: Config
    layout: object
    spec: ModelSpec
    hf_config: dict
    tokenizer: object
    actor: object
    critic: object | None
    reference: object | None
    engine: object | None
    reward_fn: object | None
    data: object
    eval_items: list
    ckpt: object
    metrics: object
    weights_checked: bool = False
    """Whether a weight sync of this run already compared checksums (the first does)."""

    # -- generation ---------------------------------------------------------------------

    def sampling_params(self, *, eval_mode: bool = False):
        from megappo.rollout import SamplingParams

        r = self.cfg.rollout
        eos = self.tokenizer.eos_token_id
        stop = sorted(set(r.stop_token_ids) | ({eos} if eos is not None else set()))
        return SamplingParams(
            n=1 if eval_mode else r.num_return_sequences_in_group,
            temperature=r.eval_temperature if eval_mode else r.temperature,
            top_p=1.0 if eval_mode else r.top_p,
            top_k=-1 if eval_mode else r.top_k,
            max_new_tokens=r.response_length,
            stop_token_ids=stop,
            seed=self.cfg.train.seed + self.layout.dp_rank,
        )

    def sample_experience(self, step: int, *, dynamic: bool, max_rounds: int) -> Experience:
        """Every rank: this replica's experience of ``step``. The engine holder samples and
        scores (``generate_batch``); the replica's other ranks receive the result and move
        their data cursors as the holder did. A failure on any replica (engine or reward)
        raises ``RolloutEngineError`` on every rank (``megappo.rollout.group``)."""
        from megappo.rollout.group import run_on_holder

        payload = run_on_holder(lambda: self.generate_batch(step, dynamic=dynamic, max_rounds=max_rounds), self.layout)
        if self.engine is None:
            for _ in range(payload["rounds"]):
                self.data.next_batch()
        return build_experience(payload)

    def generate_batch(self, step: int, *, dynamic: bool, max_rounds: int) -> dict:
        """On an engine rank: this replica's prompts, sampled and scored. With dynamic
        sampling (DAPO), groups whose scores are all equal are dropped and more prompts are
        sampled, up to ``max_rounds`` rounds (the same number on every replica, so the data
        cursors stay in step); a batch still short is topped up with dropped groups.

        The engine ranks of all replicas (one data-parallel group) all-reduce after each
        round whether they are done and whether one failed; a failure raises
        ``RolloutEngineError`` on all of them there, before any other collective. A bar
        counts the prompts generated (rank 0, ``logging.progress_bar``)."""
        from megappo.rollout.group import raise_if_any_replica_failed

        params = self.sampling_params()
        kept, dropped, rounds, target = [], [], 0, None
        errors = timeouts = 0
        reward_seconds = 0.0
        with self.progress(0, f"rollout {step}", leave=False) as bar:
            while True:
                rounds += 1
                error = None
                try:
                    prompts = self.data.next_batch()
                    target = target or len(prompts)
                    bar.total += len(prompts)
                    bar.refresh()
                    # A function of (seed, step, round, replica) only, so a resumed run samples as
                    # the uninterrupted one would.
                    seed = self.cfg.train.seed * 1_000_003 + (step * max_rounds + rounds) * 7919 + self.layout.dp_rank
                    payload = generate_and_score(
                        self.engine, prompts, _with_seed(params, seed), self.reward_fn, self.tokenizer,
                        group_offset=(self.layout.dp_rank * max_rounds + rounds - 1) * len(prompts), on_progress=bar.update,
                    )
                    errors += payload["reward_errors"]
                    timeouts += payload["reward_timeouts"]
                    reward_seconds += payload["reward_seconds"]
                    for g in _split_groups(payload, params.n):
                        (kept if not dynamic or len(set(g["scores"])) > 1 else dropped).append(g)
                except Exception as e:  # noqa: BLE001 - raised on every engine rank below
                    error = e
                done = error is not None or not dynamic or len(kept) >= target or rounds >= max_rounds
                not_done, failed = dp_all_reduce(torch.tensor([0.0 if done else 1.0, 0.0 if error is None else 1.0])).tolist()
                raise_if_any_replica_failed(error, failed > 0, self.layout)
                if dynamic:
                    bar.set_postfix(kept_groups=len(kept), rounds=rounds)
                if not_done == 0:
                    break
        out = _join_groups((kept + dropped)[:target])
        out.update(rounds=rounds, reward_errors=errors, reward_timeouts=timeouts, reward_seconds=reward_seconds,
                   kept_groups=min(len(kept), target))
        return out

    def evaluate(self) -> dict[str, float]:
        """Greedy (``rollout.eval_temperature``) accuracy on the held-out prompts, the same
        dict on every rank; a failure raises ``RolloutEngineError`` on every rank."""
        from megappo.rollout.group import run_on_holder

        if not self.eval_items:
            return {}
        return run_on_holder(self._evaluate_on_engine_rank, self.layout)

    def _evaluate_on_engine_rank(self) -> dict[str, float]:
        from megappo.rollout.group import raise_if_any_replica_failed

        counts = torch.zeros(3, dtype=torch.float64)  # correct, samples, failed replicas
        error = None
        mine = self.eval_items[self.layout.dp_rank :: self.layout.dp]
        try:
            if mine:
                with self.progress(len(mine), "eval", leave=False) as bar:
                    payload = generate_and_score(self.engine, mine, self.sampling_params(eval_mode=True), self.reward_fn,
                                                 self.tokenizer, group_offset=0, on_progress=bar.update)
                counts[:2] += torch.tensor([sum(payload["correct"]), len(payload["correct"])], dtype=torch.float64)
        except Exception as e:  # noqa: BLE001 - raised on every engine rank below
            error = e
            counts[2] = 1
        counts = dp_all_reduce(counts)  # over the engine ranks of all replicas
        raise_if_any_replica_failed(error, counts[2].item() > 0, self.layout)
        if counts[1] == 0:
            return {}
        return {"eval/accuracy": float(counts[0] / counts[1]), "eval/num_samples": float(counts[1])}

    def minibatches(self, num_rows: int) -> list[torch.Tensor]:
        """Row indices of each mini-batch of this rank's batch (contiguous, whole groups)."""
        t, n = self.cfg.train, self.cfg.rollout.num_return_sequences_in_group
        if t.mini_batch_size is None:
            return [torch.arange(num_rows)]
        rows = t.mini_batch_size * n // self.layout.dp
        return [torch.arange(s, min(s + rows, num_rows)) for s in range(0, num_rows, rows)]

    def rollout_metrics(self, exp: Experience) -> dict[str, float]:
        return rollout_metrics(exp, reduce=dp_all_reduce, dynamic_sampling=self.cfg.algo.dynamic_sampling)

    def global_tokens(self, exp: Experience) -> int:
        """Prompt and response tokens of the step over all data-parallel replicas (for
        ``perf/tokens_per_s``)."""
        local = exp.batch.prompt_lens_B.sum() + exp.batch.response_lens_B.sum()
        return int(dp_all_reduce(local.to(torch.float64).reshape(1))[0].item())

    def release_engine_memory(self) -> None:
        """Free the engine's memory while the trainer computes; the next weight sync or
        generation resumes it (a no-op for the embedded engine on CPU)."""
        if self.engine is not None:
            self.engine.release_memory()

    def sync_weights(self):
        """Actor -> engine. The first sync of the run also checks the weights checksum (the
        engine's own reading against what the trainer sent) and logs the outcome."""
        from megappo.rollout import sync_weights

        first = not self.weights_checked
        stats = sync_weights(self.actor.models, self.engine, self.layout, bucket_mb=self.cfg.rollout.weight_sync_bucket_mb, checksum=first)
        self.weights_checked = True
        if first and self.engine is not None and stats.checksum is not None:
            _log_checksum_check(self.engine, stats.checksum)
        return stats

    # -- checkpoints --------------------------------------------------------------------

    def _policies(self) -> dict:
        return {name: p for name, p in (("actor", self.actor), ("critic", self.critic)) if p is not None}

    def save_checkpoint(self, step: int, objective) -> None:
        t0 = time.perf_counter()
        self.ckpt.save(
            step,
            policies=self._policies(),
            extra={"step": step, "data": self.data.state_dict(), "objective": objective.state_dict()},
            config_dict=config_to_dict(self.cfg),
            spec_dict=self.spec.to_dict(),
            tokenizer_fingerprint=tokenizer_fingerprint(self.tokenizer),
        )
        log.info("checkpoint step %d saved in %.1f s", step, time.perf_counter() - t0)

    def resume(self, objective) -> int:
        """Load the latest checkpoint when ``checkpoint.resume`` is auto; returns its step (0 if none)."""
        if self.cfg.checkpoint.resume != "auto" or self.ckpt.latest() is None:
            self.metrics.start(0)
            return 0
        extra = self.ckpt.load(
            self.ckpt.latest(),
            policies=self._policies(),
            spec_dict=self.spec.to_dict(),
            tokenizer_fingerprint=tokenizer_fingerprint(self.tokenizer),
        )
        self.data.load_state_dict(extra["data"])
        objective.load_state_dict(extra["objective"])
        self.metrics.start(int(extra["step"]))
        log.info("resumed from %s at step %d", self.ckpt.latest(), extra["step"])
        return int(extra["step"])

    def save_hf(self, tag: str) -> None:
        from megappo.weights import save_hf

        out = os.path.join(self.cfg.train.run_dir, "hf", tag)
        tok_dir = self.cfg.data.tokenizer_path or self.cfg.model.hf_path
        save_hf(self.actor.models, out, hf_config=self.hf_config, tokenizer_dir=tok_dir)
        log.info("actor saved in HF format to %s", out)

    # -- misc ---------------------------------------------------------------------------

    def timer(self) -> PhaseTimer:
        return PhaseTimer()

    def progress(self, iterable, desc: str, *, leave: bool = True):
        from megappo.metrics import progress

        return progress(iterable, desc, enabled=self.cfg.logging.progress_bar, rank=self.layout.rank, leave=leave)

    def close(self) -> None:
        if self.reward_fn is not None:
            self.reward_fn.close()
        if self.engine is not None:
            self.engine.shutdown()
        self.metrics.close()


def _log_checksum_check(engine, trainer_checksum: float) -> None:
    """Log whether the engine's own reading of its weights equals what the trainer sent."""
    from megappo.rollout import RolloutEngineError, checksums_match

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


def _with_seed(params, seed: int):
    from dataclasses import replace

    return replace(params, seed=int(seed % (2**31 - 1)))


_PER_RESPONSE = ("prompt_ids", "response_ids", "logprobs", "truncated", "group_ids", "texts", "scores", "correct")


def _split_groups(payload: dict, n: int) -> list[dict]:
    """The per-response lists of a payload, cut into groups of ``n`` (one prompt each)."""
    size = len(payload["scores"])
    return [{k: payload[k][i : i + n] for k in _PER_RESPONSE} for i in range(0, size, n)]


def _join_groups(chosen: list[dict]) -> dict:
    return {k: [x for g in chosen for x in g[k]] for k in _PER_RESPONSE}


def build_components(cfg: Config) -> RunComponents:
    """Initialize the process groups and build every component of a run from ``cfg``."""
    from transformers import AutoTokenizer

    from megappo.checkpoint import CheckpointManager
    from megappo.data import PromptDataset, PromptLoader, RewardFunction
    from megappo.metrics import MetricsLogger
    from megappo.models import build_policy
    from megappo.parallel.state import init_parallel
    from megappo.rollout import build_engine, holds_engine
    from megappo.weights import load_hf_into_model

    p = cfg.parallel
    layout = init_parallel(
        p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size,
        seed=cfg.train.seed, device=p.device, backend=p.backend,
    )
    seed_everything(cfg.train.seed)
    if cfg.model.hf_path is None:
        raise ValueError("model.hf_path must name a HuggingFace model directory")
    spec = ModelSpec.from_hf_dir(cfg.model.hf_path)
    with open(os.path.join(cfg.model.hf_path, "config.json")) as f:
        hf_config = json.load(f)
    tokenizer = AutoTokenizer.from_pretrained(cfg.data.tokenizer_path or cfg.model.hf_path)

    actor = build_policy(cfg, spec, "actor", layout)
    # The policy, not its models: the loader then refreshes the optimizer's fp32 master copy.
    load_hf_into_model(actor, cfg.model.hf_path)
    critic = reference = None
    if uses_critic(cfg):
        critic_dir = cfg.model.critic_hf_path or cfg.model.hf_path
        critic = build_policy(cfg, ModelSpec.from_hf_dir(critic_dir), "critic", layout)
        load_hf_into_model(critic, critic_dir)
    if cfg.algo.use_kl_loss or cfg.algo.add_token_level_kl:
        reference = build_policy(cfg, spec, "reference", layout)
        load_hf_into_model(reference, cfg.model.hf_path)

    engine = reward_fn = None
    if holds_engine(layout):
        eos = sorted({tokenizer.eos_token_id} | set(cfg.rollout.stop_token_ids))
        engine = build_engine(cfg.rollout, hf_dir=cfg.model.hf_path, hf_config=hf_config, layout=layout, eos_token_ids=eos, seed=cfg.train.seed)
        reward_fn = RewardFunction.from_config(cfg.reward)

    if cfg.data.train_path is None:
        raise ValueError("data.train_path must name a .jsonl or .parquet file of prompts")
    train_set = PromptDataset.from_config(cfg.data, tokenizer, path=cfg.data.train_path, verbose=layout.rank == 0)
    data = PromptLoader.from_config(train_set, cfg, dp_rank=layout.dp_rank, dp_size=layout.dp)
    eval_items = []
    if cfg.data.eval_path and cfg.train.eval_every:
        eval_set = PromptDataset.from_config(cfg.data, tokenizer, path=cfg.data.eval_path, verbose=layout.rank == 0)
        eval_items = list(eval_set)[: cfg.data.max_eval_samples]

    ckpt = CheckpointManager(cfg.checkpoint.dir or os.path.join(cfg.train.run_dir, "checkpoints"), keep_last=cfg.checkpoint.keep_last)
    metrics = MetricsLogger(cfg.train.run_dir, tensorboard=cfg.logging.tensorboard, console_every=cfg.logging.console_every, rank=layout.rank)
    if layout.rank == 0:
        os.makedirs(cfg.train.run_dir, exist_ok=True)
        with open(os.path.join(cfg.train.run_dir, "config.yaml"), "w") as f:
            from megappo.config import config_to_yaml

            f.write(config_to_yaml(cfg))
    return RunComponents(cfg, layout, spec, hf_config, tokenizer, actor, critic, reference, engine, reward_fn, data, eval_items, ckpt, metrics)
