"""The CPU toy MoE demo (``python -m megappo.demo --moe``) end to end for a few steps:
two processes, EP=2, routing replay on; the moe/* router metrics are logged every step and
the final HF export (experts gathered over the EP group) loads in transformers. Slow: one
torchrun launch. The learning figure (+20 points or more) is in the README's MoE section."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def test_toy_moe_demo_runs_at_ep2_and_logs_routing_metrics(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    out = tmp_path / "demo_moe"
    cmd = [sys.executable, "-m", "megappo.demo", "--moe", "--out", str(out), "--steps", "3", "--sft-steps", "5",
           "train.eval_every=3", "checkpoint.save_every=0"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    trained = [r for r in rows if "actor/moe/router_entropy" in r]
    assert len(trained) == 3
    assert all(0 < r["actor/moe/router_entropy"] <= 1.3863 + 1e-6 for r in trained)  # <= ln(4 experts)
    assert all(r["actor/moe/expert_load_max_over_mean"] >= 1.0 for r in trained)
    assert all(r["actor/moe/load_balancing_loss"] > 0 for r in trained)
    # Replay engaged on every update micro-batch: each row found the old-log-prob pass's
    # recording (the trainer records mini-batch by mini-batch), and the flip metric is there.
    assert not any("actor/moe/replay_missing_rows" in r for r in trained)
    assert all(0.0 <= r["actor/moe/routing_changed_frac"] <= 1.0 for r in trained)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "hf" / "final")
    assert type(model).__name__ == "Qwen3MoeForCausalLM" and model.config.num_experts == 4


def test_toy_moe_demo_replays_the_rollout_routing_in_the_loop(tmp_path):
    """``algo.routing_replay_source=rollout`` through the whole loop at EP=2: the embedded
    engine's routed experts reach every update micro-batch (no missing rows; the trainer's
    routing is compared with the engine's every step) and the run finishes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    out = tmp_path / "demo_moe_r3"
    cmd = [sys.executable, "-m", "megappo.demo", "--moe", "--out", str(out), "--steps", "2", "--sft-steps", "5",
           "train.eval_every=2", "checkpoint.save_every=0", "checkpoint.save_hf_at_end=false", "algo.routing_replay_source=rollout"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    trained = [r for r in rows if "actor/moe/router_entropy" in r]
    assert len(trained) == 2
    assert not any("actor/moe/replay_missing_rows" in r for r in trained)
    assert all(0.0 <= r["actor/moe/rollout_routing_changed_frac"] <= 1.0 for r in trained)
    assert all(r["rollout/logp_diff_max"] < 1e-4 for r in trained)  # fp32: engine and trainer agree
