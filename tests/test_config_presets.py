"""Presets expand to knob values underneath the recipe and the command line."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from megappo.config import PRESET_SUMMARIES, PRESETS, load_config, uses_critic
from megappo.config.schema import Preset
from megappo.config.validate import get

GROUP_OVERRIDES = ["rollout.num_return_sequences_in_group=4"]


def test_presets_cover_the_schema_literal() -> None:
    names = set(typing.get_args(Preset))
    assert set(PRESETS) == names - {"none"}
    assert set(PRESET_SUMMARIES) == names


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_expands_to_its_values(name: str) -> None:
    cfg = load_config(overrides=[f"algo.preset={name}", *GROUP_OVERRIDES])
    assert cfg.algo.preset == name
    for path, value in PRESETS[name].items():
        assert get(cfg, path) == value, path


def test_named_algorithms() -> None:
    lite = load_config(overrides=["algo.preset=liteppo", *GROUP_OVERRIDES]).algo
    assert (lite.adv_estimator, lite.adv_norm.mean_level, lite.adv_norm.std_level) == ("grpo", "group", "batch")
    assert (lite.batch_std_of, lite.loss_agg_mode, lite.use_kl_loss) == ("raw", "token-mean", False)
    grpo = load_config(overrides=["algo.preset=grpo", *GROUP_OVERRIDES]).algo
    assert (grpo.adv_norm.std_level, grpo.loss_agg_mode, grpo.kl_penalty) == ("group", "seq-mean-token-mean", "low_var_kl")
    assert grpo.use_kl_loss and grpo.kl_loss_coef == 0.001
    dr = load_config(overrides=["algo.preset=dr_grpo", *GROUP_OVERRIDES]).algo
    assert (dr.adv_norm.std_level, dr.loss_agg_mode) == ("none", "seq-mean-token-sum-norm")
    rpp = load_config(overrides=["algo.preset=reinforce_pp_baseline", *GROUP_OVERRIDES]).algo
    assert rpp.add_token_level_kl and rpp.init_kl_coef == 0.001
    assert not rpp.whiten_advantages  # the estimator already whitens globally


def test_uses_critic_only_for_gae() -> None:
    assert uses_critic(load_config(overrides=["algo.preset=ppo"]))
    for name in ("grpo", "liteppo", "dr_grpo", "reinforce_pp_baseline"):
        assert not uses_critic(load_config(overrides=[f"algo.preset={name}", *GROUP_OVERRIDES]))


def test_none_preset_expands_nothing() -> None:
    assert load_config(overrides=["algo.preset=none", *GROUP_OVERRIDES]).algo.loss_agg_mode == "token-mean"


def test_recipe_and_command_line_beat_the_preset(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "algo:\n  preset: grpo\n  use_kl_loss: false\n  adv_norm: {std_level: batch}\n"
        "rollout: {num_return_sequences_in_group: 4}\n"
    )
    cfg = load_config(recipe, ["algo.loss_agg_mode=token-mean"])
    assert cfg.algo.use_kl_loss is False  # recipe beats preset
    assert cfg.algo.adv_norm.std_level == "batch"  # nested recipe key beats preset
    assert cfg.algo.adv_norm.mean_level == "group"  # preset fills the rest of the section
    assert cfg.algo.loss_agg_mode == "token-mean"  # command line beats preset
    assert cfg.algo.kl_penalty == "low_var_kl"  # untouched preset value


def test_command_line_preset_replaces_recipe_preset(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("algo: {preset: grpo}\nrollout: {num_return_sequences_in_group: 4}\n")
    cfg = load_config(recipe, ["algo.preset=liteppo"])
    assert cfg.algo.preset == "liteppo"
    assert cfg.algo.adv_norm.std_level == "batch" and cfg.algo.use_kl_loss is False


def test_unknown_preset_lists_the_presets() -> None:
    with pytest.raises(ValueError, match="'liteppo'"):
        load_config(overrides=["algo.preset=lite_ppo"])
