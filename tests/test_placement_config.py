"""Validation of a disaggregated placement (``parallel.rollout_world_size``): the messages name
the fields, the sizes and a launch that fits; every layout check uses the trainer ranks."""

from __future__ import annotations

from pathlib import Path

import pytest

from megappo.config import ConfigError, load_config
from megappo.train import main

ROOT = Path(__file__).resolve().parent.parent
BASE = ["rollout.num_return_sequences_in_group=2", "train.rollout_batch_size=12"]


def load(overrides, world_size=None):
    return load_config(None, [*BASE, *overrides], world_size=world_size)


@pytest.mark.parametrize("overrides, world, needle", [
    (["parallel.rollout_world_size=2"], 2, "parallel.rollout_world_size=2 leaves no trainer rank in a world of 2 processes; "
     "this layout needs a launch of parallel.rollout_world_size x (TP x PP + 1) = 2 x 2 = 4 processes"),
    (["parallel.rollout_world_size=1", "parallel.tensor_model_parallel_size=2"], 4,
     "the trainer world size 3 (world size 4 - parallel.rollout_world_size 1) is not divisible by "
     "parallel.tensor_model_parallel_size x parallel.pipeline_model_parallel_size = 2 x 1"),
    (["parallel.rollout_world_size=1"], 4, "parallel.rollout_world_size=1 must equal the trainer's data-parallel size 3 = "
     "(world size 4 - 1) / (TP 1 x PP 1): rollout rank i serves data-parallel replica i; this layout needs a launch of "
     "parallel.rollout_world_size x (TP x PP + 1) = 1 x 2 = 2 processes"),
    (["parallel.rollout_world_size=1", "rollout.engine=sglang_server", "rollout.server_urls=[http://x:1]"], 2,
     "parallel.rollout_world_size=1 with rollout.engine=sglang_server"),
    (["parallel.rollout_world_size=-1"], None, "parallel.rollout_world_size must be >= 0"),
    (["parallel.rollout_world_size=1", "parallel.rollout_timeout_s=0"], 2, "parallel.rollout_timeout_s must be > 0"),
    # The batch checks see the trainer's DP (2 of the 4 processes train): 12 prompts x 2 split, 3 prompts do not.
    (["parallel.rollout_world_size=2", "train.rollout_batch_size=3"], 4,
     "train.rollout_batch_size=3 prompts do not split over data-parallel size 2"),
])
def test_impossible_placements_are_named(overrides, world, needle):
    with pytest.raises(ConfigError) as err:
        load(overrides, world)
    assert needle in str(err.value)


def test_possible_placements_load():
    assert load(["parallel.rollout_world_size=1"], 2).parallel.rollout_world_size == 1
    assert load(["parallel.rollout_world_size=2", "parallel.tensor_model_parallel_size=2"], 6) is not None
    assert load(["parallel.rollout_world_size=0"], 3) is not None  # colocated: every rank trains


def test_dry_run_shows_the_split(capsys):
    recipe = str(ROOT / "recipes" / "gsm8k_liteppo_disaggregated.yaml")
    assert main(["--config", recipe, "--dry-run", "--world-size", "8"]) == 0
    assert ("world size 8 = 4 trainer ranks (TP 1 x PP 1 x DP 4) + 4 rollout ranks" in capsys.readouterr().out)
    assert main(["--config", recipe, "--dry-run", "--world-size", "6"]) == 2
    assert "this layout needs a launch of parallel.rollout_world_size x (TP x PP + 1) = 4 x 2 = 8" in capsys.readouterr().err


def test_gpu_recipes_fit_one_8_gpu_node():
    disagg = load_config(ROOT / "recipes" / "gsm8k_liteppo_disaggregated.yaml", world_size=8)
    assert (disagg.parallel.rollout_world_size, disagg.rollout.engine, disagg.rollout.mode) == (4, "sglang", "async")
    one_off = load_config(ROOT / "recipes" / "gsm8k_liteppo_one_step_off.yaml", world_size=8)
    assert (one_off.parallel.rollout_world_size, one_off.rollout.mode) == (0, "one_step_off")
