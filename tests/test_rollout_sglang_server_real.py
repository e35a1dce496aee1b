"""``rollout.engine: sglang_server`` against two REAL SGLang 0.5.23 servers on 127.0.0.1 (CPU).

Our launcher (``megappo.rollout.sglang_launch``, the code path of
launch/slurm/sglang_servers.sbatch) starts both at once in the CPU SGLang environment, in
slots 0 and 1 of this node (their ports cannot clash with each other nor with the trainer's
``MASTER_PORT``; ``--sleep-on-idle`` and one OpenMP thread each, as two servers on two cores
need). This process is the trainer: generation over HTTP against transformers on the same
weights; the disaggregated update (``/init_weights_update_group`` over gloo,
``/begin_weight_update``, ``/update_weights_from_distributed`` in buckets while we broadcast,
``/end_weight_update``) then log-probs on the new weights and the checksum read back; each
hang seen for real (a rejected update during the broadcast, a dead trainer's group name, a
rendezvous nobody joins) ends in a bounded, named error; pause / continue / abort.
The servers start once for the module (about 30-60 s here).
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from sglang_env import SKIP_REASON, sglang_env, sglang_python

from megappo.rollout import RolloutEngineError, SamplingParams, checksums_match
from megappo.rollout.sglang_ports import SLOTS
from megappo.parallel.state import free_port
from megappo.rollout.sglang_server import SGLangServerEngine, join_update_group
from megappo.rollout.weight_sync import stream_to_engine

PY = sglang_python()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(PY is None, reason=SKIP_REASON)]
PROMPTS = [[1, 5, 6, 7], [1, 9], [1, 20, 21, 22, 23], [1, 30, 31]]
MASTER_PORT = "29500"  # torchrun's default: SGLang alone may draw it as an nccl_port


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    from hf_fixtures import make_tiny_hf_model, read_hf_state
    from transformers import AutoModelForCausalLM

    from megappo.rollout.sglang_launch import start_server, stop_server, wait_healthy

    work = tmp_path_factory.mktemp("sglang_servers")
    # no EOS: every response runs to max_new_tokens (the pause / abort tests need long ones)
    path = make_tiny_hf_model(work, "llama", eos_token_id=None, max_position_embeddings=4096)
    env = sglang_env(MASTER_PORT=MASTER_PORT)
    started = []
    try:
        for slot in (0, 1):
            extra = ["--dtype", "float32", "--log-level", "warning", "--max-total-tokens", "8192"]
            proc, url = start_server(str(path), slot=slot, extra=extra, python=str(PY), env=env, log_path=str(work / f"server{slot}.log"))
            started.append((proc, url))
        ready = [wait_healthy(url, proc, timeout_s=400) for proc, url in started]
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        yield {"procs": [p for p, _ in started], "urls": [u for _, u in started], "state": read_hf_state(path), "model": model, "ready_s": ready}
    finally:
        for proc, _ in started:
            stop_server(proc)


def hf_max_diff(model, groups, prompts, temperature):
    worst = 0.0
    for prompt, samples in zip(prompts, groups):
        for s in samples:
            ids = torch.tensor([list(prompt) + s.token_ids])
            with torch.no_grad():
                logits = model(ids).logits[0, len(prompt) - 1 : -1].double()
            ref = torch.log_softmax(logits / temperature, -1).gather(1, torch.tensor(s.token_ids).view(-1, 1)).view(-1)
            worst = max(worst, float((ref - torch.tensor(s.logprobs, dtype=torch.float64)).abs().max()))
    return worst


def engine_for(servers, **kw):
    return SGLangServerEngine(servers["urls"], timeout_s=kw.pop("timeout_s", 120), eos_token_ids=[], backend="gloo", **kw)


def flag(proc, name):
    args = proc.args
    return int(args[args.index(name) + 1])


def test_two_servers_on_one_node_get_ports_that_cannot_clash(servers):
    p0, p1 = servers["procs"]
    ports = [flag(p, "--port") for p in (p0, p1)]
    nccl = [flag(p, "--nccl-port") for p in (p0, p1)]
    assert len(set(ports + nccl)) == 4 and int(MASTER_PORT) not in ports + nccl
    assert [p % SLOTS for p in ports] == [0, 1] and [p % SLOTS for p in nccl] == [0, 1]
    for p in (p0, p1):
        assert "--sleep-on-idle" in p.args and "--skip-tokenizer-init" in p.args


def test_generation_over_http_matches_transformers(servers):
    engine = engine_for(servers)
    engine.health()
    out = engine.generate(PROMPTS, SamplingParams(n=2, temperature=0.8, top_k=30, max_new_tokens=12))
    assert [len(g) for g in out] == [2] * len(PROMPTS)
    assert all(len(s.token_ids) == 12 and s.finish_reason == "length" for g in out for s in g)
    assert hf_max_diff(servers["model"], out, PROMPTS, 0.8) <= 1e-4
    engine.shutdown()


def new_weights(state, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in state.items()}


def load_model(servers, state):
    servers["model"].load_state_dict(state, strict=True)
    return servers["model"]


def test_disaggregated_update_in_buckets_over_gloo(servers):
    engine = engine_for(servers)
    state = new_weights(servers["state"], 1)
    stats = stream_to_engine(sorted(state.items()), engine, bucket_mb=0.02, checksum=True)
    assert stats.num_buckets > 3
    assert checksums_match(engine.weights_checksum(), stats.checksum)  # read back from both servers
    out = engine.generate(PROMPTS, SamplingParams(n=2, temperature=1.0, max_new_tokens=10))
    assert hf_max_diff(load_model(servers, state), out, PROMPTS, 1.0) <= 1e-4
    # a second sync reuses the group
    state = new_weights(servers["state"], 2)
    stats = stream_to_engine(sorted(state.items()), engine, bucket_mb=0.05, checksum=True)
    assert checksums_match(engine.weights_checksum(), stats.checksum)
    assert hf_max_diff(load_model(servers, state), engine.generate(PROMPTS, SamplingParams(max_new_tokens=6)), PROMPTS, 1.0) <= 1e-4
    engine.shutdown()


def test_rejected_update_while_broadcasting_fails_fast_naming_the_server(servers):
    """Seen for real: an update outside a session is refused (400) before the server receives
    anything, and a trainer that waited for its broadcast hung forever."""
    engine = engine_for(servers, timeout_s=300)
    engine._sessions = False  # as if the servers were too old for /begin_weight_update: no session opened
    t0 = time.monotonic()
    with pytest.raises(RolloutEngineError, match=r"SGLang server http://127\.0\.0\.1:\d+: POST /update_weights_from_distributed answered 400"):
        stream_to_engine(sorted(servers["state"].items()), engine, bucket_mb=0.05)
    assert time.monotonic() - t0 < 60  # not the 300 s timeout
    assert engine._group is None  # abandoned, never reused


def test_a_dead_trainers_group_does_not_block_the_next(servers):
    """Seen for real: a trainer that died without destroying its group left the name taken,
    and the next trainer's init failed while its rendezvous waited 30 minutes."""
    dead = engine_for(servers)
    stream_to_engine(sorted(servers["state"].items()), dead, bucket_mb=0.05)
    dead._group = None  # dies: its group is never destroyed on the servers
    engine = engine_for(servers)
    state = new_weights(servers["state"], 3)
    stats = stream_to_engine(sorted(state.items()), engine, bucket_mb=0.05, checksum=True)
    assert engine._group_name != dead._group_name
    assert checksums_match(engine.weights_checksum(), stats.checksum)
    assert hf_max_diff(load_model(servers, state), engine.generate(PROMPTS, SamplingParams(max_new_tokens=6)), PROMPTS, 1.0) <= 1e-4
    engine.shutdown()


