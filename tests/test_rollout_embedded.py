"""The embedded engine against a ``transformers`` model's own teacher-forced log-probs
(the slow reference, STYLE 10), its sampling contract (seeds, n, stop ids, lengths, left
padding, top-p/top-k) and its errors. Tiny random models built from a config; CPU, fp32."""

from __future__ import annotations

import pytest
import torch
from hf_fixtures import tiny_hf_config

from megappo.rollout.mismatch import mismatch_from_sums, mismatch_sums
from megappo.rollout import RolloutEngineError, SamplingParams, checksum_of, checksums_match
from megappo.rollout.embedded import EmbeddedEngine
from megappo.rollout.weight_sync import stream_to_engine

EOS = 2
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [3, 4, 3, 4, 3], [40]]


def mismatch_metrics(trainer_BT, rollout_BT, mask_BT):
    """The four mismatch metrics over one rank's tokens."""
    return mismatch_from_sums(*mismatch_sums(trainer_BT, rollout_BT, mask_BT))


def make_trainer_model(family: str, *, tie: bool = False, seed: int = 0, **extra):
    """The 'trainer': an HF model with seeded random weights (norms and biases too)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = tiny_hf_config(family, tie=tie, attention_bias=family == "qwen2", **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32, attn_implementation="sdpa").eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.08 * noise)
    return cfg, model


def hf_tensors(model):
    """What the trainer's weight export yields: each HF tensor once (a tied head as the embedding)."""
    return list(model.named_parameters())


def teacher_forced(model, prompt, response, temperature):
    """log_softmax(logits / T) of each response token given everything before it."""
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    t = 1.0 if temperature == 0 else temperature
    lp = torch.log_softmax(logits / t, dim=-1)
    pos = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    return lp[pos, torch.tensor(response)]


@pytest.fixture(scope="module", params=["qwen2", "llama-tied"])
def synced(request):
    family, _, tied = request.param.partition("-")
    cfg, trainer = make_trainer_model(family, tie=bool(tied))
    engine = EmbeddedEngine(cfg, eos_token_ids=[EOS])
    stream_to_engine(hf_tensors(trainer), engine, bucket_mb=0.05)
    return trainer, engine


def max_logprob_diff(trainer, prompts, outputs, temperature) -> float:
    worst = 0.0
    for prompt, samples in zip(prompts, outputs):
        for s in samples:
            ref = teacher_forced(trainer, prompt, s.token_ids, temperature)
            worst = max(worst, (ref - torch.tensor(s.logprobs)).abs().max().item())
    return worst


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(n=3, temperature=1.0, max_new_tokens=24, seed=1),
        SamplingParams(n=2, temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=24, seed=2),
        SamplingParams(n=1, temperature=0.0, max_new_tokens=24),
    ],
    ids=["T1", "T0.7-topp-topk", "greedy"],
)
def test_logprobs_match_teacher_forced_hf(synced, params):
    trainer, engine = synced
    out = engine.generate(PROMPTS, params)
    assert [len(s) for s in out] == [params.n] * len(PROMPTS)
    assert max_logprob_diff(trainer, PROMPTS, out, params.temperature) < 1e-5


def test_sliding_window_model_matches_hf():
    """Mistral with a window shorter than prompt + response: the cache and the mask agree."""
    cfg, trainer = make_trainer_model("mistral", sliding_window=6)
    engine = EmbeddedEngine(cfg, eos_token_ids=[EOS])
    stream_to_engine(hf_tensors(trainer), engine, bucket_mb=1)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=20, seed=3)
    out = engine.generate(PROMPTS, params)
    assert max(len(s.token_ids) for g in out for s in g) > 6
    assert max_logprob_diff(trainer, PROMPTS, out, 1.0) < 1e-5


