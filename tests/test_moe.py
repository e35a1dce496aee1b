"""Mixture-of-experts families without processes: the HF config read into ``ModelSpec``,
unsupported variants named, the Megatron MoE config for the local and the Transformer
Engine spec, the mapping table per expert-parallel rank, and the layout validation.

The numerics (against transformers and one rank) are in ``test_moe_parallel.py``.
"""

from __future__ import annotations

import pytest
import torch

from hf_fixtures import tiny_hf_config
from megappo.models.builder import BuildOptions, moe_fields, transformer_config
from megappo.models.spec import ModelSpec
from megappo.parallel.state import check_expert_parallel
from megappo.weights.base import Placement, hf_to_megatron_state, megatron_to_hf_state, plan, table_for


def spec_of(family: str, **extra) -> ModelSpec:
    return ModelSpec.from_hf_config(tiny_hf_config(family, layers=4, **extra))


def test_qwen3_moe_spec_reads_experts_and_dense_layers():
    s = spec_of("qwen3_moe", mlp_only_layers=[0], decoder_sparse_step=1)
    assert (s.num_experts, s.moe_topk, s.moe_ffn_hidden_size, s.moe_norm_topk_prob) == (4, 2, 48, True)
    assert s.moe_layers == (1, 2, 3) and s.qk_norm and s.is_moe
    assert spec_of("qwen3_moe", decoder_sparse_step=2).moe_layers == (1, 3)  # (i + 1) % step == 0, as transformers
    # transformers 5 writes Qwen3-MoE's num_experts as num_local_experts
    cfg = tiny_hf_config("qwen3_moe")
    cfg["num_local_experts"] = cfg.pop("num_experts")
    assert ModelSpec.from_hf_config(cfg).num_experts == 4


def test_mixtral_spec_routes_every_layer_with_renormalised_topk():
    s = spec_of("mixtral")
    assert s.moe_layers == (0, 1, 2, 3) and s.moe_ffn_hidden_size == 96 and s.moe_norm_topk_prob
    assert s.router_aux_loss_coef == 0.02 and not s.qk_norm


@pytest.mark.parametrize(
    "family, extra, field",
    [
        ("qwen3_moe", dict(shared_expert_intermediate_size=32), "shared_expert_intermediate_size"),
        ("mixtral", dict(router_jitter_noise=0.1), "router_jitter_noise"),
        ("mixtral", dict(num_local_experts=None), "num_local_experts"),
        ("qwen3_moe", dict(num_experts_per_tok=8), "num_experts_per_tok"),
        ("qwen3", dict(num_experts=4), "mixture-of-experts settings"),
    ],
)
def test_unsupported_moe_variants_name_the_field(family, extra, field):
    with pytest.raises(ValueError, match=field):
        spec_of(family, **extra)


def test_qwen2_moe_reads_its_gated_shared_expert_and_needs_it():
    s = spec_of("qwen2_moe")
    assert (s.moe_shared_expert_ffn, s.qkv_bias, s.moe_norm_topk_prob) == (96, True, False)
    f = moe_fields(s, BuildOptions())
    assert f["moe_shared_expert_intermediate_size"] == 96 and f["moe_shared_expert_gate"] is True
    assert f["moe_router_pre_softmax"] is True  # norm_topk_prob=false: the full softmax's top-k
    with pytest.raises(ValueError, match="shared_expert_intermediate_size missing or 0"):
        spec_of("qwen2_moe", shared_expert_intermediate_size=0)
    cfg = tiny_hf_config("qwen3_moe")
    cfg["model_type"] = "deepseek_v3"
    with pytest.raises(ValueError, match="deepseek_v3.*mixture-of-experts"):
        ModelSpec.from_hf_config(cfg)


def test_megatron_moe_config_follows_the_family():
    q = moe_fields(spec_of("qwen3_moe", mlp_only_layers=[2]), BuildOptions())
    assert q["moe_layer_freq"] == [1, 1, 0, 1] and q["moe_router_topk"] == 2 and q["moe_ffn_hidden_size"] == 48
    assert q["moe_router_pre_softmax"] is False  # norm_topk_prob: softmax over the top-k logits
    assert q["moe_expert_capacity_factor"] is None  # dropless
    assert (q["moe_aux_loss_coeff"], q["moe_router_load_balancing_type"]) == (0.001, "aux_loss")
    assert q["moe_grouped_gemm"] is False  # SequentialMLP on the local spec
    no_norm = moe_fields(spec_of("qwen3_moe", norm_topk_prob=False), BuildOptions(moe_aux_loss_coeff=0.0, moe_z_loss_coeff=1e-3))
    assert no_norm["moe_router_pre_softmax"] is True and no_norm["moe_router_load_balancing_type"] == "none"
    assert no_norm["moe_z_loss_coeff"] == 1e-3
    te = moe_fields(spec_of("mixtral"), BuildOptions(transformer_impl="transformer_engine", ep=4))
    assert te["moe_grouped_gemm"] is True and te["expert_model_parallel_size"] == 4  # TEGroupedMLP
    assert moe_fields(spec_of("qwen3"), BuildOptions()) == {}


