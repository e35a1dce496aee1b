"""Contract tests of the SGLang adapters against SGLang's own code, for the oldest and the
newest supported release (0.5.18: a ``--no-deps --target`` folder on top of .venv; 0.5.23:
the CPU SGLang environment .venv-sglang; both built by ``make test``): requests built as SGLang's ``io_struct`` classes, tensors through
SGLang's ``MultiprocessingSerializer`` and ``FlattenedTensorBucket``, ``rollout.sglang``
keys checked against its ``ServerArgs``, Engine / HTTP signatures, and the weight-update
group joined by SGLang's ``init_custom_process_group`` on one side and ours on the other.

Skipped when SGLang is not installed. It installs on CPU without its CUDA dependencies:
    PIP_CONSTRAINT=constraints.txt pip install --no-deps sglang==0.5.21 <small deps>
(the list is in the rollout report / CI). ``MEGAPPO_SGLANG_PATH`` may name a directory
holding such a ``pip install --target`` instead of the environment itself. The checks run
in a separate process (``tests/mp/rollout_sglang_probe.py``): importing SGLang patches
``transformers`` process-wide, so ``pytest.importorskip`` would leak that into this session.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROBE = REPO / "tests/mp/rollout_sglang_probe.py"
EXTRA = os.environ.get("MEGAPPO_SGLANG_PATH") or str(REPO / ".venv/sglang-0.5.18")


def oldest_findable() -> bool:
    if (Path(EXTRA) / "sglang" / "__init__.py").exists():
        return True
    return importlib.util.find_spec("sglang") is not None


def probe_command(which: str) -> tuple[list[str], dict]:
    """(python, environment) of the probe for ``which`` ("oldest" / "newest"); skips when absent."""
    from sglang_env import SKIP_REASON, sglang_env, sglang_python

    if which == "oldest":
        if not oldest_findable():
            pytest.skip("sglang 0.5.18 is not installed (make sglang-env, or MEGAPPO_SGLANG_PATH=<pip --target folder>)")
        from megappo.parallel.sglang_cpu import SHIMS_DIR  # torchvision's schemas (the folder holds a CUDA-linked build)

        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SHIMS_DIR), EXTRA, str(REPO), env.get("PYTHONPATH")) if p)
        return [sys.executable], env
    py = sglang_python()
    if py is None:
        pytest.skip(SKIP_REASON)
    return [str(py)], sglang_env(SGLANG_USE_CPU_ENGINE="1")


@pytest.fixture(scope="module", params=["oldest", "newest"])
def probe(request, tmp_path_factory):
    """Run the probe once per SGLang release; this process is rank 0 of the weight-update group."""
    import torch.distributed as dist

    from megappo.rollout.engine import checksum_of
    from megappo.rollout.sglang_protocol import flatten_bucket
    from megappo.parallel.state import free_port
    from megappo.rollout.sglang_server import join_update_group

    spec = importlib.util.spec_from_file_location("rollout_sglang_probe", PROBE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    tensors = mod.probe_tensors()

    python, env = probe_command(request.param)
    out = tmp_path_factory.mktemp("sglang") / "result.json"
    port = free_port("127.0.0.1")
    proc = subprocess.Popen(
        python + [str(PROBE), "--out", str(out), "--group-port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    sent = None
    try:
        pg = join_update_group("127.0.0.1", port, world_size=2, rank=0, backend="gloo", timeout_s=600)
        dist.broadcast(flatten_bucket(tensors), group=pg, group_src=0)
        dist.destroy_process_group(pg)
        sent = checksum_of(tensors)
    finally:
        output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-4000:]
    return json.loads(out.read_text()), sent


CHECKS = [
    "version", "server_args", "generate_request", "control_requests", "flattened_bucket_roundtrip",
    "engine_api", "http_routes", "weights_read_back", "bucketed_distributed_receive", "logprobs_after_temperature",
    "update_group_interop", "routed_experts",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", CHECKS)
def test_sglang_contract(probe, name):
    results, _ = probe
    assert name in results, sorted(results)
    assert results[name]["ok"], results[name].get("error", results[name])


@pytest.mark.slow
def test_the_probed_releases_are_the_supported_bounds(probe, request):
    results, _ = probe
    expected = {"oldest": "0.5.18", "newest": "0.5.23"}[request.node.callspec.params["probe"]]
    assert results["version"]["version"] == expected


@pytest.mark.slow
def test_weights_broadcast_to_sglang_receiver_arrive_intact(probe):
    results, sent = probe
    assert results["update_group_interop"]["checksum"] == sent
