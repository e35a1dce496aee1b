"""HF <-> Megatron mapping on full state dicts (pure functions, no process groups):
bit-exact round trips for every family, tied and untied, at TP 1/2 and PP 1/2 (and a
virtual-pipeline layout), plus the fused layouts Megatron expects and input validation."""

from __future__ import annotations

import itertools

import pytest
import torch

from hf_fixtures import FAMILIES, model_zoo, read_hf_state
from megappo.models.spec import ModelSpec
from megappo.weights.base import Placement, hf_to_megatron_state, megatron_to_hf_state, plan, table_for
from megappo.weights.validate import check_config, check_hf_tensors, expected_hf_shapes


@pytest.fixture(scope="module")
def tiny_models():
    """(spec, HF state) of every family, tied and untied: 4 layers (PP=2 x VPP=2 has a
    layer per chunk), vocabulary 103 (TP=2 pads a row)."""
    zoo = model_zoo()
    out = {}
    for family, tie in itertools.product(FAMILIES, (False, True)):
        path = zoo[f"{family}-{'tied' if tie else 'untied'}"]
        out[family, tie] = (ModelSpec.from_hf_dir(path), read_hf_state(path))
    return out


def _round_trip(spec, hf, tp, pp, vpp=None):
    back = {}
    for pp_rank, chunk in itertools.product(range(pp), range(vpp or 1)):
        stage = dict(pp=pp, pp_rank=pp_rank, vpp=vpp, vp_stage=chunk if vpp else None)
        shards = [hf_to_megatron_state(hf, spec, Placement.of_stage(spec, tp=tp, tp_rank=r, **stage)) for r in range(tp)]
        part = megatron_to_hf_state(shards, spec, Placement.of_stage(spec, tp=tp, **stage))
        assert not set(part) & set(back), "a tensor was exported by two pipeline chunks"
        back.update(part)
    return back


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_round_trip_bit_exact(tiny_models, family, tie):
    spec, hf = tiny_models[family, tie]
    for tp, pp, vpp in [(1, 1, None), (2, 1, None), (1, 2, None), (2, 2, None), (2, 2, 2)]:
        back = _round_trip(spec, hf, tp, pp, vpp)
        assert sorted(back) == sorted(hf), (tp, pp, vpp)
        for name, t in hf.items():
            assert back[name].dtype == t.dtype and torch.equal(back[name], t), (name, tp, pp, vpp)


