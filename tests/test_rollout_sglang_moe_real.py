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


import pytest
from sglang_env import REPO, SKIP_REASON, run_sglang_worker, sglang_python

WORKER = REPO / "tests/mp/sglang_real_moe.py"
PY = sglang_python()

pytestmark = [pytest.mark.slow, pytest.mark.skipif(PY is None, reason=SKIP_REASON)]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_sglang_worker(WORKER, tmp_path_factory.mktemp("sglang_moe"), timeout=600)


@pytest.mark.parametrize("name", ["moe_sync_per_expert_names_then_logprobs", "moe_dense_layers_not_read",
                                  "moe_return_routed_experts_cannot_start_on_cpu"])
def test_real_sglang_moe(results, name):
    assert name in results, sorted(results)
    assert results[name]["ok"], results[name].get("error", results[name])
