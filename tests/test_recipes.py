"""Every recipe in recipes/ passes --dry-run (the GPU ones also for their 8-GPU layout)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from megappo.config import load_config
from megappo.train import main

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


def test_there_are_recipes() -> None:
    assert {p.name for p in RECIPES} >= {"gsm8k_ppo.yaml", "gsm8k_grpo.yaml", "gsm8k_liteppo.yaml"}


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_dry_run(recipe: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert main(["--config", str(recipe), "--dry-run"]) == 0, capsys.readouterr().err
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["algo"]["preset"] == load_config(recipe).algo.preset


@pytest.mark.parametrize("name, preset", [("gsm8k_ppo", "ppo"), ("gsm8k_grpo", "grpo"), ("gsm8k_liteppo", "liteppo")])
def test_gsm8k_recipes_fit_one_8_gpu_node(name: str, preset: str) -> None:
    recipe = next(p for p in RECIPES if p.stem == name)
    cfg = load_config(recipe, world_size=8)
    assert cfg.algo.preset == preset
    assert (cfg.data.prompt_key, cfg.data.answer_key, cfg.rollout.engine) == ("question", "answer", "sglang")
    assert cfg.rollout.sglang == {"mem_fraction_static": 0.6}


def test_toy_moe_recipe_runs_at_ep2_with_routing_replay() -> None:
    """`python -m megappo.demo --moe`'s recipe: validated for its two processes, experts split
    over both (EP=2), routing replay on, right-padded micro-batches as replay needs."""
    from megappo.demo import MOE_RECIPE

    cfg = load_config(MOE_RECIPE, world_size=2)
    assert cfg.parallel.expert_model_parallel_size == 2
    assert cfg.algo.routing_replay is True and cfg.train.packed_sequences is False
    assert cfg.rollout.engine == "embedded" and cfg.parallel.device == "cpu"
