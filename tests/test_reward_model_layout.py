"""The reward model at its own TP x PP (``reward.model.tensor_model_parallel_size`` /
``pipeline_model_parallel_size``), not the actor's, on 2 gloo ranks: actor TP=2 with the reward
model at TP=1 (a full replica per rank) or PP=2, actor PP=2 with the reward model at TP=1, and
actor data-parallel (a different, uneven set of rows per rank) with the reward model at TP=2 or
PP=2. Every rank's scores equal transformers' AutoModelForSequenceClassification on its own rows
(fp32, 1e-4), Llama and Qwen2, tied and untied; ``LoopRewardModel`` too.

One shared launch of tests/mp/reward_model_layout_checks.py; these tests assert on its JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hf_fixtures import make_tiny_hf_reward_model, run_mp, write_char_tokenizer

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).parent / "mp" / "reward_model_layout_checks.py"
RM_KEYS = ("rm-llama-untied", "rm-llama-tied", "rm-qwen2-untied", "rm-qwen2-tied")
PHASES = ("atp2-rmdp2", "atp2-rmpp2", "app2-rmdp2", "adp2-rmtp2", "adp2-rmpp2")
TOL = 1e-4
# (actor TP, PP, DP), reward model (TP, PP, DP, shares the actor's layout)
EXPECTED = {
    "atp2-rmdp2": ((2, 1, 1), (1, 1, 2)),
    "atp2-rmpp2": ((2, 1, 1), (1, 2, 1)),
    "app2-rmdp2": ((1, 2, 1), (1, 1, 2)),
    "adp2-rmtp2": ((1, 1, 2), (2, 1, 1)),
    "adp2-rmpp2": ((1, 1, 2), (1, 2, 1)),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm-layout")
    zoo = {}
    for family in ("llama", "qwen2"):
        for tie in (False, True):
            p = make_tiny_hf_reward_model(root, family, tie=tie, seed=21 if tie else 22)
            zoo[p.name] = str(p)
    write_char_tokenizer(root / "policy-tok", 103, fused_decode=True)
    out = root / "out"
    out.mkdir()
    ctx = dict(zoo=zoo, policy_tok=str(root / "policy-tok"))
    error = None
    try:
        run_mp(SCRIPT, 2, ["--ctx", json.dumps(ctx), "--out", str(out), *PHASES], timeout=900)
    except AssertionError as e:
        error = str(e)

    def read(phase: str) -> list[dict]:
        files = sorted(out.glob(f"{phase}-rank*.json"))
        if len(files) != 2:
            pytest.fail(f"phase {phase} wrote {len(files)} of 2 files: {error}")
        return [json.loads(f.read_text()) for f in files]

    return read, error


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("key", RM_KEYS)
def test_each_ranks_scores_match_transformers(runs, phase, key):
    rows = runs[0](phase)
    assert [r[f"{key}/score_diff"] < TOL for r in rows] == [True, True], [r[f"{key}/score_diff"] for r in rows]
    actor_dp = EXPECTED[phase][0][2]
    # Data-parallel actor: the ranks hold different shards (5 and 3 rows), each scored as its own.
    assert [r[f"{key}/num_rows"] for r in rows] == ([5, 3] if actor_dp == 2 else [5, 5])


@pytest.mark.parametrize("phase", PHASES)
def test_the_reward_model_has_its_own_groups(runs, phase):
    actor, (tp, pp, dp) = EXPECTED[phase]
    rows = runs[0](phase)
    assert [r["actor"][:3] for r in rows] == [list(actor)] * 2
    for key in RM_KEYS:
        groups = [r[f"{key}/rm_groups"] for r in rows]
        assert [g[:3] for g in groups] == [[tp, pp, dp]] * 2 and not any(g[6] for g in groups)
        # Megatron's rank order: TP ranks adjacent, then replicas, then stages.
        assert [g[3:6] for g in groups] == {(2, 1, 1): [[0, 0, 0], [1, 0, 0]], (1, 2, 1): [[0, 0, 0], [0, 1, 0]],
                                            (1, 1, 2): [[0, 0, 0], [0, 0, 1]]}[(tp, pp, dp)]
        layers = [r[f"{key}/layers"] for r in rows]  # 4 layers, 1-based
        assert layers == ([[1, 2], [3, 4]] if pp == 2 else [[1, 2, 3, 4]] * 2)


@pytest.mark.parametrize("phase", PHASES)
def test_loop_reward_model_at_its_own_layout(runs, phase):
    _, (tp, pp, _) = EXPECTED[phase]
    for r in runs[0](phase):
        assert r["loop/rm_layout"] == [tp, pp] and r["loop/score_diff"] < TOL


def test_launch_succeeded(runs):
    assert runs[1] is None
