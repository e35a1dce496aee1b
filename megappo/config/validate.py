"""Checks of a loaded config as a whole: ranges, parallel layout, combinations.

`validate` runs inside `load_config`: every problem is a `ConfigError` naming the fields and
values involved; a setting that has no effect in this combination is a logged warning (and
returned). What needs the files a run reads (model, tokenizer, data, run directory) is
``preflight.check_runnable``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
from functools import reduce
from typing import Any, Callable, Optional

from megappo.config.errors import ConfigError
from megappo.config.model_files import read_hf_config
from megappo.config.passthrough import check_megatron_passthrough
from megappo.config.placement import trainer_world_size
from megappo.config.presets import uses_critic
from megappo.config.schema import Config

log = logging.getLogger("megappo.config")
_DEFAULTS = Config()


def get(cfg: Any, path: str) -> Any:
    """The value at a dotted path (``get(cfg, "algo.adv_norm.std_level")``)."""
    return reduce(getattr, path.split("."), cfg)


def data_parallel_size(cfg: Config, world_size: int) -> int:
    """DP = world / (TP x PP); a `ConfigError` when the world does not split evenly."""
    tp = cfg.parallel.tensor_model_parallel_size
    pp = cfg.parallel.pipeline_model_parallel_size
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tensor_model_parallel_size x "
            f"parallel.pipeline_model_parallel_size = {tp} x {pp} = {tp * pp}"
        )
    return world_size // (tp * pp)


# (field, lower bound, inclusive?) for numbers that must stay in range; None values skip.
_LOWER_BOUNDS: tuple[tuple[str, float, bool], ...] = (
    *((p, 1, True) for p in (
        "parallel.tensor_model_parallel_size", "parallel.pipeline_model_parallel_size",
        "parallel.virtual_pipeline_model_parallel_size", "parallel.expert_model_parallel_size",
        "rollout.num_return_sequences_in_group",
        "rollout.response_length", "rollout.weight_sync_bucket_mb", "data.prompt_length",
        "data.max_eval_samples", "train.steps", "train.rollout_batch_size", "train.mini_batch_size",
        "train.max_tokens_per_microbatch", "algo.ppo_epochs", "algo.max_sampling_rounds",
        "algo.kl_horizon", "algo.overlong_buffer_len", "reward.num_workers", "checkpoint.keep_last",
        "reward.max_failed_batches", "logging.console_every", "model.recompute_num_layers", "model.fp8.amax_history_len",
        "optim.lr_decay_steps",
    )),
    *((p, 0, True) for p in (
        "train.eval_every", "checkpoint.save_every", "checkpoint.save_hf_every", "optim.lr_warmup_steps",
        "algo.critic_warmup_steps", "optim.lr", "optim.critic_lr", "optim.min_lr", "optim.weight_decay",
        "optim.clip_grad", "algo.entropy_coef", "algo.kl_loss_coef", "algo.init_kl_coef",
        "algo.value_loss_coef", "algo.overlong_penalty_factor", "algo.adv_norm.eps",
        "model.value_head_init_std", "checkpoint.keep_last_hf", "reward.batch_timeout_s",
        "reward.max_failed_fraction", "rollout.eval_temperature", "algo.gamma", "algo.lambd", "optim.adam_beta1", "optim.adam_beta2",
    )),
    *((p, 0, False) for p in (
        "rollout.temperature", "rollout.server_timeout_s", "reward.timeout_s", "optim.adam_eps",
        "algo.advantage_clip", "algo.reward_clip", "algo.value_clip", "algo.tis_clip", "algo.target_kl",
        "rollout.top_p", "algo.pg_clip", "algo.pg_clip_low", "algo.pg_clip_high",
    )),
)

# (field, upper bound, inclusive?)
_UPPER_BOUNDS: tuple[tuple[str, float, bool], ...] = (
    ("rollout.top_p", 1.0, True), ("algo.gamma", 1.0, True), ("algo.lambd", 1.0, True),
    ("algo.pg_clip", 1.0, False), ("algo.pg_clip_low", 1.0, False), ("algo.pg_clip_high", 1.0, False),
    ("optim.adam_beta1", 1.0, False), ("optim.adam_beta2", 1.0, False),
    ("reward.max_failed_fraction", 1.0, True),
)


def _non_finite(value: Any, path: str) -> Optional[str]:
    """The dotted path of the first NaN or infinity in ``value`` (dicts and lists walked)."""
    if isinstance(value, float) and not math.isfinite(value):
        return path
    if dataclasses.is_dataclass(value):
        items = ((f.name, getattr(value, f.name)) for f in dataclasses.fields(value))
    elif isinstance(value, dict):
        items = ((str(k), v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for key, item in items:
        found = _non_finite(item, f"{path}{key}" if key.startswith("[") else (f"{path}.{key}" if path else key))
        if found:
            return found
    return None


def _check_finite(cfg: Config) -> None:
    """NaN and infinity are never meaningful settings (``optim.lr=.inf`` would turn the weights
    to NaN in the first step), pass-through dicts included."""
    path = _non_finite(cfg, "")
    if path is not None:
        raise ConfigError(f"{path} must be a finite number, got {get_any(cfg, path)!r}")


def get_any(cfg: Any, path: str) -> Any:
    """``get`` that also walks into dict fields and lists (``model.megatron.x``, ``a.b[1]``)."""
    value = cfg
    for part in path.replace("[", ".[").split("."):
        if part.startswith("["):
            value = value[int(part[1:-1])]
        elif isinstance(value, dict):
            value = value[part]
        else:
            value = getattr(value, part)
    return value


def _check_ranges(cfg: Config) -> None:
    for path, low, inclusive in _LOWER_BOUNDS:
        value = get(cfg, path)
        if value is not None and (value < low if inclusive else value <= low):
            raise ConfigError(f"{path} must be {'>=' if inclusive else '>'} {low}, got {value}")
    for path, high, inclusive in _UPPER_BOUNDS:
        value = get(cfg, path)
        if value is not None and (value > high if inclusive else value >= high):
            raise ConfigError(f"{path} must be {'<=' if inclusive else '<'} {high}, got {value}")
    if cfg.checkpoint.resume == "never" and cfg.checkpoint.resume_from is not None:
        raise ConfigError(
            f"checkpoint.resume=never contradicts checkpoint.resume_from={cfg.checkpoint.resume_from!r}: set one of them"
        )
    if cfg.rollout.top_k != -1 and cfg.rollout.top_k < 1:
        raise ConfigError(f"rollout.top_k must be -1 (disabled) or >= 1, got {cfg.rollout.top_k}")


def _check_reward_model_layout(rm, tp: int, pp: int, world_size: Optional[int]) -> None:
    """The reward model's own TP x PP (``reward.model.tensor_model_parallel_size`` /
    ``pipeline_model_parallel_size``, default the actor's) must divide its heads, KV heads and
    layers, and TP x PP the world size."""
    names = ("reward.model.tensor_model_parallel_size", "reward.model.pipeline_model_parallel_size")
    for name, value in zip(names, (rm.tensor_model_parallel_size, rm.pipeline_model_parallel_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    own = rm.tensor_model_parallel_size is not None or rm.pipeline_model_parallel_size is not None
    rm_tp, rm_pp = rm.tensor_model_parallel_size or tp, rm.pipeline_model_parallel_size or pp
    tp_name, pp_name = names if own else ("parallel.tensor_model_parallel_size", "parallel.pipeline_model_parallel_size")
    if world_size is not None and world_size % (rm_tp * rm_pp):
        raise ConfigError(f"{names[0]} x {names[1]} = {rm_tp} x {rm_pp} = {rm_tp * rm_pp} does not divide "
                          f"the world size {world_size}")
    hf = read_hf_config(rm.hf_path)
    if hf is None:
        return
    why = f"of reward.model.hf_path={rm.hf_path}" + ("" if own else " (the reward model's layout defaults to the actor's)")
    heads = hf.get("num_attention_heads")
    for name, n in (("num_attention_heads", heads), ("num_key_value_heads", hf.get("num_key_value_heads") or heads)):
        if isinstance(n, int) and n % rm_tp:
            raise ConfigError(f"{tp_name}={rm_tp} does not divide {name}={n} {why}")
    layers = hf.get("num_hidden_layers")
    if isinstance(layers, int) and layers % rm_pp:
        raise ConfigError(f"{pp_name}={rm_pp} does not divide num_hidden_layers={layers} {why}")


def _check_parallel(cfg: Config, world_size: Optional[int]) -> None:
    world_size = trainer_world_size(cfg, world_size)  # the ranks that train: every layout check below is theirs
    par = cfg.parallel
    tp, pp, vpp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.virtual_pipeline_model_parallel_size
    if vpp is not None and pp == 1:
        raise ConfigError(
            f"parallel.virtual_pipeline_model_parallel_size={vpp} needs parallel.pipeline_model_parallel_size > 1 (got 1)"
        )
    if par.sequence_parallel and tp == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1 (got 1)")
    for what, path in (("model.hf_path", cfg.model.hf_path), ("model.critic_hf_path", cfg.model.critic_hf_path)):
        hf = read_hf_config(path)
        if hf is None:
            continue
        where = f"of {what}={path}"
        heads = hf.get("num_attention_heads")
        kv_heads = hf.get("num_key_value_heads") or heads
        layers = hf.get("num_hidden_layers")
        for name, n in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
            if isinstance(n, int) and n % tp:
                raise ConfigError(f"parallel.tensor_model_parallel_size={tp} does not divide {name}={n} {where}")
        ep, experts = par.expert_model_parallel_size, hf.get("num_experts") or hf.get("num_local_experts")
        if ep > 1 and not isinstance(experts, int):
            raise ConfigError(f"parallel.expert_model_parallel_size={ep} needs a mixture-of-experts model; {where} is dense")
        if isinstance(experts, int) and experts % ep:
            raise ConfigError(f"parallel.expert_model_parallel_size={ep} does not divide the number of experts {experts} {where}")
        if isinstance(layers, int) and layers % (pp * (vpp or 1)):
            what_pp = f"pipeline_model_parallel_size={pp}" + (f" x virtual_pipeline_model_parallel_size={vpp}" if vpp else "")
            raise ConfigError(f"parallel.{what_pp} = {pp * (vpp or 1)} does not divide num_hidden_layers={layers} {where}")
    dp = None if world_size is None else data_parallel_size(cfg, world_size)  # the actor's layout is named first
    if cfg.reward.model.hf_path is not None:
        _check_reward_model_layout(cfg.reward.model, tp, pp, world_size)
    if dp is None:
        return
    n = cfg.rollout.num_return_sequences_in_group
    layout = f"world size {world_size} / (TP {tp} x PP {pp})"
    if dp % par.expert_model_parallel_size:
        raise ConfigError(
            f"parallel.expert_model_parallel_size={par.expert_model_parallel_size} does not divide the data-parallel size {dp} ({layout})"
        )
    if cfg.train.rollout_batch_size % dp:  # the prompt loader gives every DP rank an equal share of prompts
        raise ConfigError(
            f"train.rollout_batch_size={cfg.train.rollout_batch_size} prompts do not split over data-parallel "
            f"size {dp} ({layout}): each data-parallel rank takes an equal share of every batch's prompts"
        )
    for path in ("train.rollout_batch_size", "train.mini_batch_size"):
        prompts = get(cfg, path)
        if prompts is not None and (prompts * n) % dp:
            raise ConfigError(
                f"{path} x rollout.num_return_sequences_in_group = {prompts} x {n} = {prompts * n} responses "
                f"do not split over data-parallel size {dp} ({layout})"
            )


def _check_algo(cfg: Config) -> None:
    algo, n = cfg.algo, cfg.rollout.num_return_sequences_in_group
    mini, rollout_bs = cfg.train.mini_batch_size, cfg.train.rollout_batch_size
    if mini is not None and rollout_bs % mini:
        raise ConfigError(f"train.mini_batch_size={mini} does not divide train.rollout_batch_size={rollout_bs}")
    if algo.dual_clip_loss and algo.dual_clip_c <= 1:
        raise ConfigError(f"algo.dual_clip_c must be > 1 with algo.dual_clip_loss=true, got {algo.dual_clip_c}")
    if algo.routing_replay_source == "rollout":  # an engine that reports the experts it routed (servers: asked at start)
        if not algo.routing_replay:
            raise ConfigError("algo.routing_replay_source=rollout needs algo.routing_replay=true")
        if cfg.rollout.engine == "sglang" and not dict(cfg.rollout.sglang).get("enable_return_routed_experts"):
            raise ConfigError("algo.routing_replay_source=rollout: rollout.engine=sglang reports the experts it routed only "
                              "with rollout.sglang.enable_return_routed_experts=true (SGLang's server argument)")
    if n == 1:
        group_levels = [
            f"algo.adv_norm.{name}=group" for name in ("mean_level", "std_level") if getattr(algo.adv_norm, name) == "group"
        ]
        if algo.adv_estimator == "grpo" and group_levels:
            raise ConfigError(
                f"{' and '.join(group_levels)} with rollout.num_return_sequences_in_group=1: a group of one response "
                "has std NaN and a centred score of 0; sample several responses per prompt or use level 'batch'"
            )
        if algo.adv_estimator in ("rloo", "reinforce_pp_baseline"):
            raise ConfigError(
                f"algo.adv_estimator={algo.adv_estimator} subtracts a group baseline and needs "
                "rollout.num_return_sequences_in_group >= 2 (got 1)"
            )
        if algo.reward_norm == "group":
            raise ConfigError("algo.reward_norm=group needs rollout.num_return_sequences_in_group >= 2 (got 1)")
        if algo.dynamic_sampling:
            raise ConfigError(
                "algo.dynamic_sampling=true drops groups whose rewards are all equal, which is every group of "
                "rollout.num_return_sequences_in_group=1"
            )
    if algo.policy_loss == "decoupled" and algo.tis_clip is not None:
        raise ConfigError(
            "algo.policy_loss=decoupled and algo.tis_clip are exclusive: both weight tokens by pi_old / pi_rollout; "
            "the decoupled loss truncates that weight at algo.behav_weight_cap"
        )
    if algo.behav_weight_cap < 1.0:
        raise ConfigError(f"algo.behav_weight_cap={algo.behav_weight_cap} must be >= 1 (the weight of an on-policy token is 1)")
    if algo.mask_stale_tokens is not None and algo.mask_stale_tokens < 0:
        raise ConfigError(f"algo.mask_stale_tokens={algo.mask_stale_tokens} must be >= 0 (a lag in policy versions) or null")
    if cfg.rollout.max_staleness < 0:
        raise ConfigError(f"rollout.max_staleness={cfg.rollout.max_staleness} must be >= 0")
    if cfg.rollout.mode != "sync" and algo.dynamic_sampling:
        raise ConfigError(f"algo.dynamic_sampling=true needs rollout.mode=sync (got {cfg.rollout.mode!r}): its extra "
                          "sampling rounds synchronize the replicas inside a step")
    if cfg.rollout.partial_rollout and cfg.rollout.mode == "sync":
        raise ConfigError("rollout.partial_rollout=true needs rollout.mode=one_step_off or async (got 'sync': nothing is "
                          "generated while the weights change)")
    if cfg.rollout.mode != "sync" and cfg.train.offload:
        raise ConfigError(f"train.offload=true needs rollout.mode=sync (got {cfg.rollout.mode!r}): generation "
                          "overlaps training, so the trainer's state cannot leave the GPU while the engine runs")
    if algo.reward_shift and algo.reward_scale:
        raise ConfigError(
            "algo.reward_shift=true and algo.reward_scale=true are exclusive: shift only subtracts the mean, "
            "scale only divides by the std; set neither for full normalization (r - mean) / std"
        )
    if algo.kl_penalty == "full" and algo.add_token_level_kl:
        raise ConfigError(
            "algo.kl_penalty=full with algo.add_token_level_kl=true: the exact KL over the vocabulary is computed "
            "inside the actor update only, so it can be a loss term (algo.use_kl_loss) but not a reward; "
            "use kl, abs, mse or low_var_kl for KL in the reward"
        )
    pp = cfg.parallel.pipeline_model_parallel_size
    if algo.kl_penalty == "full" and algo.use_kl_loss and pp > 1:
        raise ConfigError(
            f"algo.kl_penalty=full with algo.use_kl_loss=true needs parallel.pipeline_model_parallel_size=1 "
            f"(got {pp}): the exact KL runs the actor and the reference side by side on each micro-batch; "
            "use kl, abs, mse or low_var_kl with pipeline parallelism"
        )
    if algo.add_token_level_kl and algo.adv_estimator in ("grpo", "rloo"):
        raise ConfigError(
            f"algo.add_token_level_kl=true needs a token-level estimator (gae, reinforce_pp, reinforce_pp_baseline); "
            f"algo.adv_estimator={algo.adv_estimator} uses one outcome score per response: use algo.use_kl_loss instead"
        )
    if algo.overlong_buffer_len is not None and algo.overlong_buffer_len >= cfg.rollout.response_length:
        raise ConfigError(
            f"algo.overlong_buffer_len={algo.overlong_buffer_len} must be < rollout.response_length={cfg.rollout.response_length}"
        )
    if cfg.optim.min_lr > cfg.optim.lr:
        raise ConfigError(f"optim.min_lr={cfg.optim.min_lr} is above optim.lr={cfg.optim.lr}")


def _check_lengths(cfg: Config) -> None:
    """A prompt and its response must fit the model's positions (when its config is readable)."""
    prompt, response = cfg.data.prompt_length, cfg.rollout.response_length
    for what, path in (("model.hf_path", cfg.model.hf_path), ("model.critic_hf_path", cfg.model.critic_hf_path)):
        limit = (read_hf_config(path) or {}).get("max_position_embeddings")
        if isinstance(limit, int) and prompt + response > limit:
            raise ConfigError(
                f"data.prompt_length + rollout.response_length = {prompt} + {response} = {prompt + response} "
                f"exceeds max_position_embeddings={limit} of {what}={path}"
            )


