"""``model.fp8`` -> Megatron's FP8 fields (``builder.fp8_fields`` / ``ddp_fp8_fields``):
every format x recipe x param_gather, checked against the fields and the allowed values of
megatron-core's own ``TransformerConfig`` and ``DistributedDataParallelConfig`` (imports
Megatron's config dataclasses; no process group, no GPU)."""

from __future__ import annotations

import dataclasses
import itertools
import typing
import warnings

import pytest
import torch

from megappo.config import config_from_dict
from megappo.config.schema import FP8Config
from megappo.models.builder import BuildOptions, ddp_fp8_fields, fp8_fields
from megappo.models.factory import build_options
from megappo.parallel.state import ParallelLayout

FORMATS = typing.get_args(typing.get_type_hints(FP8Config)["format"])[0].__args__
RECIPES = typing.get_args(typing.get_type_hints(FP8Config)["recipe"])

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig


def _megatron_choices(cls, name: str) -> set:
    """The Literal values a Megatron config field accepts (Optional[...] unwrapped)."""
    hint = {f.name: f.type for f in dataclasses.fields(cls)}[name]
    args = typing.get_args(hint)
    lit = next((a for a in args if typing.get_origin(a) is typing.Literal), hint)
    return set(typing.get_args(lit))


def test_the_config_schema_offers_only_what_megatron_accepts():
    assert set(FORMATS) == {"e4m3", "hybrid"} == _megatron_choices(TransformerConfig, "fp8")
    assert set(RECIPES) == {"delayed", "tensorwise", "blockwise", "mxfp8"}
    assert set(RECIPES) <= _megatron_choices(TransformerConfig, "fp8_recipe")
    algos = typing.get_args(typing.get_type_hints(FP8Config)["amax_compute_algo"])
    assert set(algos) == _megatron_choices(TransformerConfig, "fp8_amax_compute_algo")


def _layout() -> ParallelLayout:
    return ParallelLayout(rank=0, world_size=1, local_rank=0, tp=1, pp=1, dp=1, tp_rank=0, pp_rank=0, dp_rank=0,
                          vpp=None, device=torch.device("cuda", 0))


@pytest.mark.parametrize("fmt, recipe, param_gather", list(itertools.product(FORMATS, RECIPES, (False, True))))
def test_fp8_fields_are_megatrons_for_every_format_and_recipe(fmt, recipe, param_gather):
    cfg = config_from_dict({
        "model": {"fp8": {"format": fmt, "recipe": recipe, "amax_history_len": 16, "amax_compute_algo": "max",
                          "param_gather": param_gather}},
        "parallel": {"device": "cuda", "use_distributed_optimizer": True},
    })
    opts = build_options(cfg, _layout())
    fields = fp8_fields(opts)
    want = {"fp8": fmt, "fp8_recipe": recipe, "fp8_param": param_gather}
    if recipe == "delayed":  # the amax history belongs to delayed scaling only
        want.update(fp8_amax_history_len=16, fp8_amax_compute_algo="max")
    assert fields == want
    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True, **fields)
    for name, value in want.items():
        assert getattr(config, name) == value, name

    ddp = ddp_fp8_fields(bool(config.fp8 and config.fp8_param), use_distributed_optimizer=True)
    assert ddp == ({"fp8_param_gather": True} if param_gather else {})
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=True, **ddp)
    assert ddp_config.fp8_param_gather is param_gather


def test_no_fp8_gives_no_fields_and_param_gather_needs_the_distributed_optimizer():
    assert fp8_fields(BuildOptions()) == {}
    assert ddp_fp8_fields(False, use_distributed_optimizer=False) == {}
    with pytest.raises(ValueError, match="param_gather=true needs parallel.use_distributed_optimizer=true"):
        ddp_fp8_fields(True, use_distributed_optimizer=False)