def test_ppo_ratio_is_one_after_sync(synced):
    """A fresh rollout scored by the trainer: exp(trainer_lp - rollout_lp) == 1 (fp32)."""
    trainer, engine = synced
    params = SamplingParams(n=2, temperature=0.8, max_new_tokens=16, seed=5)
    out = engine.generate(PROMPTS, params)
    samples = [(p, s) for p, group in zip(PROMPTS, out) for s in group]
    T = max(len(s.token_ids) for _, s in samples)
    trainer_BT, rollout_BT, mask_BT = (torch.zeros(len(samples), T) for _ in range(3))
    for b, (p, s) in enumerate(samples):
        n = len(s.token_ids)
        trainer_BT[b, :n] = teacher_forced(trainer, p, s.token_ids, params.temperature)
        rollout_BT[b, :n] = torch.tensor(s.logprobs)
        mask_BT[b, :n] = 1
    ratio_BT = torch.exp(trainer_BT - rollout_BT)
    assert (ratio_BT - 1)[mask_BT.bool()].abs().max().item() < 1e-5
    m = mismatch_metrics(trainer_BT, rollout_BT, mask_BT)
    assert m["rollout/logp_diff_max"] < 1e-5 and abs(m["rollout/kl_k1"]) < 1e-5 and 0 <= m["rollout/kl_k3"] < 1e-9


def test_engine_holds_the_trainers_weights(synced):
    trainer, engine = synced
    assert checksums_match(engine.weights_checksum(), checksum_of(hf_tensors(trainer)))


def test_checksum_is_read_from_the_held_weights():
    """After a sync the engine's checksum (of its own parameters) equals the sync's (of
    what was sent); one weight changed inside the engine afterwards breaks the equality,
    even a change the sync never saw."""
    cfg, trainer = make_trainer_model("llama", tie=True)
    engine = EmbeddedEngine(cfg, eos_token_ids=[EOS])
    assert not engine.spot_checked and engine.checksum_scope() is None
    stats = stream_to_engine(hf_tensors(trainer), engine, bucket_mb=0.05, checksum=True)
    assert checksums_match(engine.weights_checksum(), stats.checksum)
    with torch.no_grad():
        engine.model.model.layers[1].mlp.down_proj.weight[3, 7] += 1e-4
    assert not checksums_match(engine.weights_checksum(), stats.checksum)
    with torch.no_grad():
        engine.model.model.layers[1].mlp.down_proj.weight[3, 7] -= 1e-4
        engine.model.lm_head.weight[0, 0] += 1e-4  # the tied head is the embedding
    assert not checksums_match(engine.weights_checksum(), stats.checksum)


def test_progress_counts_each_prompt_once(synced):
    """``on_progress`` hears of every prompt exactly once, as its last sample ends, chunked
    or not, and does not change the samples."""
    _, engine = synced
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=8)
    plain = engine.generate(PROMPTS, params)
    for rows in (None, 3):
        engine.max_batch_rows = rows
        calls = []
        try:
            out = engine.generate(PROMPTS, params, on_progress=calls.append)
        finally:
            engine.max_batch_rows = None
        assert sum(calls) == len(PROMPTS) and all(c > 0 for c in calls)
        if rows is None:
            assert out == plain
        else:  # one prompt per chunk (batched and alone agree to 1e-5 only: test_chunked_equals_whole_call)
            assert calls == [1] * len(PROMPTS)


def test_deterministic_under_seed_and_distinct_samples(synced):
    _, engine = synced
    p = SamplingParams(n=4, temperature=1.0, max_new_tokens=12, seed=11)
    a, b = engine.generate(PROMPTS, p), engine.generate(PROMPTS, p)
    assert a == b
    c = engine.generate(PROMPTS, SamplingParams(n=4, temperature=1.0, max_new_tokens=12, seed=12))
    assert a != c
    for group in a:  # n samples of one prompt are different draws
        assert len({tuple(s.token_ids) for s in group}) > 1


def test_chunked_equals_whole_call(synced):
    """Per-sample generators: decoding each prompt alone (max_batch_rows = n) gives the
    same tokens as the whole left-padded batch, sampled or greedy."""
    _, engine = synced
    for params in (SamplingParams(n=2, temperature=1.0, max_new_tokens=14, seed=3), SamplingParams(temperature=0, max_new_tokens=14)):
        whole = engine.generate(PROMPTS, params)
        engine.max_batch_rows = params.n
        try:
            alone = engine.generate(PROMPTS, params)
        finally:
            engine.max_batch_rows = None
        for g1, g2 in zip(whole, alone):
            for s1, s2 in zip(g1, g2):
                assert s1.token_ids == s2.token_ids and s1.finish_reason == s2.finish_reason
                assert max(abs(x - y) for x, y in zip(s1.logprobs, s2.logprobs)) < 1e-5


