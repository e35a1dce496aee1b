"""A stand-in for an SGLang HTTP server (``sglang.srt.entrypoints.http_server``) with the
routes ``megappo.rollout.sglang_server`` uses, for tests on CPU (SGLang needs CUDA).

Weight updates behave as SGLang's do: ``/init_weights_update_group`` joins the group as
rank ``rank_offset`` (tp_size 1); ``/update_weights_from_distributed`` with
``load_format=flattened_bucket`` allocates the named tensors, receives one broadcast of
their bytes end to end from rank 0 and keeps them; 0.5.21 sessions are enforced
(``--sessions``) or the session routes answer 404 (0.5.18). ``--fail-update`` answers 400
to weight updates without joining the broadcast. ``/generate`` answers deterministic
samples (token t+1 after t, log-prob -0.5 - 0.01 * step) with the finish reason
``length``, or ``stop`` at the first stop id. ``/get_weights_by_name`` answers as SGLang's
(the first ``truncate_size`` rows as float32 lists; 400 for an unknown name). Test-only:
``GET /megappo_test/checksum``.

Run: python rollout_fake_sglang_server.py --port-file F [--sessions] [--fail-update]
(the bound port is written to F once the server listens).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megappo.rollout.engine import checksum_of  # noqa: E402
from megappo.rollout.sglang_server import join_update_group  # noqa: E402

STATE: dict = {"group": None, "session": False, "weights": {}, "args": None, "lock": threading.Lock()}


def fake_generate(body: dict) -> list[dict]:
    sp = body["sampling_params"]
    stops = set(sp.get("stop_token_ids") or [])
    outs = []
    for prompt in body["input_ids"]:
        for j in range(sp.get("n", 1)):
            toks, reason = [], "length"
            t = prompt[-1] + j
            for step in range(sp["max_new_tokens"]):
                t = t + 1
                toks.append(t)
                if t in stops:
                    reason = "stop"
                    break
            triples = [[-0.5 - 0.01 * k, tok, None] for k, tok in enumerate(toks)]
            outs.append({"text": "", "output_ids": toks, "meta_info": {"finish_reason": {"type": reason}, "output_token_logprobs": triples}})
    return outs


def receive_bucket(body: dict) -> None:
    group = STATE["group"]
    named = [(n, torch.empty(s, dtype=getattr(torch, d))) for n, d, s in zip(body["names"], body["dtypes"], body["shapes"])]
    flat = torch.cat([t.reshape(-1).view(torch.uint8) for _, t in named])
    dist.broadcast(flat, group=group, group_src=0)
    offset = 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        STATE["weights"][name] = flat[offset : offset + nbytes].view(t.dtype).reshape(t.shape).clone()
        offset += nbytes


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def _answer(self, status: int, payload) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            return self._answer(200, None)
        if self.path == "/get_server_info":
            return self._answer(200, {"tp_size": 1, "version": "fake"})
        if self.path == "/megappo_test/checksum":
            w = STATE["weights"]
            return self._answer(200, {"checksum": checksum_of(w.items()) if w else None, "names": sorted(w)})
        if self.path == "/flush_cache":
            return self._answer(200, "Cache flushed.")
        return self._answer(404, {"detail": "Not Found"})

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        args = STATE["args"]
        if self.path == "/generate":
            return self._answer(200, fake_generate(body))
        if self.path == "/flush_cache":
            return self._answer(200, "Cache flushed.")
        if self.path == "/get_weights_by_name":
            t = STATE["weights"].get(body["name"])
            if t is None:
                return self._answer(400, {"error": {"message": "Get parameter by name failed"}})
            return self._answer(200, t.float().tolist()[: body["truncate_size"]])
        if self.path in ("/begin_weight_update", "/end_weight_update"):
            if not args.sessions:
                return self._answer(404, {"detail": "Not Found"})
            opening = self.path == "/begin_weight_update"
            if STATE["session"] == opening:
                return self._answer(400, {"success": False, "message": f"session already {'open' if opening else 'closed'}"})
            STATE["session"] = opening
            return self._answer(200, {"success": True, "message": "Success"})
        if self.path == "/init_weights_update_group":
            STATE["group"] = join_update_group(
                body["master_address"], body["master_port"], world_size=body["world_size"], rank=body["rank_offset"],
                backend=body["backend"], timeout_s=60, group_name=body["group_name"],
            )
            return self._answer(200, {"success": True, "message": "Succeeded to initialize custom process group."})
        if self.path == "/update_weights_from_distributed":
            if args.fail_update:
                return self._answer(400, {"success": False, "message": "Failed to update parameter online: injected"})
            if args.sessions and not STATE["session"]:
                return self._answer(400, {"success": False, "message": "update_weights_from_distributed must run between begin_weight_update() and end_weight_update()"})
            assert body["load_format"] == "flattened_bucket" and body["flush_cache"] is False
            with STATE["lock"]:
                receive_bucket(body)
            return self._answer(200, {"success": True, "message": "Succeeded to update parameter online."})
        if self.path == "/destroy_weights_update_group":
            group, STATE["group"] = STATE["group"], None
            if group is not None:
                dist.destroy_process_group(group)
            return self._answer(200, {"success": True, "message": "Succeeded to destroy custom process group."})
        return self._answer(404, {"detail": "Not Found"})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--sessions", action="store_true")
    ap.add_argument("--fail-update", action="store_true")
    STATE["args"] = ap.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    tmp = Path(STATE["args"].port_file + ".tmp")
    tmp.write_text(str(server.server_address[1]))
    tmp.rename(STATE["args"].port_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
