"""Rollout routing replay ("R3", ``algo.routing_replay_source: rollout``) without Megatron: the
configuration's rules, the experts the embedded engine reports against transformers' own
routing, and ``RolloutBatch`` carrying them. The trainer's side is in
``tests/test_moe_routing_replay.py`` (one process) and ``tests/test_moe_parallel.py`` (EP, PP)."""

from __future__ import annotations

import pytest

from megappo.config import config_from_dict
from megappo.config.errors import ConfigError
from megappo.config.validate import validate


def test_rollout_source_needs_replay_and_an_engine_that_reports():
    with pytest.raises(ConfigError, match="needs algo.routing_replay=true"):
        validate(config_from_dict({"algo": {"routing_replay_source": "rollout"}}))
    with pytest.raises(ConfigError, match="rollout.engine=sglang reports .*rollout.sglang.enable_return_routed_experts"):
        validate(config_from_dict({"algo": {"routing_replay": True, "routing_replay_source": "rollout"}, "rollout": {"engine": "sglang"}}))
    validate(config_from_dict({"algo": {"routing_replay": True, "routing_replay_source": "rollout"},
                               "rollout": {"engine": "sglang", "sglang": {"enable_return_routed_experts": True}}}))
    validate(config_from_dict({"algo": {"routing_replay": True, "routing_replay_source": "rollout"}}))  # embedded
    with pytest.raises(ConfigError, match="routing_replay_source"):
        validate(config_from_dict({"algo": {"routing_replay_source": "engine"}}))


def near_tie_moe(tmp_path, name: str = "qwen3-moe-tie", nudge: float = 0.0, layers: int = 3):
    """A tiny Qwen3-MoE (``layers`` layers, layer 1 dense, 4 experts, top-2) whose router rows are
    2v, v, v * (1 + nudge), -v: every token's second expert sits on a tie (nudge 0) or a near-tie
    between experts 1 and 2. Returns its directory."""
    import torch
    from transformers import AutoModelForCausalLM

    from hf_fixtures import make_tiny_hf_model

    d = make_tiny_hf_model(tmp_path, "qwen3_moe", layers=layers, mlp_only_layers=[1], name=name)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    with torch.no_grad():
        for name_, w in model.named_parameters():
            if name_.endswith("mlp.gate.weight"):
                v = w[0].clone()
                w[0], w[1], w[2], w[3] = 2 * v, v, v * (1 + nudge), -v
    model.save_pretrained(d)
    return d


def engine_rollout_batch(engine_dir, num_prompts: int):
    """The embedded engine on ``engine_dir``'s weights samples two 8-token responses (T = 1,
    seed 11) to each of ``num_prompts`` short prompts; their ``RolloutBatch`` (scores 0), whose
    ``routed_experts_BSLK`` are the engine's routing and ``rollout_logprobs_BT`` its log-probs."""
    from hf_fixtures import read_config, read_hf_state
    from megappo.rollout import SamplingParams
    from megappo.rollout.batch import RolloutBatch, RolloutStats
    from megappo.rollout.embedded import EmbeddedEngine
    from megappo.rollout.weight_sync import stream_to_engine

    engine = EmbeddedEngine(read_config(engine_dir), eos_token_ids=[])
    stream_to_engine(sorted(read_hf_state(engine_dir).items()), engine, bucket_mb=1)
    prompts = [[5 + i, 20 + 3 * i, 7, 40 + i][: 2 + i % 3] for i in range(num_prompts)]
    samples = engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=11))
    rows = 2 * num_prompts
    return RolloutBatch.from_samples(prompts, samples, scores=[0.0] * rows, correct=[False] * rows,
                                     prompt_texts=[""] * num_prompts, response_texts=[""] * rows, first_group_id=0,
                                     policy_version=0, stats=RolloutStats())