def test_left_padding_batched_vs_one_by_one(synced):
    _, engine = synced
    params = SamplingParams(temperature=0, max_new_tokens=16)
    batched = engine.generate(PROMPTS, params)
    for prompt, group in zip(PROMPTS, batched):
        single = engine.generate([prompt], params)[0][0]
        assert single.token_ids == group[0].token_ids
        assert max(abs(x - y) for x, y in zip(single.logprobs, group[0].logprobs)) < 1e-5


def test_stop_tokens_and_length(synced):
    """A stop id ends the response after that token (kept, finish 'stop'); the same seed
    draws the same tokens up to it. EOS stops too; max_new_tokens gives 'length'."""
    _, engine = synced
    free = SamplingParams(temperature=1.0, max_new_tokens=24, seed=21)
    base = engine.generate([PROMPTS[0]], free)[0][0]
    if base.finish_reason == "stop":
        assert base.token_ids[-1] == EOS and EOS not in base.token_ids[:-1]
    k = next(i for i in range(1, len(base.token_ids)) if base.token_ids[i] not in base.token_ids[:i])
    stop = SamplingParams(temperature=1.0, max_new_tokens=24, seed=21, stop_token_ids=(base.token_ids[k],))
    stopped = engine.generate([PROMPTS[0]], stop)[0][0]
    assert stopped.token_ids == base.token_ids[: k + 1] and stopped.finish_reason == "stop"
    assert stopped.logprobs == base.logprobs[: k + 1]
    eos, engine.eos_token_ids = engine.eos_token_ids, (base.token_ids[k],)
    try:
        assert engine.generate([PROMPTS[0]], free)[0][0] == stopped
    finally:
        engine.eos_token_ids = eos
    short = engine.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=3, seed=0))
    for group in short:
        for s in group:
            assert (s.finish_reason == "length" and len(s.token_ids) == 3) or (s.finish_reason == "stop" and s.token_ids[-1] == EOS)


def test_top_k_one_is_greedy_with_full_vocab_logprobs(synced):
    trainer, engine = synced
    greedy = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=10))
    topk1 = engine.generate(PROMPTS, SamplingParams(temperature=0.5, top_k=1, max_new_tokens=10, seed=9))
    assert [g[0].token_ids for g in greedy] == [g[0].token_ids for g in topk1]
    assert max_logprob_diff(trainer, PROMPTS, topk1, 0.5) < 1e-5  # the T=0.5 distribution, not renormalized
    assert all(lp < 0 for g in topk1 for lp in g[0].logprobs)


def test_bucket_size_does_not_change_weights_or_logprobs():
    cfg, trainer = make_trainer_model("qwen3")
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=10, seed=4)
    runs = []
    for bucket_mb in (0.001, 0.02, 1000):
        engine = EmbeddedEngine(cfg, eos_token_ids=[EOS])
        stats = stream_to_engine(hf_tensors(trainer), engine, bucket_mb=bucket_mb, checksum=True)
        runs.append((engine.generate(PROMPTS, params), stats, engine.weights_checksum()))
    assert runs[0][0] == runs[1][0] == runs[2][0]
    assert runs[0][1].num_buckets > runs[1][1].num_buckets > runs[2][1].num_buckets == 1
    assert len({r[1].bytes for r in runs}) == 1
    for _, stats, held in runs:
        assert checksums_match(stats.checksum, held)


def test_weight_errors_name_the_engine_and_block_generation():
    cfg, trainer = make_trainer_model("llama")
    engine = EmbeddedEngine(cfg, eos_token_ids=[EOS])
    with pytest.raises(RolloutEngineError, match=r"embedded engine \(cpu\): no complete weight sync"):
        engine.generate(PROMPTS, SamplingParams())
    tensors = hf_tensors(trainer)
    with pytest.raises(RolloutEngineError, match=r"unknown weight 'model.layers.0.self_attn.q_proj.weigh'.*did you mean"):
        stream_to_engine([("model.layers.0.self_attn.q_proj.weigh", tensors[1][1])], engine, bucket_mb=1)
    name, t = tensors[1]
    with pytest.raises(RolloutEngineError, match=rf"{name}.*has shape"):
        stream_to_engine([(name, t[:-1])], engine, bucket_mb=1)
    with pytest.raises(RolloutEngineError, match=r"missing 1, e.g. \['model.norm.weight'\]"):
        stream_to_engine([nt for nt in tensors if nt[0] != "model.norm.weight"], engine, bucket_mb=1)
    with pytest.raises(RolloutEngineError, match="no complete weight sync"):
        engine.generate(PROMPTS, SamplingParams())
    stream_to_engine(tensors, engine, bucket_mb=1)
    engine.generate(PROMPTS, SamplingParams(max_new_tokens=2))


