"""Megatron and SGLang options passed through as dicts (``model.megatron``, ``optim.megatron``,
``optim.ddp``, ``rollout.sglang``): checked against the upstream dataclasses at load, owned
fields refused with the key to use, and (in a child process at world size 1) a passed field
really reaching the built ``TransformerConfig``, ``OptimizerConfig`` and DDP config."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from megappo.config import ConfigError, load_config
from megappo.config.passthrough import (
    DDP,
    MEGATRON_SECTIONS,
    OPTIMIZER,
    TRANSFORMER,
    check_sglang_args,
    server_args_fields,
)
from megappo.config.reference import render_markdown

REPO_ROOT = Path(__file__).resolve().parent.parent
N2 = "rollout.num_return_sequences_in_group=2"

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer import TransformerConfig

UPSTREAM = {TRANSFORMER.path: TransformerConfig, OPTIMIZER.path: OptimizerConfig, DDP.path: DistributedDataParallelConfig}


def load(*overrides: str):
    return load_config(None, [N2, *overrides])


def test_sections_name_real_megatron_classes_and_fields() -> None:
    for section in MEGATRON_SECTIONS:
        cls = UPSTREAM[section.path]
        assert f"{cls.__module__}.{cls.__name__}" == f"{section.module}.{section.cls}"
        names = {f.name for f in dataclasses.fields(cls)}
        # Every owned or defaulted name is a real field, so no refusal or default is dead.
        assert set(section.owned) <= names, set(section.owned) - names
        assert set(section.defaults) <= names, set(section.defaults) - names
        assert not set(section.owned) & set(section.defaults)


def test_passed_fields_load_and_override_the_defaults() -> None:
    cfg = load("model.megatron.attention_dropout=0.1", "optim.ddp={grad_reduce_in_fp32: false, bucket_size: 1000}",
               "optim.megatron.decoupled_weight_decay=false", "optim.ddp.overlap_grad_reduce=true")
    assert cfg.model.megatron == {"attention_dropout": 0.1}
    assert cfg.optim.ddp == {"grad_reduce_in_fp32": False, "bucket_size": 1000, "overlap_grad_reduce": True}
    assert cfg.optim.megatron == {"decoupled_weight_decay": False}


@pytest.mark.parametrize(
    "override, needle",
    [
        ("model.megatron.atention_dropout=0.1", "unknown key 'atention_dropout' in model.megatron: TransformerConfig "
                                                "(megatron-core) has no such field; did you mean 'attention_dropout'"),
        ("optim.ddp.bucket_sise=10", "unknown key 'bucket_sise' in optim.ddp: DistributedDataParallelConfig "
                                     "(megatron-core) has no such field; did you mean 'bucket_size'"),
        ("optim.megatron.decoupled_weight_decai=true", "did you mean 'decoupled_weight_decay'"),
        # a DDP field given to the optimizer: the hint names the section it belongs to
        ("optim.megatron.bucket_size=10", "unknown key 'bucket_size' in optim.megatron: OptimizerConfig (megatron-core) "
                                          "has no such field; did you mean 'optim.ddp.bucket_size'"),
        ("optim.ddp.bucket_size=abc", "optim.ddp.bucket_size: expected int | None, got 'abc'"),
        ("model.megatron.apply_rope_fusion=1", "model.megatron.apply_rope_fusion: expected bool, got 1"),
        ("model.megatron.normalization=LayerNom", "model.megatron.normalization"),
    ],
)
def test_unknown_or_mistyped_fields_are_errors(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(override)
    assert needle in str(err.value)


@pytest.mark.parametrize(
    "override, our_key",
    [
        ("model.megatron.tensor_model_parallel_size=2", "use parallel.tensor_model_parallel_size"),
        ("model.megatron.bf16=true", "use model.dtype"),
        ("model.megatron.fp8=e4m3", "use model.fp8.format"),
        ("model.megatron.recompute_granularity=full", "use model.recompute_granularity"),
        ("model.megatron.hidden_size=128", "use the model's config.json (model.hf_path)"),
        ("optim.megatron.lr=0.1", "use optim.lr"),
        ("optim.megatron.clip_grad=0.5", "use optim.clip_grad"),
        ("optim.megatron.overlap_param_gather=true", "use optim.ddp.overlap_param_gather"),
        ("optim.ddp.use_distributed_optimizer=true", "use parallel.use_distributed_optimizer"),
        ("optim.ddp.fp8_param_gather=true", "use model.fp8.param_gather"),
        ("optim.ddp.average_in_collective=true", "loss_scale_factor"),
    ],
)
def test_fields_megappo_sets_are_errors_naming_our_key(override: str, our_key: str) -> None:
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"{key} is set by megappo, not passed through: ") as err:
        load(override)
    assert our_key in str(err.value)


def test_renamed_keys_name_the_new_spelling(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'model.attention_dropout' was renamed to 'model.megatron.attention_dropout'"):
        load("model.attention_dropout=0.1")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  hidden_dropout: 0.1\n")
    with pytest.raises(ConfigError, match=r"'model.hidden_dropout' was renamed to 'model.megatron.hidden_dropout'.*r.yaml"):
        load_config(recipe, [N2])


def test_docs_document_the_pass_through() -> None:
    text = render_markdown()
    assert "## Megatron and SGLang pass-through" in text
    for section in MEGATRON_SECTIONS:
        assert f"| `{section.path}` | `{section.module}.{section.cls}` |" in text
    assert "| `use_distributed_optimizer` | `optim.ddp` | parallel.use_distributed_optimizer |" in text
    assert "`grad_reduce_in_fp32=true`" in text and "`model.attention_dropout` -> `model.megatron.attention_dropout`" in text


# ---------------------------------------------------------------------- SGLang ServerArgs

FAKE_DATACLASS = '''
import dataclasses
from typing import ClassVar, Optional

@dataclasses.dataclass
class ServerArgs:
    model_path: str = ""
    mem_fraction_static: Optional[float] = None
    tp_size: int = 1
    _registry: ClassVar[dict] = {}
'''

# SGLang 0.5.21+ assembles ServerArgs with msgspec.defstruct; a class with the same
# ``__struct_fields__`` attribute stands in for it (msgspec is not a dependency here).
FAKE_STRUCT = '''
class ServerArgs:
    __struct_fields__ = ("model_path", "mem_fraction_static", "tp_size")
'''


def _install_fake_sglang(root: Path, source: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    srt = root / "sglang" / "srt"
    srt.mkdir(parents=True)
    (srt.parent / "__init__.py").write_text("")
    (srt / "__init__.py").write_text("")
    (srt / "server_args.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(root))
    for name in [m for m in sys.modules if m == "sglang" or m.startswith("sglang.")]:
        monkeypatch.delitem(sys.modules, name)
    return srt / "server_args.py"


@pytest.fixture
def fake_sglang(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Install an ``sglang`` whose ``ServerArgs`` has three fields: ``fake_sglang(source)``."""
    yield lambda source: _install_fake_sglang(tmp_path / f"site{len(list(tmp_path.iterdir()))}", source, monkeypatch)
    for name in [m for m in sys.modules if m == "sglang" or m.startswith("sglang.")]:
        del sys.modules[name]  # the fake's modules; monkeypatch puts back any real ones


