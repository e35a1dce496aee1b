"""``sglang_server`` engine against local stand-in servers on 127.0.0.1: generation spread
over servers and put back in order, errors and timeouts that name the URL, and (slow,
separate processes) weight updates over a gloo group with SGLang's request sequence."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from megappo.rollout import RolloutEngineError, SamplingParams, checksum_of, checksums_match
from megappo.rollout.engine import combine_checksums, spot_checksum
from megappo.rollout.sglang_protocol import choose_spots
from megappo.rollout.sglang_server import SGLangServerEngine
from megappo.rollout.weight_sync import stream_to_engine

REPO = Path(__file__).resolve().parent.parent
FAKE = REPO / "tests/mp/rollout_fake_sglang_server.py"


def _fake_module():
    spec = importlib.util.spec_from_file_location("rollout_fake_sglang_server", FAKE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class LocalServer:
    """A ThreadingHTTPServer on 127.0.0.1 in this process; ``behave(handler, path, body)``
    answers each request. Records the bodies it got."""

    def __init__(self, behave):
        self.requests: list[tuple[str, object]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _serve(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n)) if n else None
                outer.requests.append((self.path, body))
                status, payload = behave(self.path, body)
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout tests)
                    pass

            do_GET = do_POST = _serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def servers():
    made = []

    def make(behave):
        s = LocalServer(behave)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def generating(path, body):
    if path == "/generate":
        return 200, _fake_module().fake_generate(body)
    if path == "/health":
        return 200, None
    return 404, {"detail": "Not Found"}


def test_generate_spreads_prompts_and_keeps_order(servers):
    a, b = servers(generating), servers(generating)
    engine = SGLangServerEngine([a.url, b.url + "/"], timeout_s=10, eos_token_ids=[2], backend="gloo")
    prompts = [[10], [20, 21], [30], [40, 41, 42], [50]]
    progress = []
    out = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=4, stop_token_ids=(33,)), on_progress=progress.append)
    assert sorted(progress) == [2, 3]  # each server's share as it comes back
    assert [[s.token_ids for s in g] for g in out] == [
        [[11, 12, 13, 14], [12, 13, 14, 15]], [[22, 23, 24, 25], [23, 24, 25, 26]],
        [[31, 32, 33], [32, 33]], [[43, 44, 45, 46], [44, 45, 46, 47]], [[51, 52, 53, 54], [52, 53, 54, 55]],
    ]
    assert out[2][0].finish_reason == "stop" and out[0][0].finish_reason == "length"
    assert out[0][0].logprobs == pytest.approx([-0.5, -0.51, -0.52, -0.53])
    bodies = {srv.url: [body for path, body in srv.requests if path == "/generate"] for srv in (a, b)}
    assert [p for body in bodies[a.url] for p in body["input_ids"]] == [[10], [30], [50]]
    assert [p for body in bodies[b.url] for p in body["input_ids"]] == [[20, 21], [40, 41, 42]]
    body = bodies[a.url][0]
    assert body["return_logprob"] is True
    assert body["sampling_params"] == {
        "n": 2, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": 4, "stop_token_ids": [2, 33], "skip_special_tokens": False,
    }
    engine.health()
    engine.shutdown()


def test_a_hanging_server_times_out_naming_its_url(servers):
    def sleepy(path, body):
        time.sleep(3)
        return 200, None

    ok, slow = servers(generating), servers(sleepy)
    engine = SGLangServerEngine([ok.url, slow.url], timeout_s=0.5, eos_token_ids=[2], backend="gloo")
    start = time.perf_counter()
    with pytest.raises(RolloutEngineError, match=rf"SGLang server {slow.url}: POST /generate timed out after 0.5 s"):
        engine.generate([[1], [2]], SamplingParams(max_new_tokens=2))
    assert time.perf_counter() - start < 2.5
    with pytest.raises(RolloutEngineError, match=rf"SGLang server {slow.url}: GET /health timed out"):
        engine.health()
    engine.shutdown()


def test_error_answers_name_the_url(servers):
    def unhealthy(path, body):
        if path == "/health":
            return 503, None
        if path == "/generate":
            n = len(body["input_ids"]) * body["sampling_params"]["n"]
            return 200, [{"meta_info": {"finish_reason": {"type": "abort", "message": "out of memory"}, "output_token_logprobs": []}}] * n
        return 404, None

    bad = servers(unhealthy)
    engine = SGLangServerEngine([bad.url], timeout_s=5, eos_token_ids=[2], backend="gloo")
    with pytest.raises(RolloutEngineError, match=rf"SGLang server {bad.url}: GET /health answered 503"):
        engine.health()
    with pytest.raises(RolloutEngineError, match=rf"SGLang server {bad.url}: request ended with finish reason 'abort': out of memory"):
        engine.generate([[1]], SamplingParams())
    closed = LocalServer(generating)
    closed.close()
    gone = SGLangServerEngine([closed.url], timeout_s=5, eos_token_ids=[2], backend="gloo")
    with pytest.raises(RolloutEngineError, match=rf"SGLang server {closed.url}: POST /generate failed"):
        gone.generate([[1]], SamplingParams())
    engine.shutdown()
    gone.shutdown()


def test_weights_checksum_reads_every_server_and_names_disagreement(servers):
    held = {"a.weight": torch.arange(12.0).reshape(6, 2), "b.bias": torch.arange(3.0)}

    def holding(weights):
        def behave(path, body):
            if path == "/get_weights_by_name":
                if body["name"] not in weights:
                    return 400, {"error": {"message": "Get parameter by name failed"}}
                return 200, weights[body["name"]].tolist()[: body["truncate_size"]]
            return 404, None

        return behave

    same, other = servers(holding(dict(held))), servers(holding(dict(held)))
    engine = SGLangServerEngine([same.url, other.url], timeout_s=5, eos_token_ids=[2], backend="gloo")
    with pytest.raises(RolloutEngineError, match="no complete weight sync"):
        engine.weights_checksum()
    engine._spots = {name: tuple(t.shape) for name, t in held.items()}  # as the last sync chose them
    assert checksums_match(engine.weights_checksum(), combine_checksums({n: spot_checksum(n, t) for n, t in held.items()}))
    assert [b for p, b in same.requests if p == "/get_weights_by_name"] == [{"name": "a.weight", "truncate_size": 4}, {"name": "b.bias", "truncate_size": 4}]
    differing = servers(holding({**held, "b.bias": held["b.bias"] + 1}))  # the second server holds other weights
    engine.urls[1] = differing.url
    with pytest.raises(RolloutEngineError, match=rf"the servers hold different weights: \['{differing.url}'\]"):
        engine.weights_checksum()
    engine.urls[1] = servers(holding({})).url
    with pytest.raises(RolloutEngineError, match=r"POST /get_weights_by_name answered 400"):
        engine.weights_checksum()
    engine.shutdown()


def test_only_the_owner_sends_weights():
    engine = SGLangServerEngine(["http://127.0.0.1:9"], timeout_s=1, eos_token_ids=[2], owns_weight_updates=False, backend="gloo")
    assert engine.receives_weights is False
    with pytest.raises(RolloutEngineError, match="does not send weights"):
        engine.update_weights([])
    engine.shutdown()


# ---- weight updates against stand-in servers in their own processes --------------------


@pytest.fixture
def fake_server_procs(tmp_path):
    procs = []

    def start(*flags):
        port_file = tmp_path / f"port{len(procs)}"
        env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
        proc = subprocess.Popen([sys.executable, str(FAKE), "--port-file", str(port_file), *flags], env=env)
        procs.append(proc)
        deadline = time.time() + 120
        while not port_file.exists():
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"fake SGLang server did not start (exit {proc.poll()})")
            time.sleep(0.1)
        return f"http://127.0.0.1:{port_file.read_text()}"

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=30)


def server_checksum(url):
    with urllib.request.urlopen(url + "/megappo_test/checksum", timeout=10) as r:
        return json.loads(r.read())


def weights(seed):
    g = torch.Generator().manual_seed(seed)
    return [
        ("model.embed_tokens.weight", torch.randn(50, 16, generator=g)),
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(16, 16, generator=g).to(torch.bfloat16)),
        ("model.layers.0.self_attn.q_proj.bias", torch.randn(16, generator=g)),
        ("model.norm.weight", torch.randn(16, generator=g)),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("sessions", [True, False], ids=["0.5.21-sessions", "0.5.18-no-sessions"])
def test_weights_reach_every_server(fake_server_procs, sessions):
    flags = ["--sessions"] if sessions else []
    urls = [fake_server_procs(*flags), fake_server_procs(*flags)]
    engine = SGLangServerEngine(urls, timeout_s=60, eos_token_ids=[2], backend="gloo")
    try:
        for seed in (0, 1):  # the second sync reuses the group
            tensors = weights(seed)
            stats = stream_to_engine(tensors, engine, bucket_mb=3000 / 2**20, checksum=True)
            assert stats.num_buckets == 2  # 3200 bytes alone, then 640
            assert engine.checksum_scope() == choose_spots({n: tuple(t.shape) for n, t in tensors})
            assert checksums_match(engine.weights_checksum(), stats.checksum)  # read back from the servers
            expected = checksum_of(tensors)
            for url in urls:
                got = server_checksum(url)
                assert got["names"] == sorted(n for n, _ in tensors)
                assert checksums_match(got["checksum"], expected)
    finally:
        engine.shutdown()


@pytest.mark.slow
def test_a_failing_weight_update_names_the_server(fake_server_procs):
    url = fake_server_procs("--sessions", "--fail-update")
    engine = SGLangServerEngine([url], timeout_s=5, eos_token_ids=[2], backend="gloo")
    with pytest.raises(RolloutEngineError, match=rf"SGLang server {url}: POST /update_weights_from_distributed answered 400: .*injected"):
        stream_to_engine(weights(0), engine, bucket_mb=1)
    assert engine._group is None  # abandoned, rebuilt on the next sync
    engine.shutdown()
