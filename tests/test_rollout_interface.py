"""The engine interface's pieces that need no engine: sampling parameters, the weights
checksum, the mismatch metrics, top-p/top-k filtering, the factory and its errors."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
from hf_fixtures import tiny_hf_config

from megappo.config.schema import RolloutConfig
from megappo.parallel.state import ParallelLayout
from megappo.rollout.mismatch import mismatch_from_sums, mismatch_sums
from megappo.rollout import RolloutEngineError, SamplingParams, build_engine, checksum_of, checksums_match, generate_in_group
from megappo.rollout.sampling import choose_tokens, filter_logits_bV, row_seed
from megappo.rollout.sglang_protocol import check_server_args, version_supported


def mismatch_metrics(trainer_BT, rollout_BT, mask_BT):
    """The four mismatch metrics over one rank's tokens."""
    return mismatch_from_sums(*mismatch_sums(trainer_BT, rollout_BT, mask_BT))


def layout(**kw) -> ParallelLayout:
    base = dict(rank=0, world_size=1, local_rank=0, tp=1, pp=1, dp=1, tp_rank=0, pp_rank=0, dp_rank=0, vpp=None, device=torch.device("cpu"))
    return ParallelLayout(**{**base, **kw})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n=0), "n must be >= 1"),
        (dict(temperature=-0.1), "temperature must be"),
        (dict(top_p=0.0), "top_p must be in"),
        (dict(top_k=0), "top_k must be -1"),
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    ],
)
def test_sampling_params_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_from_config():
    cfg = RolloutConfig(num_return_sequences_in_group=8, response_length=64, temperature=0.9, top_p=0.95, top_k=50, stop_token_ids=[7, 9], eval_temperature=0.0)
    train = SamplingParams.from_config(cfg, seed=3)
    assert (train.n, train.temperature, train.top_p, train.top_k, train.max_new_tokens, train.stop_token_ids, train.seed) == (8, 0.9, 0.95, 50, 64, (7, 9), 3)
    ev = SamplingParams.from_config(cfg, evaluation=True, eos_token_ids=[2, 7])
    assert ev.n == 1 and ev.greedy and (ev.top_p, ev.top_k) == (1.0, -1)
    assert ev.stop_token_ids == (2, 7, 9)  # the tokenizer's EOS joins the configured stop ids


def test_checksum_properties():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 7, generator=g), torch.randn(3_000_000, generator=g)  # b spans 3 chunks
    base = checksum_of([("a", a), ("b", b)])
    assert base == checksum_of([("b", b), ("a", a)])  # arrival order does not matter
    assert base == checksum_of([("a", a.to(torch.float64)), ("b", b)])  # lossless upcast
    bf = a.to(torch.bfloat16)
    assert checksum_of([("a", bf)]) == checksum_of([("a", bf.float())])
    moved = b.clone()
    moved[[0, 2_000_000]] = moved[[2_000_000, 0]]  # two elements in different chunks swap
    assert not checksums_match(base, checksum_of([("a", a), ("b", moved)]))
    within = a.clone()
    within[[0, 1]] = within[[1, 0]]
    assert not checksums_match(base, checksum_of([("a", within), ("b", b)]))
    c = torch.randn(300, 7, generator=g)
    assert not checksums_match(checksum_of([("a", a), ("c", c)]), checksum_of([("a", c), ("c", a)]))  # names swapped
    assert not checksums_match(base, checksum_of([("a", a + 1e-6), ("b", b)]))
    with pytest.raises(ValueError, match="appears twice"):
        checksum_of([("a", a), ("a", a)])


def test_mismatch_metrics_values_and_mask():
    t = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -9.0, -9.0]])
    r = torch.tensor([[-1.1, -2.0, -2.5], [-0.5, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0]])
    out = mismatch_metrics(t, r, m)
    d = torch.tensor([0.1, 0.0, -0.5, 0.0], dtype=torch.float64)
    assert out["rollout/logp_diff_mean"] == pytest.approx(0.15)
    assert out["rollout/logp_diff_max"] == pytest.approx(0.5)
    assert out["rollout/kl_k1"] == pytest.approx(float((-d).mean()))
    assert out["rollout/kl_k3"] == pytest.approx(float((d.exp() - 1 - d).mean()))
    assert out["rollout/kl_k3"] > 0
    zero = mismatch_metrics(t, t.clone(), m)
    assert all(v == 0 for v in zero.values())
    assert all(v == 0 for v in mismatch_metrics(t, r, torch.zeros_like(m)).values())
    with pytest.raises(ValueError, match="shapes differ"):
        mismatch_metrics(t, r[:, :2], m)


