"""The colocated ``sglang`` engine's own logic on CPU: the order of its calls to
``sglang.Engine`` (weight-update session, flattened buckets, one cache flush), the
memory release / resume bookkeeping, and failures. SGLang cannot run without CUDA, so a
recording stand-in replaces the ``sglang`` modules here; what SGLang's real classes accept
is checked by test_rollout_sglang_contract.py."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import types

import pytest
import torch

from megappo.rollout import RolloutEngineError, SamplingParams, checksums_match
from megappo.rollout.engine import SPOT_ROWS
from megappo.rollout.sglang_protocol import SPOT_MAX_ELEMENTS, spot_tensor
from megappo.rollout.weight_sync import stream_to_engine


class RecordingEngine:
    """Answers like ``sglang.Engine`` and records (method, kwargs)."""

    instances: list = []

    def __init__(self, **kwargs):
        self.kwargs, self.calls, self.fail_update = kwargs, [], False
        self.loop = asyncio.new_event_loop()  # as sglang.Engine's; our engine runs it on its own thread
        RecordingEngine.instances.append(self)

    def _rec(self, name, **kw):
        self.calls.append((name, kw))
        return (True, "Success")

    def begin_weight_update(self):
        return self._rec("begin_weight_update")

    def end_weight_update(self):
        return self._rec("end_weight_update")

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        self.calls.append(("update_weights_from_tensor", dict(n=len(named_tensors), load_format=load_format, flush_cache=flush_cache)))
        return (False, "Failed: injected") if self.fail_update else (True, "Success")

    def flush_cache(self):
        return self._rec("flush_cache")

    def release_memory_occupation(self, tags=None):
        return self._rec("release_memory_occupation", tags=tags)

    def resume_memory_occupation(self, tags=None):
        return self._rec("resume_memory_occupation", tags=tags)

    def generate(self, **kwargs):
        self.calls.append(("generate", kwargs))
        n = kwargs["sampling_params"]["n"]
        return [{"meta_info": {"finish_reason": {"type": "length"}, "output_token_logprobs": [(-0.25, 7, None)]}}] * (len(kwargs["input_ids"]) * n)

    def get_server_info(self):
        return {}

    def get_weights_by_name(self, name, truncate_size=100):
        """As SGLang's: the whole parameter as float32 Python lists, then the first rows
        (None when the model cannot read it back). ``held`` is set by the test."""
        self.calls.append(("get_weights_by_name", dict(name=name, truncate_size=truncate_size)))
        held = getattr(self, "held", {})
        return held[name].float().tolist()[:truncate_size] if name in held else None

    def shutdown(self):
        self.calls.append(("shutdown", {}))


@pytest.fixture
def fake_sglang(monkeypatch):
    @dataclasses.dataclass
    class ServerArgs:
        model_path: str = ""
        tp_size: int = 1
        base_gpu_id: int = 0
        load_format: str = "auto"
        skip_tokenizer_init: bool = False
        enable_memory_saver: bool = False
        random_seed: int = 0
        mem_fraction_static: float = 0.9
        device: str = "cuda"
        port: int = 30000
        nccl_port: int = 0

    class Bucket:
        supports_multi_dtypes = True

        def __init__(self, named_tensors):
            self.named = list(named_tensors)

        def get_flattened_tensor(self):
            return torch.cat([t.reshape(-1).view(torch.uint8) for _, t in self.named])

        def get_metadata(self):
            return [n for n, _ in self.named]

    mods = {
        "sglang": types.SimpleNamespace(Engine=RecordingEngine, __version__="0.5.21"),
        "sglang.srt.server_args": types.SimpleNamespace(ServerArgs=ServerArgs),
        "sglang.srt.utils": types.SimpleNamespace(MultiprocessingSerializer=types.SimpleNamespace(serialize=lambda obj, output_str=False: repr(obj["metadata"]))),
        "sglang.srt.utils.patch_torch": types.SimpleNamespace(monkey_patch_torch_reductions=lambda: None),
        "sglang.srt.weight_sync.tensor_bucket": types.SimpleNamespace(FlattenedTensorBucket=Bucket),
    }
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    RecordingEngine.instances.clear()
    yield


def make_engine(**server_args):
    from megappo.rollout.sglang_engine import SGLangEngine

    # device "cuda": the GPU path's arguments (on this CPU machine the CPU path would apply)
    engine = SGLangEngine("/models/tiny", server_args={"device": "cuda", **server_args}, eos_token_ids=[2], tp_size=2, gpu_id=1, seed=5)
    engine._device = torch.device("cpu")  # no GPU here: buckets stay on the CPU
    return engine


def weights():
    g = torch.Generator().manual_seed(0)
    return [(f"w{i}", torch.randn(64, generator=g)) for i in range(5)]


def test_start_arguments_and_unknown_keys(fake_sglang):
    engine = make_engine(mem_fraction_static=0.5)
    kwargs = dict(RecordingEngine.instances[-1].kwargs)
    port, nccl_port = kwargs.pop("port"), kwargs.pop("nccl_port")
    assert kwargs == dict(
        model_path="/models/tiny", tp_size=2, base_gpu_id=1, load_format="dummy", skip_tokenizer_init=True,
        enable_memory_saver=True, random_seed=5, mem_fraction_static=0.5, device="cuda",
    )
    assert port != nccl_port and port % 16 == nccl_port % 16 == 0  # slot of GPU 1 // tp_size 2 = 0
    assert engine.name == f"sglang engine (GPU 1, tp_size 2, port {port})"
    with pytest.raises(ValueError, match="mem_fraction_statc is not an SGLang ServerArgs field.*mem_fraction_static"):
        make_engine(mem_fraction_statc=0.5)


def test_weight_update_sequence(fake_sglang):
    engine = make_engine()
    with pytest.raises(RolloutEngineError, match="no complete weight sync"):
        engine.generate([[1]], SamplingParams())
    tensors = weights()
    stream_to_engine(tensors, engine, bucket_mb=600 / 2**20)  # 256-byte tensors: 2 per bucket
    calls = RecordingEngine.instances[-1].calls
    assert [c[0] for c in calls] == ["begin_weight_update"] + ["update_weights_from_tensor"] * 3 + ["end_weight_update", "flush_cache"]
    assert all(c[1] == dict(n=2, load_format="flattened_bucket", flush_cache=False) for c in calls[1:4])
    out = engine.generate([[1, 2], [3]], SamplingParams(n=2, max_new_tokens=5))
    assert [[s.token_ids for s in g] for g in out] == [[[7], [7]], [[7], [7]]]
    kwargs = calls[-1][1]
    assert kwargs["input_ids"] == [[1, 2], [3]] and kwargs["return_logprob"] is True


def test_weights_checksum_is_a_spot_check_read_back(fake_sglang):
    """The engine side of the checksum comes from get_weights_by_name (first SPOT_ROWS rows
    of a few small tensors), the trainer side from the sync over the same scope."""
    g = torch.Generator().manual_seed(1)
    tensors = [
        ("a.weight", torch.randn(10, 8, generator=g)),
        ("b.bias", torch.randn(6, generator=g)),
        ("big.weight", torch.zeros(SPOT_MAX_ELEMENTS + 1)),  # never read back: too large
        ("c.weight", torch.randn(3, 5, generator=g).to(torch.bfloat16)),
        ("d.weight", torch.randn(7, 2, generator=g)),
        ("e.weight", torch.randn(9, 4, generator=g)),
    ]
    engine = make_engine()
    stats = stream_to_engine(tensors, engine, bucket_mb=1, checksum=True)
    rec = RecordingEngine.instances[-1]
    assert engine.spot_checked and engine.checksum_scope() == ("a.weight", "b.bias", "d.weight", "e.weight")
    rec.held = {n: t.clone() for n, t in tensors}
    rec.calls.clear()
    assert checksums_match(engine.weights_checksum(), stats.checksum)
    reads = [c[1] for c in rec.calls if c[0] == "get_weights_by_name"]
    assert reads == [dict(name=n, truncate_size=SPOT_ROWS) for n in engine.checksum_scope()]

    rec.held["d.weight"][SPOT_ROWS:] += 1.0  # beyond the spot rows: a spot-check does not see it
    assert checksums_match(engine.weights_checksum(), stats.checksum)
    rec.held["d.weight"][1, 0] += 1e-3  # within them: it does
    assert not checksums_match(engine.weights_checksum(), stats.checksum)

    engine.release_memory()
    rec.calls.clear()
    engine.weights_checksum()  # reads held weights: resumes them first
    assert rec.calls[0] == ("resume_memory_occupation", {"tags": ["weights"]})
    del rec.held["a.weight"]
    with pytest.raises(RolloutEngineError, match=r"sglang engine .*get_weights_by_name\('a.weight'\) returned nothing.*cannot be spot-checked"):
        engine.weights_checksum()


def test_spot_answers_per_data_parallel_rank_and_shapes():
    t = torch.arange(12.0).reshape(6, 2)
    assert torch.equal(spot_tensor(t.tolist()[:SPOT_ROWS], "x", (6, 2), "e"), t[:SPOT_ROWS])
    per_dp = [t.tolist()[:SPOT_ROWS]] * 2  # SGLang with dp_size 2: one list per rank
    assert torch.equal(spot_tensor(per_dp, "x", (6, 2), "e"), t[:SPOT_ROWS])
    with pytest.raises(RolloutEngineError, match=r"e: get_weights_by_name\('x'\) answered shape \(4, 2\), expected \(4, 3\)"):
        spot_tensor(t.tolist()[:SPOT_ROWS], "x", (6, 3), "e")


def test_memory_release_and_resume(fake_sglang):
    engine = make_engine()
    stream_to_engine(weights(), engine, bucket_mb=1)
    rec = RecordingEngine.instances[-1]
    rec.calls.clear()
    engine.release_memory()
    engine.release_memory()  # idempotent
    stream_to_engine(weights(), engine, bucket_mb=1)  # a sync resumes only the weights
    engine.generate([[1]], SamplingParams())  # generation resumes the rest
    names = [(c[0], c[1].get("tags")) for c in rec.calls if "memory" in c[0]]
    assert names == [
        ("release_memory_occupation", None),
        ("resume_memory_occupation", ["weights"]),
        ("resume_memory_occupation", ["cuda_graph", "kv_cache"]),
    ]


def test_failed_update_closes_the_session_and_blocks_generation(fake_sglang):
    engine = make_engine()
    stream_to_engine(weights(), engine, bucket_mb=1)
    rec = RecordingEngine.instances[-1]
    rec.fail_update, rec.calls = True, []
    with pytest.raises(RolloutEngineError, match=r"sglang engine \(GPU 1, tp_size 2, port \d+\): update_weights_from_tensor failed: Failed: injected"):
        stream_to_engine(weights(), engine, bucket_mb=1)
    assert [c[0] for c in rec.calls] == ["begin_weight_update", "update_weights_from_tensor", "end_weight_update"]
    with pytest.raises(RolloutEngineError, match="no complete weight sync"):
        engine.generate([[1]], SamplingParams())


def test_without_sessions_0_5_18(fake_sglang, monkeypatch):
    monkeypatch.delattr(RecordingEngine, "begin_weight_update")
    engine = make_engine()
    stream_to_engine(weights(), engine, bucket_mb=1)
    assert [c[0] for c in RecordingEngine.instances[-1].calls] == ["update_weights_from_tensor", "flush_cache"]


def test_original_logprob_env_is_refused(fake_sglang, monkeypatch):
    monkeypatch.setenv("SGLANG_RETURN_ORIGINAL_LOGPROB", "1")
    with pytest.raises(ValueError, match="SGLANG_RETURN_ORIGINAL_LOGPROB"):
        make_engine()
