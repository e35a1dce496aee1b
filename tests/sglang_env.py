"""Where the CPU SGLang environment is (built by ``make sglang-env`` / ``make test``), for the
tests that run the real SGLang engine and servers in their own processes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def sglang_python() -> Path | None:
    """The CPU SGLang environment's python (``MEGAPPO_SGLANG_PYTHON``, else .venv-sglang), or
    None when it is not built."""
    given = os.environ.get("MEGAPPO_SGLANG_PYTHON")
    path = Path(given) if given else REPO / ".venv-sglang" / "bin" / "python"
    return path if path.exists() else None


SKIP_REASON = "the CPU SGLang environment is not built (make sglang-env, or MEGAPPO_SGLANG_PYTHON=<its python>)"


def sglang_env(**extra: str) -> dict[str, str]:
    """Environment of a process in that environment: one OpenMP thread (2 shared cores)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    env.pop("PYTHONPATH", None)  # the SGLang venv has megappo installed (editable) itself
    return env


def run_sglang_worker(worker: Path, work: Path, *, timeout: int) -> dict:
    """Run ``worker --out work/result.json --work work`` under the SGLang environment's python
    and return its results (one entry per check); assertion errors carry the worker's output
    when it wrote nothing or failed before its checks (``fatal``)."""
    out = work / "result.json"
    proc = subprocess.run([str(sglang_python()), str(worker), "--out", str(out), "--work", str(work)],
                          env=sglang_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert out.exists(), f"the SGLang worker wrote no result (exit {proc.returncode}):\n{proc.stdout[-6000:]}"
    data = json.loads(out.read_text())
    assert "fatal" not in data, data["fatal"]["error"] + "\n" + proc.stdout[-4000:]
    return data
