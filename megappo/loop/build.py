"""A run, built from its config: the process grid, the policies, the rollout side, the
objective, the train state and the metrics, each a typed owner the loop calls by name.

Weights: every policy takes its architecture from ``model.hf_path``'s ``config.json``.
Its weights come from ``model.load_megatron`` when set (the actor, the reference, and the
critic's trunk unless ``model.critic_hf_path`` names its own), else from the HF directory.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

from megappo.checkpoint import CheckpointManager
from megappo.config import Config, config_to_dict, config_to_yaml, uses_critic
from megappo.config.model_files import check_tokenizer_fits
from megappo.data.dataset import PromptDataset, load_tokenizer
from megappo.data.loader import PromptLoader
from megappo.data.rewards import RewardFunction
from megappo.loop.rollout_side import RolloutSide
from megappo.loop.rollout_stream import RolloutStream
from megappo.loop.state import TrainState, tokenizer_fingerprint
from megappo.metrics import MetricsLogger, progress
from megappo.models import MegatronPolicy, ModelSpec, build_options, build_policy
from megappo.models.offload import TrainerOffload
from megappo.objective import Objective
from megappo.parallel.collectives import dp_sum_reducer
from megappo.parallel.placement import get_placement
from megappo.parallel.state import ParallelLayout, init_parallel
from megappo.rollout import build_engine, holds_engine
from megappo.rollout.remote import RemoteEngine
from megappo.rollout.reward_model import LoopRewardModel
from megappo.weights import load_hf_into_model, load_megatron_model

log = logging.getLogger("megappo")


@dataclass
class Policies:
    """The models of the RL step."""

    actor: MegatronPolicy
    critic: Optional[MegatronPolicy]
    """The value model (PPO with GAE); None for the critic-free presets."""
    reference: Optional[MegatronPolicy]
    """The frozen initial policy (for a KL term); None when no KL is used."""
    reward_model: Optional[LoopRewardModel] = None
    """The frozen reward model (``reward.model``); None when rewards are rule-based only."""

    def trained(self) -> dict[str, MegatronPolicy]:
        """The policies with optimizers, by checkpoint role."""
        return {name: p for name, p in (("actor", self.actor), ("critic", self.critic)) if p is not None}


@dataclass
class Run:
    cfg: Config
    layout: ParallelLayout
    hf_config: dict
    policies: Policies
    rollout: RolloutSide
    stream: RolloutStream
    """The step's batches in ``rollout.mode`` (sync, or generated ahead by a producer thread)."""
    objective: Objective
    state: TrainState
    metrics: MetricsLogger
    offload: Optional[TrainerOffload]
    """Moves the policies' parameters, gradient buffers and optimizer state to host memory
    around rollout (``train.offload``); None when off."""

    def close(self) -> None:
        self.stream.close()
        self.rollout.close()
        self.metrics.close()


def build_run(cfg: Config) -> Run:
    """Initialize the process groups and build every part of a run from ``cfg``."""
    p = cfg.parallel
    layout = init_parallel(
        p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size,
        seed=cfg.train.seed, device=p.device, backend=p.backend, ep=p.expert_model_parallel_size,
    )
    if cfg.model.hf_path is None:
        raise ValueError("model.hf_path must name a HuggingFace model directory")
    spec = ModelSpec.from_hf_dir(cfg.model.hf_path)
    with open(os.path.join(cfg.model.hf_path, "config.json")) as f:
        hf_config = json.load(f)
    tokenizer = load_tokenizer(cfg.data, cfg.model.hf_path)
    check_tokenizer_fits(len(tokenizer), spec.vocab_size, f"tokenizer of {cfg.data.tokenizer_path or cfg.model.hf_path}",
                         f"model.hf_path={cfg.model.hf_path}")
    policies = build_policies(cfg, spec, layout)
    if cfg.reward.model.hf_path is not None:
        policies.reward_model = LoopRewardModel(cfg.reward.model, layout, tokenizer, opts=build_options(cfg, layout),
                                                max_tokens_per_microbatch=cfg.train.max_tokens_per_microbatch)
    objective = Objective(cfg, reduce_sums=dp_sum_reducer())
    rollout = build_rollout_side(cfg, layout, hf_config, tokenizer)
    stream = RolloutStream(rollout, mode=cfg.rollout.mode, max_staleness=cfg.rollout.max_staleness,
                           partial_rollout=cfg.rollout.partial_rollout)
    state = TrainState(
        checkpoints=CheckpointManager(cfg.checkpoint.dir or os.path.join(cfg.train.run_dir, "checkpoints"),
                                      keep_last=cfg.checkpoint.keep_last),
        policies=policies.trained(),
        parts={"data": stream, "objective": objective},  # the stream's cursor: after the last batch trained
        spec=spec,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        config_dict=config_to_dict(cfg),
    )
    metrics = MetricsLogger.from_config(cfg.logging, cfg.train.run_dir, rank=layout.rank, total_steps=cfg.train.steps,
                                        run_config=config_to_dict(cfg))
    offload = TrainerOffload([policies.actor, policies.critic, policies.reference]) if cfg.train.offload else None
    if layout.rank == 0:
        os.makedirs(cfg.train.run_dir, exist_ok=True)
        with open(os.path.join(cfg.train.run_dir, "config.yaml"), "w") as f:
            f.write(config_to_yaml(cfg))
    return Run(cfg, layout, hf_config, policies, rollout, stream, objective, state, metrics, offload)


