"""Loading recipes and overrides: strict keys and types, YAML traps, precedence, round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from megappo.config import (
    Config,
    ConfigError,
    ConfigFileNotFoundError,
    config_from_dict,
    config_to_dict,
    config_to_yaml,
    load_config,
)

# The schema's defaults (adv_estimator grpo, group mean and std) need groups of at least two
# responses; the default group size is 8. The tests pin 2 so that their expected values
# (response counts, batch splits) do not move with that default.
N2 = "rollout.num_return_sequences_in_group=2"


def load(path=None, overrides=(), **kwargs):
    """`load_config` with two responses per prompt (overridable by later overrides)."""
    return load_config(path, [N2, *overrides], **kwargs)



def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_without_a_recipe() -> None:
    cfg = load()
    assert cfg == dataclasses.replace(Config(), rollout=dataclasses.replace(Config().rollout, num_return_sequences_in_group=2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.steps = 3  # type: ignore[misc]


def test_recipe_values_and_float_conversion(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        train: {steps: 7, rollout_batch_size: 4}
        optim:
          lr: 1e-6          # YAML 1.1 reads this as a string; we read a float
          weight_decay: 0   # an int is fine for a float field
          adam_eps: "1e-8"  # a quoted numeric string too
        rollout: {stop_token_ids: [1, 2], sglang: {mem_fraction_static: 0.6}}
        """.replace("\n        ", "\n"),
    )
    cfg = load(path)
    assert cfg.train.steps == 7 and cfg.train.rollout_batch_size == 4
    assert cfg.optim.lr == 1e-6 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.weight_decay == 0.0 and isinstance(cfg.optim.weight_decay, float)
    assert cfg.optim.adam_eps == 1e-8
    assert cfg.rollout.stop_token_ids == [1, 2]
    assert cfg.rollout.sglang == {"mem_fraction_static": 0.6}


def test_empty_recipe_and_empty_section(tmp_path: Path) -> None:
    assert load(write(tmp_path, "")) == load()
    assert load(write(tmp_path, "algo:\n# nothing yet\n")) == load()


def test_overrides_scalars_lists_dicts_and_null() -> None:
    cfg = load(
        overrides=[
            "train.steps=3",
            "algo.adv_norm.mean_level=batch",
            "rollout.stop_token_ids=[1,2]",
            "rollout.sglang={mem_fraction_static: 0.7}",
            "rollout.sglang.tp_size=2",
            "algo.pg_clip_high=0.28",
            "data.system_prompt=Answer: think first",
            "train.run_dir=2024",
            "model.hf_path=~",
            "algo.advantage_clip=null",
        ]
    )
    assert cfg.train.steps == 3
    assert cfg.algo.adv_norm.mean_level == "batch"
    assert cfg.rollout.stop_token_ids == [1, 2]
    assert cfg.rollout.sglang == {"mem_fraction_static": 0.7, "tp_size": 2}
    assert cfg.algo.pg_clip_high == 0.28
    assert cfg.data.system_prompt == "Answer: think first"
    assert cfg.train.run_dir == "2024"
    assert cfg.model.hf_path is None and cfg.algo.advantage_clip is None


def test_dict_field_nested_key_merges_into_recipe_and_assignment_replaces(tmp_path: Path) -> None:
    path = write(tmp_path, "rollout: {sglang: {mem_fraction_static: 0.6, tp_size: 2}}\n")
    assert load(path, ["rollout.sglang.mem_fraction_static=0.7"]).rollout.sglang == {
        "mem_fraction_static": 0.7,
        "tp_size": 2,
    }
    assert load(path, ["rollout.sglang={chunked_prefill_size: 512}"]).rollout.sglang == {
        "chunked_prefill_size": 512
    }


def test_section_assignment_merges() -> None:
    cfg = load(overrides=["algo.adv_norm={std_level: batch}"])
    assert cfg.algo.adv_norm.std_level == "batch" and cfg.algo.adv_norm.mean_level == "group"


def test_command_line_beats_recipe(tmp_path: Path) -> None:
    path = write(tmp_path, "train: {steps: 7}\n")
    assert load(path, ["train.steps=9"]).train.steps == 9