def test_fused_layouts_match_megatron(tiny_models):
    """QKV rows are grouped per KV head; fc1 is [gate_r; up_r] per TP rank; the vocab is
    padded with zero rows and split by rows; row-parallel tensors split columns."""
    spec, hf = tiny_models["qwen2", False]
    d, per_group, groups = spec.head_dim, spec.num_attention_heads // spec.num_kv_heads, spec.num_kv_heads
    q, k, v = (hf[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv")
    full = hf_to_megatron_state(hf, spec)
    qkv = full["decoder.layers.1.self_attention.linear_qkv.weight"].view(groups, (per_group + 2) * d, -1)
    for g in range(groups):
        assert torch.equal(qkv[g, : per_group * d], q[g * per_group * d : (g + 1) * per_group * d])
        assert torch.equal(qkv[g, per_group * d : (per_group + 1) * d], k[g * d : (g + 1) * d])
        assert torch.equal(qkv[g, (per_group + 1) * d :], v[g * d : (g + 1) * d])
    bias = full["decoder.layers.1.self_attention.linear_qkv.bias"].view(groups, -1)
    assert torch.equal(bias[0, per_group * d : (per_group + 1) * d], hf["model.layers.1.self_attn.k_proj.bias"][:d])

    r1 = hf_to_megatron_state(hf, spec, Placement(tp=2, tp_rank=1))
    gate, up = hf["model.layers.0.mlp.gate_proj.weight"], hf["model.layers.0.mlp.up_proj.weight"]
    half = spec.ffn_hidden_size // 2
    assert torch.equal(r1["decoder.layers.0.mlp.linear_fc1.weight"], torch.cat([gate[half:], up[half:]]))
    full_qkv0 = full["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert torch.equal(r1["decoder.layers.0.self_attention.linear_qkv.weight"], full_qkv0[full_qkv0.shape[0] // 2 :])
    assert torch.equal(r1["decoder.layers.0.mlp.linear_fc2.weight"], hf["model.layers.0.mlp.down_proj.weight"][:, half:])
    emb = r1["embedding.word_embeddings.weight"]
    assert emb.shape[0] == spec.padded_vocab_size(2) // 2 == 52
    assert torch.equal(emb[:-1], hf["model.embed_tokens.weight"][52:]) and not emb[-1].any()


def test_names_per_role_stage_and_layer_spec(tiny_models):
    spec, _ = tiny_models["qwen3", True]
    table = table_for(spec)
    names = [e.megatron for e in plan(table, spec, Placement())]
    assert "output_layer.weight" not in names  # tied: the head is the embedding
    assert "decoder.layers.3.self_attention.q_layernorm.weight" in names
    last = Placement.of_stage(spec, pp=2, pp_rank=1)
    entries = {e.megatron: e for e in plan(table, spec, last)}
    assert entries["output_layer.weight"].hf == ("model.embed_tokens.weight",) and not entries["output_layer.weight"].rule.export
    assert entries["decoder.layers.0.input_layernorm.weight"].hf == ("model.layers.2.input_layernorm.weight",)
    critic = [e.megatron for e in plan(table, spec, last, role="critic")]
    assert "output_layer.weight" not in critic and "decoder.final_layernorm.weight" in critic
    te = [e.megatron for e in plan(table, spec, Placement(), transformer_impl="transformer_engine")]
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in te
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in te
    assert not any("input_layernorm" in n or "pre_mlp_layernorm" in n for n in te)


def test_expected_shapes_cover_the_checkpoint(tiny_models):
    for (family, tie), (spec, hf) in tiny_models.items():
        shapes = expected_hf_shapes(table_for(spec), spec)
        assert shapes == {k: tuple(v.shape) for k, v in hf.items()}, (family, tie)


def test_check_hf_tensors_names_each_problem(tiny_models):
    spec, hf = tiny_models["llama", False]
    shapes = {k: tuple(v.shape) for k, v in hf.items()}
    del shapes["model.layers.1.mlp.up_proj.weight"]
    shapes["model.layers.0.self_attn.k_proj.weight"] = (64, 64)
    shapes["model.layers.0.self_attn.o_proj.bias"] = (64,)
    shapes["model.layers.0.self_attn.rotary_emb.inv_freq"] = (8,)
    with pytest.raises(ValueError) as e:
        check_hf_tensors(table_for(spec), spec, shapes, source="ckpt")
    msg = str(e.value)
    assert "missing tensor model.layers.1.mlp.up_proj.weight" in msg
    assert "model.layers.0.self_attn.k_proj.weight: shape [64, 64] in the checkpoint, config implies [32, 64]" in msg
    assert "unexpected tensor model.layers.0.self_attn.o_proj.bias" in msg
    assert "inv_freq" not in msg
    shapes["model.layers.1.mlp.up_proj.weight"] = (96, 64)
    shapes["model.layers.0.self_attn.k_proj.weight"] = (32, 64)
    assert check_hf_tensors(table_for(spec), spec, shapes, source="ckpt", strict=False) == ["model.layers.0.self_attn.o_proj.bias"]


def test_check_config_rejects_what_the_mapping_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="unsupported architecture LlamaForSequenceClassification"):
        check_config(table_for("llama"), {"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]}, source="c")
    with pytest.raises(ValueError, match="o_proj a bias"):
        check_config(table_for("qwen3"), {"model_type": "qwen3", "attention_bias": True}, source="c")
    with pytest.raises(ValueError, match="no weight mapping for model family 'gpt2'"):
        table_for("gpt2")


@pytest.fixture(scope="module")
def tiny_reward_models(tmp_path_factory):
    """(spec, HF state) of a tiny ``*ForSequenceClassification`` of every family, tied and untied."""
    from hf_fixtures import make_tiny_hf_reward_model

    root = tmp_path_factory.mktemp("rm")
    out = {}
    for family, tie in itertools.product(FAMILIES, (False, True)):
        path = make_tiny_hf_reward_model(root, family, tie=tie, tokenizer=False)
        out[family, tie] = (ModelSpec.from_hf_dir(path), read_hf_state(path))
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_reward_model_round_trip_bit_exact(tiny_reward_models, family, tie):
    """The role ``reward``: the backbone as the actor's, ``score.weight`` [1, H] as the
    replicated output layer; no LM head and no tied copy, tied config or not."""
    spec, hf = tiny_reward_models[family, tie]
    assert "score.weight" in hf and "lm_head.weight" not in hf
    for tp, pp in [(1, 1), (2, 1), (1, 2), (2, 2)]:
        back = {}
        for pp_rank in range(pp):
            stage = dict(pp=pp, pp_rank=pp_rank)
            shards = [
                hf_to_megatron_state(hf, spec, Placement.of_stage(spec, tp=tp, tp_rank=r, **stage), role="reward")
                for r in range(tp)
            ]
            if pp_rank == pp - 1:
                assert all(torch.equal(s["output_layer.weight"], hf["score.weight"]) for s in shards)
            back.update(megatron_to_hf_state(shards, spec, Placement.of_stage(spec, tp=tp, **stage), role="reward"))
        assert sorted(back) == sorted(hf), (tp, pp)
        assert all(torch.equal(back[n], t) for n, t in hf.items()), (tp, pp)


def test_reward_role_names(tiny_reward_models):
    spec, _ = tiny_reward_models["qwen2", True]
    table = table_for(spec)
    last = {e.megatron: e for e in plan(table, spec, Placement.of_stage(spec, pp=2, pp_rank=1), role="reward")}
    assert last["output_layer.weight"].hf == ("score.weight",) and last["output_layer.weight"].rule.export
    actor = {e.megatron: e for e in plan(table, spec, Placement.of_stage(spec, pp=2, pp_rank=1))}
    assert actor["output_layer.weight"].hf == ("model.embed_tokens.weight",)  # tied copy, unchanged for the actor
    assert table.reward_architectures == ("Qwen2ForSequenceClassification",)