def build_policies(cfg: Config, spec: ModelSpec, layout: ParallelLayout) -> Policies:
    """The actor, and as the config asks the critic and the reference, with their weights."""
    m = cfg.model
    actor = build_policy(cfg, spec, "actor", layout)
    _load_weights(actor, m.load_megatron, m.hf_path)
    critic = reference = None
    if uses_critic(cfg):
        critic_dir = m.critic_hf_path or m.hf_path
        critic = build_policy(cfg, ModelSpec.from_hf_dir(critic_dir), "critic", layout)
        _load_weights(critic, None if m.critic_hf_path else m.load_megatron, critic_dir, trunk_only=True)
    if cfg.algo.use_kl_loss or cfg.algo.add_token_level_kl:
        reference = build_policy(cfg, spec, "reference", layout)
        _load_weights(reference, m.load_megatron, m.hf_path)
    return Policies(actor, critic, reference)


def _load_weights(policy: MegatronPolicy, megatron_dir: Optional[str], hf_dir: str, *, trunk_only: bool = False) -> None:
    # The policy, not its models: the loaders then refresh the optimizer's fp32 master copy.
    if megatron_dir is None:
        load_hf_into_model(policy, hf_dir)
        return
    load_megatron_model(policy, megatron_dir, trunk_only=trunk_only)
    log.info("%s weights loaded from the Megatron checkpoint %s%s", policy.role, megatron_dir, " (trunk)" if trunk_only else "")


def build_rollout_side(cfg: Config, layout: ParallelLayout, hf_config: dict, tokenizer: Any) -> RolloutSide:
    engine = reward_fn = None
    if holds_engine(layout):
        eos = sorted({tokenizer.eos_token_id} | set(cfg.rollout.stop_token_ids))
        placement = get_placement()
        if placement is not None:  # the engine runs on rollout rank N - R + dp_rank; this is its proxy
            spec = {"hf_config": hf_config, "hf_dir": cfg.model.hf_path, "eos_token_ids": eos, "seed": cfg.train.seed}
            engine = RemoteEngine.connect(placement, replica=layout.dp_rank, spec=spec, device=layout.device)
        else:
            engine = build_engine(cfg.rollout, hf_dir=cfg.model.hf_path, hf_config=hf_config, layout=layout,
                                  eos_token_ids=eos, seed=cfg.train.seed)
        reward_fn = RewardFunction.from_config(cfg.reward)
    if cfg.data.train_path is None:
        raise ValueError("data.train_path must name a .jsonl or .parquet file of prompts")
    train_set = PromptDataset.from_config(cfg.data, tokenizer, path=cfg.data.train_path, verbose=layout.rank == 0)
    eval_items = []
    if cfg.data.eval_path and cfg.train.eval_every:
        eval_set = PromptDataset.from_config(cfg.data, tokenizer, path=cfg.data.eval_path, verbose=layout.rank == 0)
        eval_items = list(eval_set)[: cfg.data.max_eval_samples]
    return RolloutSide(
        layout=layout,
        rollout_cfg=cfg.rollout,
        data=PromptLoader.from_config(train_set, cfg, dp_rank=layout.dp_rank, dp_size=layout.dp),
        tokenizer=tokenizer,
        engine=engine,
        reward_fn=reward_fn,
        eval_items=eval_items,
        seed=cfg.train.seed,
        dynamic_sampling=cfg.algo.dynamic_sampling,
        max_sampling_rounds=cfg.algo.max_sampling_rounds,
        progress=lambda items, desc, leave=True: progress(items, desc, enabled=cfg.logging.progress_bar, rank=layout.rank,
                                                           leave=leave),
    )