def test_transformer_config_builds_for_moe_and_model_megatron_overrides():
    cfg = transformer_config(spec_of("mixtral"), BuildOptions(megatron={"moe_router_dtype": "fp32"}))
    assert cfg.num_moe_experts == 4 and cfg.moe_router_topk == 2 and cfg.moe_router_dtype == "fp32"
    assert cfg.moe_token_dispatcher_type == "alltoall"


def test_plan_gives_each_ep_rank_its_experts_under_local_numbers():
    spec = spec_of("mixtral")
    for rank, experts in ((0, (0, 1)), (1, (2, 3))):
        entries = [e for e in plan(table_for(spec), spec, Placement(ep=2, ep_rank=rank)) if e.expert is not None and e.layer == 0]
        assert sorted({e.expert for e in entries}) == list(experts)
        fc1 = [e for e in entries if "linear_fc1" in e.megatron]
        assert [e.megatron for e in fc1] == [f"decoder.layers.0.mlp.experts.local_experts.{i}.linear_fc1.weight" for i in (0, 1)]
        assert fc1[0].hf == (f"model.layers.0.block_sparse_moe.experts.{experts[0]}.w1.weight",
                             f"model.layers.0.block_sparse_moe.experts.{experts[0]}.w3.weight")
    te = {e.megatron for e in plan(table_for(spec), spec, Placement(), transformer_impl="transformer_engine")}
    assert "decoder.layers.0.mlp.experts.linear_fc1.weight3" in te and "decoder.layers.0.pre_mlp_layernorm.weight" in te


def test_dense_layer_of_qwen3_moe_uses_the_dense_rules():
    spec = spec_of("qwen3_moe", mlp_only_layers=[1])
    names = {e.megatron for e in plan(table_for(spec), spec, Placement()) if e.layer == 1}
    assert "decoder.layers.1.mlp.linear_fc1.weight" in names and not any("router" in n for n in names)


def _random_hf_state(spec: ModelSpec) -> dict:
    from megappo.weights.validate import expected_hf_shapes

    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(shape, generator=g) for n, shape in expected_hf_shapes(table_for(spec), spec).items()}


@pytest.mark.parametrize("family", ("qwen3_moe", "mixtral", "qwen2_moe"))
def test_hf_to_megatron_to_hf_is_bit_exact_over_tp2_ep2_shards(family):
    spec = spec_of(family, mlp_only_layers=[3]) if family == "qwen3_moe" else spec_of(family)
    hf = _random_hf_state(spec)
    back = {}
    for ep_rank in (0, 1):
        shards = [hf_to_megatron_state(hf, spec, Placement(tp=2, tp_rank=r, ep=2, ep_rank=ep_rank)) for r in (0, 1)]
        assert all(s.shape[0] == spec.moe_ffn_hidden_size for k, s in shards[0].items() if k.endswith("linear_fc1.weight") and "local_experts" in k)
        back.update(megatron_to_hf_state(shards, spec, Placement(tp=2, ep=2, ep_rank=ep_rank)))
    assert sorted(back) == sorted(hf)
    assert all(torch.equal(back[k], hf[k]) for k in hf)


def test_expert_parallel_sizes_that_do_not_divide_are_named():
    with pytest.raises(ValueError, match="expert_model_parallel_size 3 does not divide the number of experts 4"):
        spec_of("mixtral").check_parallel(1, 1, None, 3)
    with pytest.raises(ValueError, match="needs a mixture-of-experts model"):
        spec_of("qwen3").check_parallel(1, 1, None, 2)
    with pytest.raises(ValueError, match="expert_model_parallel_size 2 does not divide the data-parallel size 1"):
        check_expert_parallel(world=2, tp=2, pp=1, ep=2)
    check_expert_parallel(world=4, tp=2, pp=1, ep=2)