def test_a_rendezvous_nobody_joins_is_bounded():
    t0 = time.monotonic()
    with pytest.raises(Exception, match="(?i)timed? ?out|timeout"):
        join_update_group("127.0.0.1", free_port("127.0.0.1"), world_size=2, rank=0, backend="gloo", timeout_s=3)
    assert time.monotonic() - t0 < 30


def _in_thread(fn):
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def test_pause_continue_and_abort(servers):
    engine = engine_for(servers)
    # pause (retract) while a request is in flight: it waits, then finishes after continue
    t, box = _in_thread(lambda: engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=600)))
    time.sleep(1.0)
    engine.pause_generation("retract")
    time.sleep(2.0)
    assert t.is_alive(), box
    engine.continue_generation()
    t.join(120)
    assert not t.is_alive() and "error" not in box, box
    assert len(box["value"][0][0].token_ids) == 600

    # requests sent while paused, to both servers (they hold every generation thread), resume
    engine.pause_generation("retract")
    t, box = _in_thread(lambda: engine.generate(PROMPTS, SamplingParams(max_new_tokens=8)))
    time.sleep(2.0)
    assert t.is_alive() and not box
    t0 = time.monotonic()
    engine.continue_generation()
    t.join(120)
    assert not t.is_alive() and "error" not in box, box
    assert time.monotonic() - t0 < 60 and [len(g[0].token_ids) for g in box["value"]] == [8] * len(PROMPTS)

    # abort: the samples end with finish reason "abort", their tokens so far and log-probs
    t, box = _in_thread(lambda: engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=3000)))
    time.sleep(3)
    assert t.is_alive()
    engine.abort_requests()
    t.join(60)
    assert not t.is_alive() and "error" not in box, box
    samples = [g[0] for g in box["value"]]
    assert all(s.finish_reason == "abort" and 0 < len(s.token_ids) < 3000 for s in samples), samples
    assert hf_max_diff(servers["model"], box["value"], PROMPTS[:2], 1.0) <= 1e-4
    with pytest.raises(ValueError, match="pause_generation mode"):
        engine.pause_generation("later")
    engine.health()
    engine.shutdown()
