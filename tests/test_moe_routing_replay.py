"""Routing replay (``BuildOptions.routing_replay``, ``megappo.models.routing``) in one process.

A tiny Mixtral (4 experts, top-2) whose router rows are 2v, v, v, -v: every token's second
expert sits exactly on a tie between experts 1 and 2. The actor records its experts in the
forward-only pass (the old log-probs); then router row 2 is nudged by 1e-4 of itself, which
flips every token's second expert (to 2 where h.v > 0, to 1 where h.v < 0), as float noise
between two passes would at a near-tie. With replay the training pass uses the recorded
experts and ``moe/routing_changed_frac`` is 1; the ratio moves only by the nudge's smooth
effect on the replayed experts' probabilities (measured 5.2e-6: replay keeps the router's
current scores at the recorded experts, so the router still learns), and with the router
unchanged it is exactly 1. Without replay the same pass routes to the other experts and the
ratio jumps (measured > 1e-2).
Rows regrouped between the passes (reversed order, more micro-batches) still find their
recording (keyed by tokens).

Rollout routing replay (``routing_replay_source="rollout"``): a tiny Qwen3-MoE (layer 1 dense)
with the same kind of tie, nudged apart in opposite directions in the engine (expert 2 ahead
by 1e-5 of itself) and in the trainer (behind): it stands for the engine-vs-trainer numerics
that decide a near-tie differently, so the trainer's free routing differs from the engine's
at every token's second expert. The embedded engine samples and reports its experts; the
trainer replaying them reproduces the engine's log-probs (up to the nudge's smooth effect on
the replayed experts' weights), without replay it does not, and the first step's ratio
(old log-probs and update both replaying the engine's routing) is exactly 1. Runs as a child process (``CUDA_VISIBLE_DEVICES=``, Megatron's
state out of the pytest process), asserting on its JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("replay")
    out = work / "results.json"
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'tests'}", "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, __file__, "--out", str(out), "--workdir", str(work)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"replay checks failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    return json.loads(out.read_text())


def test_replay_gives_a_first_ratio_of_exactly_one_with_the_recording_router(results):
    assert results["replay_unchanged"]["max_abs_ratio_minus_1"] == 0.0
    assert results["replay_unchanged"]["moe/routing_changed_frac"] == 0.0


def test_replay_keeps_the_ratio_at_one_through_a_routing_flip(results):
    r = results["replay"]
    assert r["max_abs_ratio_minus_1"] < 1e-5
    assert r["max_abs_ratio_minus_1"] < results["free"]["max_abs_ratio_minus_1"] / 1000
    assert r["moe/routing_changed_frac"] == 1.0  # every token would have flipped
    assert r["moe/router_entropy"] > 0.1


def test_without_replay_the_flip_moves_the_ratio(results):
    r = results["free"]
    assert r["max_abs_ratio_minus_1"] > 1e-2
    assert "moe/routing_changed_frac" not in r  # nothing replayed, nothing compared
    assert r["moe/expert_load_max_over_mean"] >= 1.0
    # Mixtral's router_aux_loss_coef 0.02 is on by default: Megatron's unscaled load-balancing
    # loss (E * sum_i f_i P_i; 1 at perfect balance, top-2 of 4 experts)
    assert 0.5 < r["moe/load_balancing_loss"] < 4.0


def test_replaying_the_rollout_routing_gives_the_engines_logprobs(results):
    r, free = results["rollout_replay"], results["rollout_free"]
    assert r["max_abs_engine_minus_trainer"] < 1e-5
    assert free["max_abs_engine_minus_trainer"] > 1e-3  # the trainer's own routing differs from the engine's
    assert r["max_abs_ratio_minus_1"] == 0.0  # old log-probs and update replay the same experts
    # the trainer's free routing against the engine's (second experts flip; the first is 0 or 3 alike)
    assert r["old_pass"]["moe/rollout_routing_changed_frac"] > 0.9 and r["old_pass"]["moe/routing_changed_frac"] > 0.9
    assert free["old_pass"]["moe/rollout_routing_changed_frac"] > 0.9 and "moe/routing_changed_frac" not in free["old_pass"]
    assert "moe/replay_missing_rows" not in r


def test_replay_follows_rows_regrouped_between_the_passes(results):
    r = results["regrouped"]
    assert r["max_abs_ratio_minus_1"] < 1e-5
    assert r["moe/routing_changed_frac"] == 1.0 and "moe/replay_missing_rows" not in r


# ------------------------------------------------------------------------------ the child process


def _child(out: str, workdir: str) -> None:
    import torch

    from hf_fixtures import make_tiny_hf_model
    from megappo.models import BuildOptions, MegatronPolicy, ModelSpec, OptimizerSettings, TokenBatch
    from megappo.parallel.state import init_parallel
    from megappo.toolkit.compare import fixed_sequences
    from megappo.weights.model_io import load_hf_into_model

    init_parallel(1, 1, device="cpu", seed=5)
    d = make_tiny_hf_model(workdir, "mixtral", name="mixtral-tie", layers=2)
    spec = ModelSpec.from_hf_dir(d)
    ids = fixed_sequences(spec.vocab_size, 6, 12, seed=1)
    N, S = ids.shape
    batch = TokenBatch(ids, torch.full((N,), 4), torch.full((N,), S - 4))
    results = {}

    def routers(policy):
        return [p for n, p in policy.models[0].named_parameters() if n.endswith("mlp.router.weight")]

    def run(name: str, replay: bool, regroup: bool = False, nudge: bool = True) -> None:
        policy = MegatronPolicy(spec, "actor", BuildOptions(routing_replay=replay), OptimizerSettings(lr=1e-4),
                                max_tokens_per_microbatch=10_000)
        load_hf_into_model(policy, d)
        with torch.no_grad():
            for w in routers(policy):
                v = w[0].clone()
                w[0], w[1], w[2], w[3] = 2 * v, v, v, -v
        old = policy.forward_logprobs(batch, temperature=1.0)["logprobs_BT"]
        with torch.no_grad():
            for w in routers(policy) if nudge else []:  # the nudge that flips every tie
                w[2] *= 1 + 1e-4
        rows = torch.arange(N - 1, -1, -1) if regroup else torch.arange(N)
        seen = []

        def loss_fn(outputs, mb_rows):
            ratio = torch.exp(outputs["logprobs_BT"] - old[rows[mb_rows]])
            mask = batch.response_mask_BT[rows[mb_rows]].bool()
            seen.append(float((ratio - 1).abs()[mask].max()))
            return -(ratio * mask).sum(), {}

        metrics = policy.forward_backward(batch.select(rows), loss_fn, num_microbatches_hint=3 if regroup else 1)
        results[name] = {"max_abs_ratio_minus_1": max(seen), **{k: v for k, v in metrics.items() if k.startswith("moe/")}}

    run("replay_unchanged", True, nudge=False)
    run("replay", True)
    run("free", False)
    run("regrouped", True, regroup=True)
    results.update(_rollout_runs(workdir))
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


def _rollout_runs(workdir: str) -> dict:
    import torch

    from megappo.models import BuildOptions, MegatronPolicy, ModelSpec, OptimizerSettings
    from megappo.weights.model_io import load_hf_into_model
    from test_rollout_routing import engine_rollout_batch, near_tie_moe

    engine_dir = near_tie_moe(workdir, "engine-side", nudge=1e-5)
    trainer_dir = near_tie_moe(workdir, "trainer-side", nudge=-1e-5)
    batch = engine_rollout_batch(engine_dir, 6)
    tokens, mask = batch.tokens, batch.mask_BT.bool()
    spec = ModelSpec.from_hf_dir(trainer_dir)
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    get_moe_layer_wise_logging_tracker().clear()  # Megatron's global tracker is sized by the first (2-layer) model
    out = {}
    for name, opts in (("rollout_replay", BuildOptions(routing_replay=True, routing_replay_source="rollout")),
                       ("rollout_free", BuildOptions(routing_replay=True))):
        policy = MegatronPolicy(spec, "actor", opts, OptimizerSettings(lr=1e-4), max_tokens_per_microbatch=10_000)
        load_hf_into_model(policy, trainer_dir)
        old = policy.forward_logprobs(tokens, temperature=1.0)["logprobs_BT"]
        first_metrics = policy.routing.metrics()
        seen = []

        def loss_fn(outputs, rows):
            ratio = torch.exp(outputs["logprobs_BT"] - old[rows])
            seen.append(float((ratio - 1).abs()[mask[rows]].max()))
            return -(ratio * mask[rows]).sum(), {}

        metrics = policy.forward_backward(tokens, loss_fn)
        out[name] = {"max_abs_engine_minus_trainer": float((old - batch.rollout_logprobs_BT).abs()[mask].max()),
                     "max_abs_ratio_minus_1": max(seen), "old_pass": first_metrics,
                     **{k: v for k, v in metrics.items() if k.startswith("moe/")}}
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", required=True)
    a = ap.parse_args()
    _child(a.out, a.workdir)
