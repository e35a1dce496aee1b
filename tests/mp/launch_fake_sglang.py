"""A stand-in for ``python -m sglang.launch_server`` (SGLang does not run on CPU).

tests/test_launch_slurm.py copies this file to ``<tmp>/sglang/launch_server.py`` and puts
``<tmp>`` first on PYTHONPATH, so launch/slurm/sglang_servers.sbatch starts it unchanged. It
answers ``GET /health`` with 200 after ``--fake-startup-s`` seconds (as a loading server
would) and records the model path it was given; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import http.server
import json
import signal
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--fake-startup-s", type=float, default=1.0)
    args, rest = parser.parse_known_args()
    ready_at = time.monotonic() + args.fake_startup_s

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path == "/health" and time.monotonic() >= ready_at:
                body, code = b"", 200
            elif self.path == "/get_model_info":
                body, code = json.dumps({"model_path": args.model_path, "extra_args": rest}).encode(), 200
            else:
                body, code = b"loading", 503
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *fmt_args) -> None:
            print(fmt % fmt_args, flush=True)

    server = http.server.HTTPServer((args.host, args.port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"fake sglang server for {args.model_path} on {args.host}:{args.port} (extra {rest})", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
