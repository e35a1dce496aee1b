"""A rollout failure (engine or reward) on one rank raises ``RolloutEngineError`` naming
the engine on every rank, promptly, at TP=2 (the engine rank's peer) and at DP=2 (the
other replica), under torchrun with gloo (tests/mp/rollout_errors.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hf_fixtures import run_mp

REPO = Path(__file__).resolve().parent.parent
ENGINE_ERROR = "embedded engine (cpu): generation failed: RuntimeError: CUDA error: an illegal memory access was encountered (injected)"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("errors") / "result.json"
    run_mp(REPO / "tests/mp/rollout_errors.py", 2, ["--out", str(out)], timeout=300)
    return json.loads(out.read_text())


def outcomes(results, case):
    return [r["outcome"] for r in results[case]]


@pytest.mark.slow
def test_the_replica_shares_one_experience(results):
    rank0, rank1 = results["ok"]
    assert rank0["ids"] == rank1["ids"] and len(rank0["ids"]) == 4  # 2 prompts x 2 samples
    assert rank0["cursor"] == rank1["cursor"] == 1
    assert rank0["evaluate"] == rank1["evaluate"] and rank0["evaluate"]["eval/num_samples"] == 4.0


@pytest.mark.slow
@pytest.mark.parametrize("case", ["generate", "evaluate"])
def test_engine_error_on_the_holder_raises_on_its_peer(results, case):
    holder, peer = outcomes(results, case)
    assert holder == f"RolloutEngineError: {ENGINE_ERROR}"
    assert peer == f"RolloutEngineError: rollout on rank 0 (data-parallel replica 0) failed: {ENGINE_ERROR}"
    assert max(r["seconds"] for r in results[case]) < 30  # not a process-group timeout (60 s)


@pytest.mark.slow
def test_reward_error_raises_on_every_rank(results):
    for outcome in outcomes(results, "reward"):
        assert outcome == "RolloutEngineError: rollout on rank 0 (data-parallel replica 0) failed: RuntimeError: reward pool died"


@pytest.mark.slow
@pytest.mark.parametrize("case, failed", [("replica1", 1), ("round2", 0)])
def test_engine_error_in_one_replica_raises_in_all(results, case, failed):
    for outcome in outcomes(results, case):
        assert outcome == f"RolloutEngineError: rollout failed: data-parallel replica {failed}: {ENGINE_ERROR}"
    assert max(r["seconds"] for r in results[case]) < 30
    if case == "round2":
        assert results["round2_cursor"] == [2, 2]  # both stopped after the failed second round
