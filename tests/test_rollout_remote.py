"""``RemoteEngine`` against the engine it forwards to, in one process: the rollout rank's
``serve`` in a thread, the trainer's holder in the test, the link over a real TCP store and a
real two-rank gloo group. The remote engine must be indistinguishable from the local one
(the same samples, the same checksum), quote the engine's errors naming the rollout rank,
recover from a failed sync, answer an abort while a generate is in flight, and name a rollout
rank that stops beating within the timeout."""

from __future__ import annotations

import datetime
import threading
import time

import pytest
import torch
import torch.distributed as dist
from test_rollout_embedded import PROMPTS, hf_tensors, make_trainer_model

from megappo.config import Config
from megappo.parallel.placement import Placement
from megappo.parallel.state import free_port
from megappo.rollout import RolloutEngineError, SamplingParams, checksum_of, checksums_match
from megappo.rollout.embedded import EmbeddedEngine
from megappo.rollout.remote import RemoteEngine, serve
from megappo.rollout.weight_sync import stream_to_engine

TIMEOUT_S = 2.0


@pytest.fixture()
def link():
    """(the trainer's RemoteEngine, the rollout rank's placement, serve's exit status holder, the model)."""
    port = free_port()
    master = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=30))
    trainer, rollout = (Placement(rank, 2, 1, rank, TIMEOUT_S, dist.TCPStore("127.0.0.1", port, is_master=False),
                                  ("127.0.0.1", port)) for rank in (0, 1))
    for p in (trainer, rollout):
        p.start_heartbeat()
    cfg, model = make_trainer_model("qwen2")
    status = {}
    server = threading.Thread(target=lambda: status.update(code=serve(Config(), rollout)), daemon=True)
    server.start()
    remote = RemoteEngine.connect(trainer, replica=0, spec={"hf_config": cfg, "hf_dir": None, "eos_token_ids": [],
                                                            "seed": 0}, device=torch.device("cpu"))
    yield remote, rollout, status, server, (cfg, model)
    remote.shutdown()
    trainer.mark_exit()  # a server that lost its trainer's heartbeat-less link stops on this too
    server.join(timeout=10)
    rollout.mark_exit()
    assert not server.is_alive()
    del master


def test_remote_engine_is_the_local_engine(link):
    remote, _, status, server, (cfg, model) = link
    assert "on rollout rank 1 (" in remote.name and "(pid " in remote.name
    local = EmbeddedEngine(cfg, eos_token_ids=[])  # no stop token: every response runs to its length
    stats = stream_to_engine(hf_tensors(model), remote, bucket_mb=0.05, checksum=True)  # many small buckets
    stream_to_engine(hf_tensors(model), local, bucket_mb=0.05)
    assert stats.num_buckets > 3
    assert checksums_match(remote.weights_checksum(), stats.checksum)
    assert checksums_match(remote.weights_checksum(), checksum_of(hf_tensors(model)))
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=6, seed=11)
    assert remote.generate(PROMPTS, params) == local.generate(PROMPTS, params)
    remote.shutdown()
    server.join(timeout=10)
    assert status == {"code": 0}


def test_errors_come_back_naming_the_rank_and_a_failed_sync_is_recoverable(link):
    remote, _, _, _, (cfg, model) = link
    bad = [("model.no_such.weight", torch.zeros(3))] + hf_tensors(model)
    with pytest.raises(RolloutEngineError, match=r"on rollout rank 1 \(.*unknown weight 'model.no_such.weight'"):
        stream_to_engine(bad, remote, bucket_mb=0.05)
    with pytest.raises(RolloutEngineError, match="no complete weight sync"):
        remote.generate(PROMPTS, SamplingParams(max_new_tokens=2))

    def broken():
        yield from hf_tensors(model)[:3]
        raise ValueError("the trainer's gather failed")

    with pytest.raises(ValueError, match="gather failed"):
        stream_to_engine(broken(), remote, bucket_mb=0.05)
    stream_to_engine(hf_tensors(model), remote, bucket_mb=0.05)  # the link still works after both
    assert len(remote.generate(PROMPTS, SamplingParams(max_new_tokens=2))) == len(PROMPTS)


def test_abort_is_answered_while_a_generate_runs(link):
    remote, _, _, _, (cfg, model) = link
    stream_to_engine(hf_tensors(model), remote, bucket_mb=1)
    params = SamplingParams(n=64, max_new_tokens=2000, seed=1)  # long: the abort lands inside it
    out = {}
    worker = threading.Thread(target=lambda: out.update(samples=remote.generate([[5, 6]], params)))
    worker.start()
    time.sleep(0.5)
    remote.abort_requests()
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert {s.finish_reason for s in out["samples"][0]} == {"abort"}
    assert 0 < len(out["samples"][0][0].token_ids) < 2000


def test_a_silent_rollout_rank_is_named_within_the_timeout(link):
    remote, rollout, _, _, (cfg, model) = link
    stream_to_engine(hf_tensors(model), remote, bucket_mb=1)
    rollout._stop.set()  # the rollout rank stops beating (as if frozen) but its server still listens
    start = time.monotonic()
    with pytest.raises(RolloutEngineError, match=r"rollout rank 1 \(.*\) gave no heartbeat for"):
        remote.generate([[5, 6]], SamplingParams(n=64, max_new_tokens=4000, seed=1))
    assert time.monotonic() - start < TIMEOUT_S + 3
    with pytest.raises(RolloutEngineError, match="gave no heartbeat"):  # later calls fail at once
        remote.health()