@pytest.mark.parametrize("family", ("qwen3_moe", "mixtral", "qwen2_moe"))
def test_per_expert_tensors_load_into_transformers_fused_experts(tmp_path, family):
    """What the embedded engine needs: the streamed per-expert tensors written through
    ``fused_expert_views`` give exactly the model ``from_pretrained`` builds."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_fixtures import make_tiny_hf_model, read_hf_state
    from megappo.weights.moe import fused_expert_views

    d = make_tiny_hf_model(tmp_path, family, layers=2, **({"mlp_only_layers": [1]} if family == "qwen3_moe" else {}))
    reference = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(d), dtype=torch.float32)
    state = model.state_dict(keep_vars=True)
    targets = {**state, **fused_expert_views(state, ModelSpec.from_hf_dir(d))}
    with torch.no_grad():
        for name, tensor in read_hf_state(d).items():
            targets[name].copy_(tensor)
    ref = reference.state_dict()
    assert all(torch.equal(t, ref[n]) for n, t in model.state_dict().items())


@pytest.mark.parametrize("family, module", (("qwen3_moe", "qwen3_moe.py"), ("mixtral", "mixtral.py"), ("qwen2_moe", "qwen2_moe.py")))
def test_streamed_expert_names_are_the_ones_sglang_loads(family, module):
    """The contract on SGLang's source, 0.5.18 and 0.5.23 (the real 0.5.23 engine takes a tiny
    Qwen3-MoE's streamed names for real: tests/test_rollout_sglang_moe_real.py): the checkpoint names its ``load_weights`` maps
    into ``FusedMoE`` (``experts.{id}.{gate|up|down}.`` from ``make_expert_params_mapping``)
    and its router module must match what weight sync streams."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    found = sorted(root.glob(f".venv-sglang/lib/python*/site-packages/sglang/srt/models/{module}"))  # 0.5.23
    found += sorted(root.glob(f".venv/sglang-0.5.18/sglang/srt/models/{module}"))  # the oldest supported
    if not found:
        pytest.skip("no SGLang environment (make sglang-env)")
    spec = spec_of(family)
    names = {n for e in plan(table_for(spec), spec, Placement()) if e.expert == 3 and e.layer == 0 for n in e.hf}
    block = "block_sparse_moe" if family == "mixtral" else "mlp"
    router = [e.hf[0] for e in plan(table_for(spec), spec, Placement()) if e.rule.megatron == "mlp.router.weight" and e.layer == 0]
    assert router == [f"model.layers.0.{block}.gate.weight"]
    for path in found:
        src = path.read_text()
        m = re.search(r'make_expert_params_mapping\(\s*ckpt_gate_proj_name="(\w+)",\s*ckpt_down_proj_name="(\w+)",\s*ckpt_up_proj_name="(\w+)"', src)
        assert m, f"{path}: no make_expert_params_mapping call"
        gate, down, up = m.groups()
        assert names == {f"model.layers.0.{block}.experts.3.{w}.weight" for w in (gate, up, down)}, path
        assert re.search(rf'add_prefix\("{block}"|self\.{block} =', src) and re.search(r'self\.gate = ', src), path


def _teacher_forced(model, prompt, response) -> torch.Tensor:
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    return lp[torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1), torch.tensor(response)]


@pytest.mark.parametrize("family", ("qwen3_moe", "mixtral", "qwen2_moe"))
def test_embedded_engine_takes_streamed_per_expert_weights(tmp_path, family):
    """The embedded engine holds a transformers 5 model (experts fused in memory) and takes
    the per-expert names weight sync streams: after the checkpoint's tensors arrive in 16 KiB
    buckets its model is ``from_pretrained``'s bit for bit, its checksum is that of what was
    sent, and its sampled tokens' log-probs are transformers' teacher-forced ones. A sync
    lacking one expert's projection is incomplete (each expert of a fused tensor counts), and
    the fused in-memory names are not weight-sync names."""
    import re

    from transformers import AutoModelForCausalLM

    from hf_fixtures import make_tiny_hf_model, read_config, read_hf_state
    from megappo.rollout import RolloutEngineError, SamplingParams, checksum_of, checksums_match
    from megappo.rollout.embedded import EmbeddedEngine
    from megappo.rollout.weight_sync import stream_to_engine

    d = make_tiny_hf_model(tmp_path, family, layers=2, **({"mlp_only_layers": [1]} if family == "qwen3_moe" else {}))
    sent = read_hf_state(d)
    engine = EmbeddedEngine(read_config(d), eos_token_ids=[])
    stats = stream_to_engine(sorted(sent.items()), engine, bucket_mb=1 / 64, checksum=True)
    assert stats.num_buckets > 10
    reference = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ref = reference.state_dict()
    held = engine.model.state_dict()
    assert sorted(held) == sorted(ref) and all(torch.equal(t, ref[n]) for n, t in held.items())
    assert checksums_match(engine.weights_checksum(), checksum_of(sent.items()))
    assert checksums_match(engine.weights_checksum(), stats.checksum)

    prompts = [[5, 6, 7, 8, 9], [12, 13], [40, 41, 42]]
    out = engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=3))
    worst = max(float((_teacher_forced(reference, p, s.token_ids) - torch.tensor(s.logprobs)).abs().max())
                for p, group in zip(prompts, out) for s in group)
    assert worst < 1e-5

    block, up = ("block_sparse_moe", "w3") if family == "mixtral" else ("mlp", "up_proj")
    dropped = f"model.layers.0.{block}.experts.3.{up}.weight"
    assert dropped in sent
    with pytest.raises(RolloutEngineError, match=rf"missing 1\b.*{re.escape(dropped)}"):
        stream_to_engine([(n, t) for n, t in sent.items() if n != dropped], engine, bucket_mb=1)
    with pytest.raises(RolloutEngineError, match="no complete weight sync"):
        engine.generate(prompts, SamplingParams(n=1, max_new_tokens=2))
    fused = "model.layers.0.mlp.experts.gate_up_proj"
    with pytest.raises(RolloutEngineError, match=rf"unknown weight {re.escape(repr(fused))}"):
        stream_to_engine([(fused, reference.state_dict()[fused])], engine, bucket_mb=1)