def test_top_p_and_top_k_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    keep = lambda out: (out[0] > float("-inf")).tolist()  # noqa: E731
    assert keep(filter_logits_bV(logits, -1, 0.5)) == [True, False, False, False]
    assert keep(filter_logits_bV(logits, -1, 0.8)) == [True, True, False, False]
    assert keep(filter_logits_bV(logits, -1, 0.81)) == [True, True, True, False]
    assert keep(filter_logits_bV(logits, 2, 1.0)) == [True, True, False, False]
    assert keep(filter_logits_bV(logits, 3, 0.6)) == [True, True, False, False]
    assert keep(filter_logits_bV(logits, -1, 1e-9)) == [True, False, False, False]  # the top token always stays


def test_sampled_logprob_is_of_the_unfiltered_tempered_distribution():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=0.6, top_p=0.5, top_k=5)
    gens = [torch.Generator().manual_seed(row_seed(0, i, 0)) for i in range(6)]
    tokens, lps = choose_tokens(logits, params, gens)
    ref = torch.log_softmax(logits / 0.6, -1).gather(-1, tokens[:, None])[:, 0]
    assert torch.equal(lps, ref)
    allowed = torch.softmax(filter_logits_bV(logits / 0.6, 5, 0.5), -1) > 0
    assert allowed.gather(-1, tokens[:, None]).all()


def test_row_seeds_are_distinct():
    seeds = {row_seed(7, i, j) for i in range(50) for j in range(8)}
    assert len(seeds) == 400 and all(0 <= s < 2**63 for s in seeds)


def test_build_engine_embedded_and_placement():
    cfg = tiny_hf_config("llama")
    engine = build_engine(RolloutConfig(), hf_config=cfg, hf_dir=None, layout=layout(), eos_token_ids=[2])
    assert engine.name == "embedded engine (cpu)" and engine.eos_token_ids == (2,)
    for other in (dict(tp=2, tp_rank=1), dict(pp=2, pp_rank=1)):
        assert build_engine(RolloutConfig(), hf_config=cfg, hf_dir=None, layout=layout(**other), eos_token_ids=[2]) is None
    with pytest.raises(ValueError, match="server_urls"):
        build_engine(RolloutConfig(engine="sglang_server"), hf_config=cfg, hf_dir=None, layout=None, eos_token_ids=[2])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="rollout.device is 'cuda'"):
            build_engine(RolloutConfig(device="cuda"), hf_config=cfg, hf_dir=None, layout=None, eos_token_ids=[2])


def test_sglang_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sglang", None)  # import sglang -> ImportError
    with pytest.raises(ImportError, match=r"pip install megappo\[sglang\].*sglang>=0.5.18,<=0.5.23"):
        build_engine(RolloutConfig(engine="sglang"), hf_config={}, hf_dir="/nonexistent", layout=None, eos_token_ids=[2])


def test_server_args_check_names_unknown_keys():
    @dataclasses.dataclass
    class ServerArgs:  # the shape of SGLang's (the real one: test_rollout_sglang_contract)
        model_path: str = ""
        mem_fraction_static: float = 0.9
        tp_size: int = 1
        _private: int = 0

    check_server_args({"mem_fraction_static": 0.5, "tp_size": 2}, ServerArgs)
    with pytest.raises(ValueError, match=r"rollout.sglang.mem_fraction_statc is not .*did you mean mem_fraction_static"):
        check_server_args({"mem_fraction_statc": 0.5}, ServerArgs)
    with pytest.raises(ValueError, match="_private is not"):
        check_server_args({"_private": 1}, ServerArgs)


def test_supported_versions():
    versions = ("0.5.17", "0.5.18", "0.5.21", "0.5.21.post1", "0.5.22", "0.5.23", "0.5.24")
    assert [version_supported(v) for v in versions] == [False, True, True, True, True, True, False]


def test_generate_in_group_single_rank_raises_an_engine_error():
    class Broken:
        def generate(self, prompts, params):
            raise RuntimeError("engine down")

    with pytest.raises(RolloutEngineError, match=r"rollout on rank 0 \(data-parallel replica 0\) failed: RuntimeError: engine down") as e:
        generate_in_group(Broken(), [[1]], SamplingParams(), layout())
    assert isinstance(e.value.__cause__, RuntimeError)

    class Named:
        def generate(self, prompts, params):
            raise RolloutEngineError("embedded engine (cpu): generation failed")

    with pytest.raises(RolloutEngineError, match=r"^embedded engine \(cpu\): generation failed$"):
        generate_in_group(Named(), [[1]], SamplingParams(), layout())