def teacher_forced_routing(model, ids: list[int]):
    """int [len(ids), routed layers, k]: transformers' own top-k of each routed layer's router
    (``*TopKRouter`` output 2) on one forward pass over ``ids``."""
    import torch

    routers = [m for n, m in model.named_modules() if type(m).__name__.endswith("TopKRouter")]
    seen = {}
    handles = [r.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out[2])) for i, r in enumerate(routers)]
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in handles:
        h.remove()
    return torch.stack([seen[i] for i in range(len(routers))], dim=1)


def test_embedded_engine_reports_the_experts_transformers_routes_to(tmp_path):
    """Prefill and decode steps alike: each sample's ``routed_experts`` are transformers'
    teacher-forced routing of prompt + response (all but the last token), only the routed
    layers (0 and 2), the same under a near-tie; a dense model reports none."""
    import torch
    from transformers import AutoModelForCausalLM

    from hf_fixtures import make_tiny_hf_model, read_config, read_hf_state
    from megappo.rollout import SamplingParams
    from megappo.rollout.embedded import EmbeddedEngine
    from megappo.rollout.weight_sync import stream_to_engine

    d = near_tie_moe(tmp_path)
    engine = EmbeddedEngine(read_config(d), eos_token_ids=[], max_batch_rows=4)
    stream_to_engine(sorted(read_hf_state(d).items()), engine, bucket_mb=1)
    reference = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    prompts = [[5, 6, 7, 8, 9], [12, 13], [40, 41, 42]]
    out = engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=7, seed=3, stop_token_ids=(17, 33)))
    rows = 0
    for p, group in zip(prompts, out):
        for s in group:
            ids = list(p) + s.token_ids
            got = s.routed_experts
            assert got.dtype == torch.int32 and tuple(got.shape) == (len(ids) - 1, 2, 2), tuple(got.shape)
            want = teacher_forced_routing(reference, ids)[:-1]
            assert torch.equal(got.sort(-1).values, want.sort(-1).values.to(torch.int32))
            assert set(got[:, :, 1].flatten().tolist()) <= {1, 2}  # the tie is every token's second expert
            rows += got.shape[0]
    assert rows > 30

    dense = make_tiny_hf_model(tmp_path, "qwen3", layers=1)
    plain = EmbeddedEngine(read_config(dense), eos_token_ids=[])
    stream_to_engine(sorted(read_hf_state(dense).items()), plain, bucket_mb=1)
    assert plain.generate([[5, 6]], SamplingParams(max_new_tokens=3, seed=1))[0][0].routed_experts is None


def test_rollout_batch_carries_routed_experts_padded_like_the_tokens():
    import torch

    from megappo.rollout.batch import RolloutBatch, RolloutStats
    from megappo.rollout.engine import Sample

    def sample(n_tokens: int, prompt_len: int, fill: int):
        return Sample(list(range(3, 3 + n_tokens)), [-0.5] * n_tokens, "length",
                      routed_experts=torch.full((prompt_len + n_tokens - 1, 2, 2), fill, dtype=torch.int32))

    def batch(prompts, samples):
        B = sum(len(g) for g in samples)
        return RolloutBatch.from_samples(prompts, samples, scores=[0.0] * B, correct=[False] * B, prompt_texts=[""] * len(prompts),
                                         response_texts=[""] * B, first_group_id=0, policy_version=0, stats=RolloutStats())

    a = batch([[1, 2, 3], [4]], [[sample(2, 3, 1), sample(4, 3, 2)], [sample(1, 1, 3), Sample([9], [-1.0], "stop")]])
    r = a.tokens.routed_experts_BSLK
    assert r.dtype == torch.int16 and tuple(r.shape) == (4, 7, 2, 2)
    assert (r[0, :4] == 1).all() and (r[0, 4:] == -1).all()  # 3 + 2 tokens: 4 reported, the last and padding not
    assert (r[1, :6] == 2).all() and (r[1, 6] == -1).all()
    assert (r[2, :1] == 3).all() and (r[2, 1:] == -1).all()
    assert (r[3] == -1).all()  # a sample without routing
    picked = a.select(torch.tensor([2, 0]))
    assert tuple(picked.tokens.routed_experts_BSLK.shape) == (2, 5, 2, 2) and (picked.tokens.routed_experts_BSLK[1, :4] == 1).all()
    b = batch([[1]], [[Sample([5, 6], [-0.1, -0.2], "stop")]])
    assert b.tokens.routed_experts_BSLK is None
    both = RolloutBatch.concat([b, a], stats=RolloutStats())
    rb = both.tokens.routed_experts_BSLK
    assert tuple(rb.shape) == (5, 7, 2, 2) and (rb[0] == -1).all() and torch.equal(rb[1:], r)