def _check_backends(cfg: Config) -> None:
    model, par, rollout = cfg.model, cfg.parallel, cfg.rollout
    if model.fp8.format is not None:
        if model.transformer_impl == "local":
            raise ConfigError(
                f"model.fp8.format={model.fp8.format} needs Transformer Engine: set model.transformer_impl to "
                "'transformer_engine' or 'auto' (it is 'local')"
            )
        if par.device == "cpu":
            raise ConfigError(f"model.fp8.format={model.fp8.format} needs an FP8-capable GPU, but parallel.device=cpu")
    if model.transformer_impl == "local" and par.sequence_parallel:
        raise ConfigError("parallel.sequence_parallel=true needs the Transformer Engine layer spec, but model.transformer_impl=local")
    if model.fp8.param_gather and not par.use_distributed_optimizer:
        raise ConfigError(
            "model.fp8.param_gather=true needs parallel.use_distributed_optimizer=true "
            "(the FP8 parameter all-gather is the distributed optimizer's)"
        )
    if par.backend == "nccl" and par.device == "cpu":
        raise ConfigError("parallel.backend=nccl needs GPUs, but parallel.device=cpu: use backend 'gloo' or 'auto'")
    if rollout.engine == "sglang_server" and not rollout.server_urls:
        raise ConfigError("rollout.engine=sglang_server needs rollout.server_urls (the servers' base URLs)")
    if rollout.engine == "sglang" and par.device == "cpu" and importlib.util.find_spec("sglang") is None:
        # SGLang on CPU is for tests and debugging (tiny models; megappo.parallel.sglang_cpu)
        raise ConfigError(
            "rollout.engine=sglang with parallel.device=cpu (tests and debugging only) runs SGLang in this "
            "Python, which has none: build the CPU SGLang environment (make sglang-env) and run with "
            ".venv-sglang/bin/python, or use rollout.engine=embedded"
        )