@pytest.mark.parametrize(
    "override, needles",
    [
        ("algo.adv_norm.mean_levl=group", ["mean_levl", "algo.adv_norm", "did you mean 'mean_level'"]),
        ("modle.hf_path=x", ["modle", "did you mean 'model'"]),
        ("train.lr=1e-5", ["'lr'", "section 'train'", "optim.lr"]),
        ("steps=3", ["'steps'", "train.steps"]),
    ],
)
def test_unknown_override_key_names_key_section_and_suggestion(override: str, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load(overrides=[override])
    for needle in needles:
        assert needle in str(info.value)


def test_unknown_recipe_key_names_file_and_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "algo:\n  token_level_loss: true\n  pg_clp: 0.3\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert "token_level_loss" in message and "section 'algo'" in message and str(path) in message


def test_unknown_recipe_key_did_you_mean(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'pg_clip'"):
        load(write(tmp_path, "algo: {pg_clp: 0.3}\n"))


@pytest.mark.parametrize(
    "override, needles",
    [
        ("train.steps=ten", ["train.steps", "expected int", "'ten'"]),
        ("train.steps=1.5", ["train.steps", "expected int", "1.5"]),
        ("train.steps=true", ["train.steps", "expected int", "True (bool)"]),
        ("algo.use_kl_loss=1", ["algo.use_kl_loss", "expected bool"]),
        ("algo.use_kl_loss=yes", ["algo.use_kl_loss", "expected bool", "'yes'"]),
        ("optim.lr=fast", ["optim.lr", "expected float", "'fast'"]),
        ("train.mini_batch_size=x", ["train.mini_batch_size", "int | None"]),
        ("rollout.stop_token_ids=[1, a]", ["rollout.stop_token_ids[1]", "expected int"]),
        ("rollout.stop_token_ids=3", ["rollout.stop_token_ids", "list[int]"]),
        ("rollout.sglang=[1]", ["rollout.sglang", "dict[str, Any]"]),
        ("train.steps=null", ["train.steps", "got null"]),
    ],
)
def test_wrong_type_names_field_type_and_value(override: str, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load(overrides=[override])
    for needle in needles:
        assert needle in str(info.value)


def test_literal_choice_lists_allowed_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, "algo: {kl_penalty: k3}\n"))
    message = str(info.value)
    assert "algo.kl_penalty" in message and "'k3'" in message
    for allowed in ("'kl'", "'abs'", "'mse'", "'low_var_kl'", "'full'"):
        assert allowed in message
    with pytest.raises(ConfigError, match="'group', 'batch', 'none'"):
        load(overrides=["algo.adv_norm.std_level=global"])


def test_yaml_11_booleans_are_strings(tmp_path: Path) -> None:
    # `off` is a bool in YAML 1.1; here it is the string the Literal expects.
    assert load(write(tmp_path, "data: {apply_chat_template: off}\n")).data.apply_chat_template == "off"


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "train:\n  steps: 3\n  rollout_batch_size: [1, 2\nalgo: {}\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert str(path) in message and "malformed YAML" in message and "line 4" in message


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"line 3.*duplicate key 'steps'"):
        load(write(tmp_path, "train:\n  steps: 3\n  steps: 4\n"))


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigFileNotFoundError, match="config file not found") as info:
        load(missing)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)
    with pytest.raises(ConfigError, match="directory"):
        load(tmp_path)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("- a\n- b\n", "top level"),
        ("just a string\n", "top level"),
        ("algo: grpo\n", "section 'algo' must be a mapping"),
        ("algo: {adv_norm: group}\n", "section 'algo.adv_norm' must be a mapping"),
        ("1: 2\n", "not a string"),
    ],
)
def test_non_mapping_top_level_or_section(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load(write(tmp_path, text))


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.steps", "not of the form section.key=value"),
        ("train..steps=3", "malformed key"),
        ("train.steps.x=3", "not a section"),
        ("rollout.stop_token_ids=[1,", "malformed YAML"),
    ],
)
def test_malformed_overrides(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load(overrides=[override])


def test_overrides_must_be_a_sequence() -> None:
    with pytest.raises(TypeError):
        load_config(overrides="train.steps=3")


def test_yaml_and_dict_round_trip(tmp_path: Path) -> None:
    cfg = load(
        overrides=[
            "algo.preset=reinforce_pp_baseline",
            "rollout.num_return_sequences_in_group=4",
            "rollout.sglang={mem_fraction_static: 0.6}",
            "rollout.stop_token_ids=[7]",
            "data.apply_chat_template=off",
            "data.system_prompt=yes",
            "optim.lr=3e-7",
        ]
    )
    assert load_config(write(tmp_path, config_to_yaml(cfg))) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert list(config_to_dict(cfg)) == [f.name for f in dataclasses.fields(Config)]