def test_generation_failure_names_engine_and_leaves_trainer_untouched(synced, monkeypatch):
    trainer, engine = synced
    before = {k: v.clone() for k, v in trainer.state_dict().items()}

    def boom(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(engine.model, "forward", boom)
    with pytest.raises(RolloutEngineError, match=r"embedded engine \(cpu\): generation failed: RuntimeError: kernel exploded"):
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=4))
    monkeypatch.undo()
    assert all(torch.equal(before[k], v) for k, v in trainer.state_dict().items())
    engine.generate(PROMPTS, SamplingParams(max_new_tokens=2))  # the engine still works


def test_bad_prompts_are_value_errors(synced):
    _, engine = synced
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[3], []], SamplingParams())
    with pytest.raises(ValueError, match=r"prompt 0 has token id 101 outside \[0, 101\)"):
        engine.generate([[3, 101]], SamplingParams())
    with pytest.raises(ValueError, match="at least one prompt"):
        engine.generate([], SamplingParams())


def test_shutdown():
    cfg, _ = make_trainer_model("llama")
    engine = EmbeddedEngine(cfg)
    engine.shutdown()
    engine.shutdown()
    with pytest.raises(RolloutEngineError, match="shut down"):
        engine.health()


def _in_thread(fn):
    import threading

    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


@pytest.fixture(scope="module")
def no_eos():
    """An engine with no stop ids (responses run to max_new_tokens) and its trainer."""
    cfg, trainer = make_trainer_model("llama")
    engine = EmbeddedEngine(cfg, eos_token_ids=[])
    stream_to_engine(hf_tensors(trainer), engine, bucket_mb=0.05)
    return trainer, engine


def test_pause_and_continue_change_nothing_in_the_samples(no_eos):
    import time

    _, engine = no_eos
    p = SamplingParams(n=2, temperature=1.0, max_new_tokens=300, seed=5)
    reference = engine.generate(PROMPTS[:2], p)
    t, box = _in_thread(lambda: engine.generate(PROMPTS[:2], p))
    time.sleep(0.2)
    engine.pause_generation()
    time.sleep(1.0)
    assert t.is_alive(), box
    engine.continue_generation()
    t.join(120)
    assert box.get("value") == reference, box.get("error")

    engine.pause_generation("in_place")  # a call sent while paused waits, then runs
    t, box = _in_thread(lambda: engine.generate(PROMPTS[:2], p))
    time.sleep(0.5)
    assert t.is_alive() and not box
    engine.continue_generation()
    t.join(120)
    assert box.get("value") == reference, box.get("error")
    with pytest.raises(ValueError, match="pause_generation mode"):
        engine.pause_generation("later")


def test_abort_keeps_the_tokens_so_far_and_their_logprobs(no_eos):
    import time

    trainer, engine = no_eos
    p = SamplingParams(n=2, temperature=1.0, max_new_tokens=100_000, seed=6)
    t, box = _in_thread(lambda: engine.generate(PROMPTS, p))
    time.sleep(1.0)
    engine.abort_requests()
    t.join(60)
    assert not t.is_alive() and "error" not in box, box
    samples = [s for group in box["value"] for s in group]
    assert len(samples) == len(PROMPTS) * 2
    assert all(s.finish_reason == "abort" and 0 < len(s.token_ids) < 100_000 for s in samples)
    assert max_logprob_diff(trainer, PROMPTS, box["value"], 1.0) < 1e-4
    # an abort ends the calls in flight only; pausing in "abort" mode also stays paused
    after = engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=5, seed=1))
    assert after[0][0].finish_reason == "length" and len(after[0][0].token_ids) == 5
    t, box = _in_thread(lambda: engine.generate(PROMPTS[:1], p))
    time.sleep(0.5)
    engine.pause_generation("abort")
    t.join(60)
    assert [s.finish_reason for s in box["value"][0]] == ["abort", "abort"], box
    t, box = _in_thread(lambda: engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=5, seed=1)))
    time.sleep(0.5)
    assert t.is_alive()
    engine.continue_generation()
    t.join(60)
    assert box.get("value") == after, box