@pytest.mark.parametrize("source", [FAKE_DATACLASS, FAKE_STRUCT], ids=["dataclass", "msgspec-struct"])
def test_sglang_keys_are_checked_against_server_args_fields(fake_sglang, source) -> None:
    path = fake_sglang(source)
    fields, where = server_args_fields()
    assert fields == {"model_path", "mem_fraction_static", "tp_size"} and str(path) in where
    assert check_sglang_args({"mem_fraction_static": 0.6, "tp_size": 2}) == []
    with pytest.raises(ConfigError, match=r"unknown key 'mem_fraction_statc' in rollout.sglang: SGLang's ServerArgs "
                                          r"\(.*\) has no such field; did you mean 'mem_fraction_static'"):
        check_sglang_args({"mem_fraction_statc": 0.6})


def test_an_sglang_that_cannot_import_is_a_warning(fake_sglang) -> None:
    fake_sglang("import no_such_dependency_of_sglang\n")
    (warning,) = check_sglang_args({"tp_size": 2})
    assert "were not checked against SGLang's ServerArgs: importing sglang.srt.server_args failed (ModuleNotFoundError" in warning


def test_real_sglang_server_args_when_installed() -> None:
    fields, where = server_args_fields()
    if fields is None:
        pytest.skip(f"SGLang's ServerArgs is not readable here ({where})")
    assert {"mem_fraction_static", "tp_size", "attention_backend", "model_path"} <= fields, where