def test_a_continued_partial_rollout_keeps_each_positions_routing_from_when_it_was_drawn():
    """``partial._extend``: prompt (3) + 2 tokens before the abort: 4 rows; the continuation ran
    prompt + 2 tokens again and drew 3 more (cut to 2 by the budget): its rows past the first
    4 follow, cut to 3 + 4 - 1 = 6 rows."""
    import torch

    from megappo.rollout.engine import Sample
    from megappo.rollout.partial import _extend

    prefix = Sample([7, 8], [-1.0, -1.0], "abort", [0, 0], routed_experts=torch.zeros(4, 1, 2, dtype=torch.int32))
    more = Sample([9, 10, 11], [-2.0] * 3, "length", routed_experts=torch.arange(7, dtype=torch.int32).view(7, 1, 1).expand(7, 1, 2))
    joined = _extend(prefix, more, version=1, budget=2)
    assert joined.token_ids == [7, 8, 9, 10] and joined.routed_experts[:, 0, 0].tolist() == [0, 0, 0, 0, 4, 5]
    assert _extend(prefix, Sample([9], [-2.0], "stop"), version=1, budget=2).routed_experts is None


def test_sglang_routed_experts_decode_to_the_routed_layers():
    """SGLang's encoding (base64 of int32 [prompt + output - 1, num_hidden_layers, top-k], every
    layer a slot) read back as ``Sample.routed_experts`` of the routed layers; checked against
    SGLang's own encoder and decoder in tests/mp/rollout_sglang_probe.py ("routed_experts")."""
    import base64

    import torch

    from hf_fixtures import tiny_hf_config
    from megappo.rollout import RolloutEngineError, SamplingParams
    from megappo.rollout.sglang_protocol import decode_routed_experts, generate_request, parse_samples, routing_layout

    layout = routing_layout(tiny_hf_config("qwen3_moe", layers=3, mlp_only_layers=[1]))
    assert (layout.num_layers, layout.moe_layers, layout.topk) == (3, (0, 2), 2)
    assert routing_layout(tiny_hf_config("qwen3")) is None
    held = torch.arange(6 * 3 * 2, dtype=torch.int32).view(6, 3, 2)
    encoded = base64.b64encode(held.numpy().tobytes()).decode()
    assert torch.equal(decode_routed_experts(encoded, layout, 6, "e"), held[:, [0, 2]])
    with pytest.raises(RolloutEngineError, match="routed experts hold 36 ids, expected 5 positions"):
        decode_routed_experts(encoded, layout, 5, "e")
    assert generate_request([[1]], SamplingParams(), [2], routed_experts=True)["return_routed_experts"] is True
    answers = [{"meta_info": {"finish_reason": {"type": "stop"}, "output_token_logprobs": [[-0.1, 7, None]] * k,
                              **({"routed_experts": encoded} if k == 3 else {})}} for k in (3, 2)]
    (a, b), = parse_samples(answers, 1, 2, "e", prompts=[[1, 2, 3, 4]], routing=layout)
    assert torch.equal(a.routed_experts, held[:, [0, 2]]) and b.routed_experts is None  # a server without the flag
