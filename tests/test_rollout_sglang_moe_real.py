"""Mixture-of-experts on the REAL ``sglang.Engine`` (0.5.23) on CPU, in the CPU SGLang environment
(tests/mp/sglang_real_moe.py, one process, about a minute: two engine starts).

Pinned here (measured 2026-12 on the 2-core CPU without AMX): SGLang serves a tiny Qwen3-MoE
on CPU (its ``moe_forward_native`` fallback: the fused ``sgl_kernel`` CPU MoE op is used only
with AMX), takes megappo's per-expert weight names through its own ``load_weights``, and
samples with transformers' log-probs (a model without dense layers: SGLang's Qwen3-MoE does
not read ``mlp_only_layers``); it cannot return routed experts on CPU (the engine dies
at start), so rollout routing replay's SGLang decoding is tested by contract
(tests/test_rollout_sglang_contract.py, "routed_experts") and the replay itself with the
embedded engine.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from sglang_env import REPO, SKIP_REASON, sglang_env, sglang_python

WORKER = REPO / "tests/mp/sglang_real_moe.py"
PY = sglang_python()

pytestmark = [pytest.mark.slow, pytest.mark.skipif(PY is None, reason=SKIP_REASON)]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("sglang_moe")
    out = work / "result.json"
    proc = subprocess.run([str(PY), str(WORKER), "--out", str(out), "--work", str(work)],
                          env=sglang_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert out.exists(), f"the SGLang worker wrote no result (exit {proc.returncode}):\n{proc.stdout[-6000:]}"
    data = json.loads(out.read_text())
    assert "fatal" not in data, data["fatal"]["error"] + "\n" + proc.stdout[-4000:]
    return data


@pytest.mark.parametrize("name", ["moe_sync_per_expert_names_then_logprobs", "moe_dense_layers_not_read",
                                  "moe_return_routed_experts_cannot_start_on_cpu"])
def test_real_sglang_moe(results, name):
    assert name in results, sorted(results)
    assert results[name]["ok"], results[name].get("error", results[name])