def test_sglang_keys_without_sglang_are_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sglang" else real_find_spec(name, *a))
    (warning,) = check_sglang_args({"mem_fraction_statc": 0.6})
    assert warning == ("rollout.sglang keys ['mem_fraction_statc'] were not checked against SGLang's ServerArgs: "
                       "SGLang is not installed here")
    assert check_sglang_args({}) == []


# ---------------------------------------------------------------------- into the built model (child process)

HF = dict(
    model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False, max_position_embeddings=256,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("passthrough") / "built.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "CUDA_VISIBLE_DEVICES": ""}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, __file__, "--out", str(out)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"child failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    return json.loads(out.read_text())


@pytest.mark.slow
def test_passed_fields_reach_the_built_megatron_configs(built: dict) -> None:
    passed, default = built["passed"], built["default"]
    # model.megatron -> TransformerConfig, over megappo's defaults (which the plain build keeps)
    assert passed["transformer"] == {"attention_dropout": 0.25, "hidden_dropout": 0.125, "apply_rope_fusion": False,
                                     "attention_softmax_in_fp32": False, "init_method_std": 0.02}
    assert default["transformer"]["attention_dropout"] == 0.0 and default["transformer"]["attention_softmax_in_fp32"] is True
    # optim.megatron -> OptimizerConfig, our keys beside it
    assert passed["optimizer"] == {"decoupled_weight_decay": False, "log_num_zeros_in_grad": True, "lr": 3e-4,
                                   "overlap_param_gather": False}
    assert default["optimizer"]["decoupled_weight_decay"] is True and default["optimizer"]["log_num_zeros_in_grad"] is False
    # optim.ddp -> DistributedDataParallelConfig (the four the issue names are settable)
    assert passed["ddp"] == {"grad_reduce_in_fp32": False, "overlap_grad_reduce": True, "bucket_size": 4096,
                             "check_for_nan_in_grad": True, "overlap_param_gather": False}
    assert default["ddp"]["grad_reduce_in_fp32"] is True and default["ddp"]["overlap_grad_reduce"] is False
    assert default["ddp"]["bucket_size"] != 4096
    assert passed["no_sync_func_set"] and not default["no_sync_func_set"]  # overlap_grad_reduce is acted on
    assert built["owned_error"].startswith("model.megatron.bf16 is set by megappo")


@pytest.mark.slow
def test_a_step_with_the_passed_ddp_options_equals_the_default_step(built: dict) -> None:
    step = built["step"]
    assert step["grad_norm"] > 1e-3  # a real gradient
    assert step["loss_diff"] < 1e-6 and step["grad_norm_diff"] < 1e-5 and step["param_diff"] < 1e-6, step


def _child(out_path: str) -> None:
    import torch

    from megappo.config import config_from_dict
    from megappo.models import BuildOptions, ModelSpec, TokenBatch, build_policy
    from megappo.models.builder import transformer_config
    from megappo.parallel import init_parallel

    layout = init_parallel(1, 1, seed=5, device="cpu")
    torch.set_num_threads(1)
    spec = ModelSpec.from_hf_config(HF)
    base = {"optim": {"lr": 3e-4}, "rollout": {"num_return_sequences_in_group": 2}}
    passed_cfg = config_from_dict({
        "model": {"megatron": {"attention_dropout": 0.25, "hidden_dropout": 0.125, "attention_softmax_in_fp32": False}},
        "optim": {"lr": 3e-4, "megatron": {"decoupled_weight_decay": False, "log_num_zeros_in_grad": True},
                  "ddp": {"grad_reduce_in_fp32": False, "overlap_grad_reduce": True, "bucket_size": 4096,
                          "check_for_nan_in_grad": True}},
    })

    def read(cfg) -> dict:
        policy = build_policy(cfg, spec, "actor", layout)
        tc = policy.models[0].config
        opt = policy.optimizer
        oc = getattr(opt, "config", None) or opt.chained_optimizers[0].config
        ddp = policy.chunks[0].ddp_config
        return {
            "transformer": {k: getattr(tc, k) for k in ("attention_dropout", "hidden_dropout", "apply_rope_fusion",
                                                        "attention_softmax_in_fp32", "init_method_std")},
            "optimizer": {k: getattr(oc, k) for k in ("decoupled_weight_decay", "log_num_zeros_in_grad", "lr",
                                                      "overlap_param_gather")},
            "ddp": {k: getattr(ddp, k) for k in ("grad_reduce_in_fp32", "overlap_grad_reduce", "bucket_size",
                                                 "check_for_nan_in_grad", "overlap_param_gather")},
            "no_sync_func_set": tc.no_sync_func is not None,
        }

    result = {"passed": read(passed_cfg), "default": read(config_from_dict(base))}

    # The settable DDP options train: one step with overlap_grad_reduce on, gradients reduced in
    # the parameters' dtype, small buckets and NaN checks equals the same step with megappo's defaults (DP 1, same weights).
    ddp_only = config_from_dict({"optim": {"lr": 3e-4, "megatron": dict(passed_cfg.optim.megatron), "ddp": dict(passed_cfg.optim.ddp)}})
    policies = [build_policy(cfg, spec, "actor", layout) for cfg in (ddp_only, config_from_dict(base))]
    policies[1].models[0].load_state_dict(policies[0].models[0].state_dict())
    g = torch.Generator().manual_seed(3)
    batch = TokenBatch(torch.randint(0, HF["vocab_size"], (4, 20), generator=g), torch.tensor([3, 5, 2, 4]),
                       torch.tensor([10, 6, 12, 8]))
    mask = batch.response_mask_BT
    tokens = float(mask.sum())

    def loss_fn(out, rows):
        return -(out["logprobs_BT"] * mask[rows]).sum() / tokens, {}

    steps = [p.train_step(batch, loss_fn, entropy_grad=False) for p in policies]
    params = [torch.cat([q.detach().flatten() for q in p.models[0].parameters()]) for p in policies]
    result["step"] = {
        "loss_diff": abs(steps[0]["loss"] - steps[1]["loss"]),
        "grad_norm_diff": abs(steps[0]["grad_norm"] - steps[1]["grad_norm"]),
        "grad_norm": steps[1]["grad_norm"],
        "param_diff": float((params[0] - params[1]).abs().max()),
    }
    try:
        transformer_config(spec, BuildOptions(megatron={"bf16": True}))
        result["owned_error"] = "no error"
    except ValueError as error:
        result["owned_error"] = str(error)
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    _child(parser.parse_args().out)


def test_checking_rollout_sglang_leaves_sglang_unimported_for_the_cpu_switch(tmp_path: Path) -> None:
    """In the CPU SGLang environment (real SGLang): loading and checking a config with a
    non-empty ``rollout.sglang`` must not import SGLang into the trainer's process, because
    on CPU the engine has to set SGLang's switch before the first import
    (``megappo.parallel.sglang_cpu.apply`` refuses afterwards). An unknown key is still an error."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from sglang_env import SKIP_REASON, sglang_env, sglang_python

    python = sglang_python()
    if python is None:
        pytest.skip(SKIP_REASON)
    script = textwrap.dedent("""
        import sys
        from megappo.config import ConfigError
        from megappo.config.passthrough import check_sglang_args
        assert check_sglang_args({"max_running_requests": 8, "mem_fraction_static": 0.5}) == []
        try:
            check_sglang_args({"max_running_request": 8})
        except ConfigError as error:
            print("ERROR", error)
        assert "sglang" not in sys.modules, "checking rollout.sglang imported SGLang"
        from megappo.parallel import sglang_cpu
        sglang_cpu.apply()
        import sglang.srt.utils
        print("CPU", sglang.srt.utils.is_cpu())
    """)
    env = {k: v for k, v in sglang_env().items() if k != "SGLANG_USE_CPU_ENGINE"}
    proc = subprocess.run([str(python), "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "ERROR unknown key 'max_running_request' in rollout.sglang" in proc.stdout and "'max_running_requests'" in proc.stdout
    assert "CPU True" in proc.stdout
