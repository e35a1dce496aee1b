"""Start SGLang HTTP servers for ``rollout.engine: sglang_server``: one code path for
``launch/slurm/sglang_servers.sbatch`` (one server per node) and the tests (servers on
127.0.0.1).

    python -m megappo.rollout.sglang_launch --model-path DIR --host 0.0.0.0 --port 30000 \\
        [--slot K] [any python -m sglang.launch_server option ...]

What it adds to SGLang's own flags: ``--skip-tokenizer-init`` (token ids in and out, as the
engine sends them); a ``--nccl-port`` (and ``--port`` when not given) from this server's slot
on the node (``megappo.rollout.sglang_ports``: servers in different slots never share a
port, and none takes the trainer's ``MASTER_PORT``; ``--slot`` defaults to
``SLURM_LOCALID`` or 0); a flag given by the user always wins. Without a CUDA device
(``--device cpu`` or none visible) SGLang's CPU path (``megappo.parallel.sglang_cpu``: for
tests and debugging; its ``--sleep-on-idle`` matters here: an idle scheduler otherwise
busy-polls a core, and two servers on two cores were 10-20x slower without it).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Optional, Sequence

from megappo.parallel import sglang_cpu
from megappo.rollout.sglang_ports import AGENT_STORE_ENV, engine_ports


def _flag_value(args: Sequence[str], flag: str) -> Optional[str]:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _has_flag(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def server_command(
    model_path: str, *, host: str, port: Optional[int], slot: int, extra: Sequence[str] = (), python: str = sys.executable,
    env: Optional[dict] = None,
) -> tuple[list[str], dict[str, str], int]:
    """``(argv, environment, port)`` of one ``python -m sglang.launch_server`` (module docstring)."""

    extra = list(extra)
    user = {"port": port, "nccl_port": _flag_value(extra, "--nccl-port")}
    device = _flag_value(extra, "--device")
    on_cpu = sglang_cpu.sglang_runs_on_cpu({"device": device} if device else {})
    ports = engine_ports(slot, {k: v for k, v in user.items() if v is not None})
    argv = [python, "-m", "sglang.launch_server", "--model-path", str(model_path), "--host", host, "--port", str(ports["port"])]
    if not _has_flag(extra, "--nccl-port"):
        argv += ["--nccl-port", str(ports["nccl_port"])]
    if not _has_flag(extra, "--skip-tokenizer-init"):
        argv.append("--skip-tokenizer-init")
    run_env = dict(os.environ if env is None else env)
    run_env.pop(AGENT_STORE_ENV, None)  # a server started from a torchrun worker hosts its own TP store
    if on_cpu:
        defaults = sglang_cpu.cpu_server_flags()
        i = 0
        while i < len(defaults):  # add each CPU default the user did not set
            flag = defaults[i]
            takes_value = i + 1 < len(defaults) and not defaults[i + 1].startswith("--")
            if not _has_flag(extra, flag):
                argv += defaults[i : i + 1 + takes_value]
            i += 1 + takes_value
        run_env = sglang_cpu.cpu_environment(run_env)
        run_env.setdefault("OMP_NUM_THREADS", "1")
    return argv + extra, run_env, int(ports["port"])


def start_server(model_path: str, *, host: str = "127.0.0.1", port: Optional[int] = None, slot: int = 0, extra: Sequence[str] = (),
                 python: str = sys.executable, env: Optional[dict] = None, log_path: Optional[str] = None) -> tuple[subprocess.Popen, str]:
    """Start one server in its own session (so ``stop_server`` ends its whole tree); returns
    ``(process, url)``. Does not wait for it: see ``wait_healthy``."""
    argv, run_env, chosen = server_command(model_path, host=host, port=port, slot=slot, extra=extra, python=python, env=env)
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(argv, env=run_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return proc, f"http://{url_host}:{chosen}"


def wait_healthy(url: str, proc: Optional[subprocess.Popen], timeout_s: float) -> float:
    """Seconds until ``GET url/health`` answers 200; ``RuntimeError`` when the process exits
    first or ``timeout_s`` passes."""
    start = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as resp:
                if resp.status == 200:
                    return time.monotonic() - start
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"SGLang server for {url} exited with status {proc.returncode} before /health answered")
        if time.monotonic() - start > timeout_s:
            raise RuntimeError(f"SGLang server {url}: /health did not answer within {timeout_s:g} s")
        time.sleep(1.0)


def stop_server(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM to the server's process group (it was started in its own session), then
    SIGKILL after ``timeout_s``."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout_s)
    except ProcessLookupError:
        pass


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--slot", type=int, default=int(os.environ.get("SLURM_LOCALID", "0")))
    parser.add_argument("--print-only", action="store_true", help="print the command as JSON and exit")
    args, extra = parser.parse_known_args(argv)
    cmd, env, port = server_command(args.model_path, host=args.host, port=args.port, slot=args.slot, extra=extra)
    if args.print_only:
        print(json.dumps({"argv": cmd, "port": port, "SGLANG_USE_CPU_ENGINE": env.get("SGLANG_USE_CPU_ENGINE")}))
        return
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, env)


if __name__ == "__main__":
    main()
