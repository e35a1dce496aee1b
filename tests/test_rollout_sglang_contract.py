"""Contract tests of the SGLang adapters against the installed SGLang's own code (sglang
>= 0.5.18, < 0.5.22): requests built as SGLang's ``io_struct`` classes, tensors through
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
EXTRA = os.environ.get("MEGAPPO_SGLANG_PATH")


def sglang_findable() -> bool:
    if EXTRA and (Path(EXTRA) / "sglang" / "__init__.py").exists():
        return True
    return importlib.util.find_spec("sglang") is not None


pytestmark = pytest.mark.skipif(
    not sglang_findable(),
    reason="sglang is not installed (pip install --no-deps 'sglang>=0.5.18,<0.5.22' plus its small deps, "
    "or set MEGAPPO_SGLANG_PATH to a pip --target directory holding it)",
)


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """Run the probe once; this process is rank 0 of the weight-update group."""
    import torch.distributed as dist

    from megappo.rollout.engine import checksum_of
    from megappo.rollout.sglang_protocol import flatten_bucket
    from megappo.rollout.sglang_server import _free_port, join_update_group

    spec = importlib.util.spec_from_file_location("rollout_sglang_probe", PROBE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    tensors = mod.probe_tensors()

    out = tmp_path_factory.mktemp("sglang") / "result.json"
    port = _free_port("127.0.0.1")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (EXTRA, str(REPO), env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        [sys.executable, str(PROBE), "--out", str(out), "--group-port", str(port)],
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
    "update_group_interop",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", CHECKS)
def test_sglang_contract(probe, name):
    results, _ = probe
    assert name in results, sorted(results)
    assert results[name]["ok"], results[name].get("error", results[name])


@pytest.mark.slow
def test_weights_broadcast_to_sglang_receiver_arrive_intact(probe):
    results, sent = probe
    assert results["update_group_interop"]["checksum"] == sent