def _no_critic(cfg: Config) -> bool:
    return not uses_critic(cfg)


_CRITIC = "there is no critic (only algo.adv_estimator=gae trains one)"

# (setting, ignored-when, why): a warning when the setting differs from its default but has no effect.
_IGNORED: tuple[tuple[str, Callable[[Config], bool], str], ...] = (
    ("algo.dual_clip_c", lambda c: not c.algo.dual_clip_loss, "algo.dual_clip_loss is false"),
    ("algo.reward_shift", lambda c: c.algo.reward_norm == "none", "algo.reward_norm is none"),
    ("algo.reward_scale", lambda c: c.algo.reward_norm == "none", "algo.reward_norm is none"),
    ("algo.kl_loss_coef", lambda c: not c.algo.use_kl_loss, "algo.use_kl_loss is false"),
    ("algo.kl_penalty", lambda c: not (c.algo.use_kl_loss or c.algo.add_token_level_kl),
     "algo.use_kl_loss and algo.add_token_level_kl are false"),
    ("algo.init_kl_coef", lambda c: not c.algo.add_token_level_kl, "algo.add_token_level_kl is false"),
    ("algo.target_kl", lambda c: not c.algo.add_token_level_kl, "algo.add_token_level_kl is false"),
    ("algo.kl_horizon", lambda c: c.algo.target_kl is None, "algo.target_kl is not set (fixed KL coefficient)"),
    ("algo.lambd", lambda c: c.algo.adv_estimator != "gae", "only algo.adv_estimator=gae uses lambda"),
    ("algo.batch_std_of", lambda c: c.algo.adv_norm.std_level != "batch" or c.algo.adv_estimator != "grpo",
     "it applies to algo.adv_estimator=grpo with algo.adv_norm.std_level=batch"),
    ("algo.max_sampling_rounds", lambda c: not c.algo.dynamic_sampling, "algo.dynamic_sampling is false"),
    ("algo.behav_weight_cap", lambda c: c.algo.policy_loss != "decoupled", "algo.policy_loss is not decoupled"),
    ("rollout.max_staleness", lambda c: c.rollout.mode != "async", "rollout.mode is not async (sync: 0, one_step_off: 1)"),
    ("algo.overlong_penalty_factor", lambda c: c.algo.overlong_buffer_len is None, "algo.overlong_buffer_len is not set"),
    ("algo.value_clip", _no_critic, _CRITIC),
    ("algo.value_loss_coef", _no_critic, _CRITIC),
    ("algo.critic_warmup_steps", _no_critic, _CRITIC),
    ("optim.critic_lr", _no_critic, _CRITIC),
    ("model.critic_hf_path", _no_critic, _CRITIC),
    ("model.value_head_init_std", _no_critic, _CRITIC),
    ("rollout.server_urls", lambda c: c.rollout.engine != "sglang_server", "rollout.engine is not sglang_server"),
    ("rollout.sglang", lambda c: c.rollout.engine == "embedded", "rollout.engine is embedded"),
    ("rollout.device", lambda c: c.rollout.engine != "embedded", "only the embedded engine uses it"),
    ("model.recompute_num_layers", lambda c: c.model.recompute_granularity != "full", "model.recompute_granularity is not full"),
    ("model.fp8.recipe", lambda c: c.model.fp8.format is None, "model.fp8.format is not set"),
    ("model.fp8.amax_history_len", lambda c: c.model.fp8.format is None, "model.fp8.format is not set"),
    ("model.fp8.amax_compute_algo", lambda c: c.model.fp8.format is None, "model.fp8.format is not set"),
    ("model.fp8.param_gather", lambda c: c.model.fp8.format is None, "model.fp8.format is not set"),
    ("optim.min_lr", lambda c: c.optim.lr_decay_style == "constant", "optim.lr_decay_style is constant"),
    ("optim.lr_decay_steps", lambda c: c.optim.lr_decay_style == "constant", "optim.lr_decay_style is constant"),
    ("train.eval_every", lambda c: c.data.eval_path is None, "data.eval_path is not set"),
    ("data.max_eval_samples", lambda c: c.data.eval_path is None, "data.eval_path is not set"),
)


