"""End-to-end RL training with the REAL SGLang engine (``rollout.engine=sglang``) on CPU.

The trainer runs under torchrun (2 processes, gloo) in the CPU SGLang environment
(.venv-sglang, ``make sglang-env``; tests/sglang_env.py), one colocated SGLang engine per
data-parallel replica on the replica's first rank (SGLang's own TP is 1 on CPU). GRPO and PPO
each at TP=2 (SGLang's flattened-bucket sync of a gathered TP-sharded model) and at PP=2
(gathered over pipeline stages); GRPO with the reference model and the exact-vocabulary KL
loss, PPO with the critic. At TP=2 or PP=2 with 2 processes there is one data-parallel
replica, so one engine per case.
Each asserts on the run's ``metrics.jsonl``: on step 1 the PPO ratio is exactly 1 and the
KL to the reference exactly 0, and at every step the log-probs SGLang reported for the
sampled tokens are within 1e-5 (float32) of the trainer's for the same tokens. One engine
start per case (20-80 s each here; each case is its own torchrun job with its own layout, so
engines cannot be shared across cases), two steps each (the second checks the engine after a
sync of trained weights); the two added cases sample 8 prompts instead of 16.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from sglang_env import REPO, SKIP_REASON, sglang_env, sglang_python
from test_e2e import RECIPE, _free_port

PY = sglang_python()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(PY is None, reason=SKIP_REASON)]

# On CPU SGLang computes in float32. A non-empty rollout.sglang (checked against SGLang's ServerArgs in a
# child process, so SGLang's CPU switch can still be set before the trainer imports it) in two of the cases.
ENGINE = ["rollout.engine=sglang", "rollout.server_timeout_s=300"]
PASSED_THROUGH = ["rollout.sglang.max_running_requests=64"]
TP2, PP2 = ["parallel.tensor_model_parallel_size=2"], ["parallel.pipeline_model_parallel_size=2"]
CASES = [
    ("grpo", "tp2", [*TP2, "algo.kl_penalty=full"]),
    ("ppo", "pp2", [*PP2, "rollout.num_return_sequences_in_group=2"]),
    ("grpo", "pp2", [*PP2, "train.rollout_batch_size=8", *PASSED_THROUGH]),
    ("ppo", "tp2", [*TP2, "rollout.num_return_sequences_in_group=2", "train.rollout_batch_size=8", *PASSED_THROUGH]),
]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from megappo.demo import prepare

    return prepare(tmp_path_factory.mktemp("toy"), seed=7, sft_steps=100)


def _train(toy, run_dir: Path, overrides: list[str]) -> list[dict]:
    cmd = [
        str(PY), "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
        "-m", "megappo.train", "--config", str(RECIPE),
        f"model.hf_path={toy['model']}", f"data.train_path={toy['train']}", f"data.eval_path={toy['eval']}",
        f"train.run_dir={run_dir}", "checkpoint.save_hf_at_end=false", "logging.progress_bar=false",
        "logging.tensorboard=false", *ENGINE, *overrides,
    ]  # fmt: skip
    env = sglang_env(PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("preset,layout", [(p, o) for p, _, o in CASES], ids=[f"{p}-{n}" for p, n, _ in CASES])
def test_sglang_engine_trains_on_policy(toy, tmp_path, preset, layout):
    on_policy = ["train.mini_batch_size=null", "algo.ppo_epochs=1", "train.eval_every=0"]
    rows = _train(toy, tmp_path, [f"algo.preset={preset}", "train.steps=2", "train.rollout_batch_size=16", *on_policy, *layout])
    assert [r["step"] for r in rows] == [1, 2]
    first = rows[0]
    assert first["actor/ratio_min"] == 1.0 and first["actor/ratio_max"] == 1.0, first
    if preset == "grpo":  # the reference starts as the actor: exactly zero KL
        assert first["actor/kl_ref"] == 0.0 and first["actor/kl_loss"] == 0.0, first
    else:
        assert "critic/vf_loss" in first
    for row in rows:  # SGLang's log-probs against the trainer's, after each step's weight sync
        assert 0.0 <= row["rollout/logp_diff_max"] <= 1e-5, (row["step"], row["rollout/logp_diff_max"])
        assert row["response_length/mean"] > 0


def test_compare_logprobs_tool_with_sglang_under_torchrun(tmp_path):
    """``torchrun tools/compare_logprobs.py --engine sglang`` from the project's Python (no
    SGLang in it) runs itself in the CPU SGLang environment and finishes: it once hung in
    SGLang's TP rendezvous (torchrun's agent-store variable; sglang_ports.own_rendezvous)."""
    import sys

    from hf_fixtures import make_tiny_hf_model

    model = make_tiny_hf_model(tmp_path, "llama")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
        str(REPO / "tools" / "compare_logprobs.py"), "--hf-dir", str(model), "--tp", "2", "--engine", "sglang",
    ]  # fmt: skip
    env = dict(sglang_env(CUDA_VISIBLE_DEVICES=""), MEGAPPO_SGLANG_PYTHON=str(PY))
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = {r["compare"]: r for r in (json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{"))}
    engine = rows["engine_vs_megatron"]
    assert engine["engine"] == "sglang" and engine["tp"] == 2 and engine["num_tokens"] > 0
    assert engine["max_abs_diff"] <= 1e-5, engine
    assert rows["weights_checksum"]["match"] is True, rows["weights_checksum"]
