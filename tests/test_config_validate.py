"""Validation: parallel layout, model shape, ranges, combinations, ignored settings."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from hf_fixtures import tiny_hf_config
from megappo.config import ConfigError, check_runnable, data_parallel_size, load_config

GRPO = ["algo.preset=grpo", "rollout.num_return_sequences_in_group=4"]

# The schema's defaults (adv_estimator grpo, group mean and std) need groups of at least two
# responses; the default group size is 8. The tests pin 2 so that their expected values
# (response counts, batch splits) do not move with that default.
N2 = "rollout.num_return_sequences_in_group=2"


def load(path=None, overrides=(), **kwargs):
    """`load_config` with two responses per prompt (overridable by later overrides)."""
    return load_config(path, [N2, *overrides], **kwargs)



def hf_dir(tmp_path: Path, heads: int = 12, kv_heads: int = 4, layers: int = 6, **extra) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    config = tiny_hf_config("llama", heads=heads, kv_heads=kv_heads, layers=layers, hidden=heads * 16,
                            **{"max_position_embeddings": 4096, **extra})
    config = {k: v for k, v in config.items() if v is not None}  # None: leave the key out
    (model / "config.json").write_text(json.dumps(config))
    return model


def test_world_size_layout() -> None:
    cfg = load(overrides=["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"], world_size=8)
    assert data_parallel_size(cfg, 8) == 2
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible by .*2 x 2 = 4"):
        load(overrides=["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"], world_size=6)


def test_batch_must_split_over_data_parallel_ranks() -> None:
    # Bug 8: the prompt loader gives each DP rank an equal share of the prompts, so 3 prompts
    # at DP 2 fail even though their 3 x 2 = 6 responses would split.
    with pytest.raises(ConfigError, match=r"train.rollout_batch_size=3 prompts do not split over data-parallel size 2"):
        load(overrides=["train.rollout_batch_size=3"], world_size=2)
    with pytest.raises(ConfigError, match=r"rollout_batch_size=4 prompts do not split over data-parallel size 3 \(world size 12 / \(TP 2 x PP 2\)\)"):
        load(overrides=["train.rollout_batch_size=4"] + [f"parallel.{k}_model_parallel_size=2" for k in ("tensor", "pipeline")],
             world_size=12)
    load(overrides=["train.rollout_batch_size=4"], world_size=2)
    with pytest.raises(ConfigError, match=r"train.mini_batch_size x .* = 1 x 1 = 1 responses do not split over data-parallel size 2"):
        load(overrides=["train.rollout_batch_size=4", "train.mini_batch_size=1", "algo.preset=ppo", N1], world_size=2)
    with pytest.raises(ConfigError, match="train.mini_batch_size=5 does not divide train.rollout_batch_size=32"):
        load(overrides=["train.mini_batch_size=5"])


def test_tp_must_divide_heads_and_kv_heads(tmp_path: Path) -> None:
    model = hf_dir(tmp_path, heads=12, kv_heads=4, layers=6)
    with pytest.raises(ConfigError, match=r"tensor_model_parallel_size=8 does not divide num_attention_heads=12"):
        load(overrides=[f"model.hf_path={model}", "parallel.tensor_model_parallel_size=8"])
    with pytest.raises(ConfigError, match=r"tensor_model_parallel_size=3 does not divide num_key_value_heads=4"):
        load(overrides=[f"model.hf_path={model}", "parallel.tensor_model_parallel_size=3"])
    load(overrides=[f"model.hf_path={model}", "parallel.tensor_model_parallel_size=4"])


def test_pp_and_vpp_must_divide_layers(tmp_path: Path) -> None:
    model = hf_dir(tmp_path, layers=6)
    with pytest.raises(ConfigError, match=r"pipeline_model_parallel_size=4 = 4 does not divide num_hidden_layers=6"):
        load(overrides=[f"model.hf_path={model}", "parallel.pipeline_model_parallel_size=4"])
    with pytest.raises(ConfigError, match=r"virtual_pipeline_model_parallel_size=2 = 4 does not divide num_hidden_layers=6"):
        load(
            overrides=[
                f"model.hf_path={model}",
                "parallel.pipeline_model_parallel_size=2",
                "parallel.virtual_pipeline_model_parallel_size=2",
            ]
        )
    with pytest.raises(ConfigError, match="needs parallel.pipeline_model_parallel_size > 1"):
        load(overrides=["parallel.virtual_pipeline_model_parallel_size=2"])


def test_prompt_and_response_must_fit_the_model_positions(tmp_path: Path) -> None:
    model = hf_dir(tmp_path, max_position_embeddings=1024)
    fits = [f"model.hf_path={model}", "data.prompt_length=512", "rollout.response_length=512"]
    load(overrides=fits)
    needle = (
        r"data.prompt_length \+ rollout.response_length = 512 \+ 513 = 1025 exceeds "
        rf"max_position_embeddings=1024 of model.hf_path={model}"
    )
    with pytest.raises(ConfigError, match=needle):
        load(overrides=[*fits, "rollout.response_length=513"])
    with pytest.raises(ConfigError, match=r"max_position_embeddings=1024 of model.critic_hf_path="):
        load(overrides=["algo.preset=ppo", f"model.critic_hf_path={model}", "data.prompt_length=1000"])
    (tmp_path / "other").mkdir()
    no_limit = hf_dir(tmp_path / "other", max_position_embeddings=None)
    load(overrides=[f"model.hf_path={no_limit}", "data.prompt_length=100000"])  # no limit given


def test_unreadable_model_config_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    load(overrides=[f"model.hf_path={tmp_path}", "parallel.tensor_model_parallel_size=7"])


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["parallel.sequence_parallel=true"], "sequence_parallel=true needs parallel.tensor_model_parallel_size > 1"),
        (["rollout.response_length=0"], "rollout.response_length must be >= 1, got 0"),
        (["data.prompt_length=-1"], "data.prompt_length must be >= 1"),
        (["parallel.tensor_model_parallel_size=0"], "tensor_model_parallel_size must be >= 1"),
        (["algo.pg_clip=1.5"], r"algo.pg_clip must be < 1.0, got 1.5"),
        (["algo.pg_clip_high=0"], r"algo.pg_clip_high must be > 0"),
        (["algo.dual_clip_loss=true", "algo.dual_clip_c=1"], "algo.dual_clip_c must be > 1"),
        (["rollout.top_k=0"], "rollout.top_k must be -1"),
        (["rollout.temperature=0"], "rollout.temperature must be > 0"),
        (["algo.gamma=1.1"], "algo.gamma must be <= 1.0"),
        (["model.fp8.format=e4m3", "model.transformer_impl=local"], "model.fp8.format=e4m3 needs Transformer Engine"),
        (["model.fp8.format=hybrid", "parallel.device=cpu"], "FP8-capable GPU"),
        (["rollout.engine=sglang_server"], "rollout.engine=sglang_server needs rollout.server_urls"),
        (["rollout.engine=sglang", "parallel.device=cpu"], "runs SGLang in this Python, which has none"),  # .venv has no SGLang
        (["model.fp8.format=e4m3", "model.fp8.param_gather=true", "parallel.device=cuda",
          "model.transformer_impl=transformer_engine"], "needs parallel.use_distributed_optimizer=true"),
        (["algo.add_token_level_kl=true", *GRPO], "use algo.use_kl_loss instead"),
        (["algo.overlong_buffer_len=512"], "must be < rollout.response_length=512"),
        (["optim.min_lr=1e-3"], "optim.min_lr=0.001 is above optim.lr"),
        (["algo.reward_norm=batch", "algo.reward_shift=true", "algo.reward_scale=true"],
         "algo.reward_shift=true and algo.reward_scale=true are exclusive"),
        (["algo.reward_shift=true", "algo.reward_scale=true"], "are exclusive"),  # even with reward_norm none
        (["algo.preset=reinforce_pp_baseline", "algo.kl_penalty=full"],
         "algo.kl_penalty=full with algo.add_token_level_kl=true"),
        (["algo.preset=grpo", "algo.kl_penalty=full", "parallel.pipeline_model_parallel_size=2"],
         r"algo.kl_penalty=full with algo.use_kl_loss=true needs parallel.pipeline_model_parallel_size=1 \(got 2\)"),
        # the reliability keys are checked by the dry run too, not first at step N
        (["checkpoint.keep_last_hf=-1"], "checkpoint.keep_last_hf must be >= 0, got -1"),
        (["reward.batch_timeout_s=-5"], "reward.batch_timeout_s must be >= 0"),
        (["reward.max_failed_fraction=1.5"], "reward.max_failed_fraction must be <= 1.0, got 1.5"),
        (["reward.max_failed_fraction=-0.1"], "reward.max_failed_fraction must be >= 0"),
        (["reward.max_failed_batches=0"], "reward.max_failed_batches must be >= 1, got 0"),
        (["checkpoint.resume=never", "checkpoint.resume_from=3"],
         "checkpoint.resume=never contradicts checkpoint.resume_from='3'"),
    ],
)
def test_invalid_combinations(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load(overrides=overrides)


N1 = "rollout.num_return_sequences_in_group=1"


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ([N1, "algo.preset=grpo"], "algo.adv_norm.mean_level=group and algo.adv_norm.std_level=group with rollout.num_return_sequences_in_group=1"),
        ([N1, "algo.preset=liteppo"], "algo.adv_norm.mean_level=group with rollout.num_return_sequences_in_group=1"),
        ([N1, "algo.preset=reinforce_pp_baseline"], "needs rollout.num_return_sequences_in_group >= 2"),
        ([N1, "algo.adv_estimator=rloo"], "needs rollout.num_return_sequences_in_group >= 2"),
        ([N1, "algo.preset=ppo", "algo.reward_norm=group"], "algo.reward_norm=group needs"),
        ([N1, "algo.preset=ppo", "algo.dynamic_sampling=true"], "dynamic_sampling"),
    ],
)
def test_group_statistics_need_groups(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load(overrides=overrides)


def test_valid_combinations_pass() -> None:
    load(overrides=["algo.preset=ppo", N1])  # gae with one response per prompt
    load(overrides=["algo.preset=grpo", "rollout.num_return_sequences_in_group=2", "algo.kl_penalty=full"])
    load(overrides=["algo.adv_estimator=grpo", "algo.adv_norm.mean_level=batch", "algo.adv_norm.std_level=batch"])
    load(overrides=["rollout.engine=sglang_server", "rollout.server_urls=[http://h:30000]"])
    load(overrides=["algo.preset=grpo", "parallel.pipeline_model_parallel_size=2"])  # k3 works with PP
    load(overrides=["algo.preset=ppo", "algo.reward_norm=running", "algo.reward_scale=true"])


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["algo.dual_clip_c=5"], "algo.dual_clip_c=5.0 is ignored: algo.dual_clip_loss is false"),
        (["algo.reward_shift=true"], "algo.reward_shift=True is ignored: algo.reward_norm is none"),
        (["algo.kl_loss_coef=0.1"], "algo.use_kl_loss is false"),
        (["algo.kl_penalty=mse"], "algo.kl_penalty='mse' is ignored: algo.use_kl_loss and algo.add_token_level_kl are false"),
        (["algo.preset=liteppo", *GRPO[1:], "algo.value_clip=0.2"], "there is no critic"),
        (["rollout.server_urls=[http://h:1]"], "rollout.engine is not sglang_server"),
        (["train.eval_every=5"], "data.eval_path is not set"),
        (["algo.preset=ppo", "algo.adv_norm.mean_level=batch"], "does not use outcome normalization"),
    ],
)
def test_ignored_settings_warn(overrides: list[str], needle: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="megappo.config"):
        load(overrides=overrides)
    assert needle in caplog.text


def test_presets_alone_do_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="megappo.config"):
        for name in ("ppo", "grpo", "liteppo", "dr_grpo", "reinforce_pp_baseline"):
            load(overrides=[f"algo.preset={name}", "rollout.num_return_sequences_in_group=4"])
    assert caplog.text == ""


def test_check_runnable_strict_and_lenient(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = load()
    with pytest.raises(ConfigError, match="data.train_path is not set"):
        check_runnable(cfg, strict=True)
    with caplog.at_level(logging.WARNING, logger="megappo.config"):
        problems = check_runnable(cfg, strict=False)
    assert any("data.train_path is not set" in p for p in problems) and "data.train_path" in caplog.text
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1", "answer": "2"}\n')
    ready = load(overrides=[f"model.hf_path={hf_dir(tmp_path)}", f"data.train_path={data}"])
    assert check_runnable(ready, strict=True) == []
    missing = load(overrides=[f"model.hf_path={tmp_path / 'nope'}", f"data.train_path={data}"])
    with pytest.raises(ConfigError, match="is not a directory"):
        check_runnable(missing, strict=True)