def ignored_settings(cfg: Config) -> list[str]:
    """One message per setting that is changed from its default but has no effect."""
    out = []
    for path, ignored, why in _IGNORED:
        value = get(cfg, path)
        if value != get(_DEFAULTS, path) and ignored(cfg):
            out.append(f"{path}={value!r} is ignored: {why}")
    if cfg.algo.adv_estimator in ("gae", "rloo", "reinforce_pp"):
        levels = (cfg.algo.adv_norm.mean_level, cfg.algo.adv_norm.std_level)
        defaults = (_DEFAULTS.algo.adv_norm.mean_level, _DEFAULTS.algo.adv_norm.std_level)
        if levels not in (("none", "none"), defaults):
            out.append(
                f"algo.adv_norm levels {levels} are ignored: algo.adv_estimator={cfg.algo.adv_estimator} "
                "does not use outcome normalization"
            )
    return out


def validate(cfg: Config, world_size: Optional[int] = None) -> list[str]:
    """Raise `ConfigError` for the first problem found; log and return the warnings.
    ``world_size`` (when given) checks the TP x PP x DP layout and the batch split."""
    _check_finite(cfg)
    _check_ranges(cfg)
    _check_parallel(cfg, world_size)
    _check_algo(cfg)
    _check_lengths(cfg)
    _check_backends(cfg)
    warnings = ignored_settings(cfg) + check_megatron_passthrough(cfg)
    if uses_critic(cfg) and cfg.algo.critic_warmup_steps >= cfg.train.steps:
        warnings.append(
            f"algo.critic_warmup_steps={cfg.algo.critic_warmup_steps} >= train.steps={cfg.train.steps}: "
            "the actor is never trained (every step only warms up the critic)"
        )
    for message in warnings:
        log.warning(message)
    return warnings
