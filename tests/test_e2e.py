"""End-to-end RL training on the toy task under torchrun (2 CPU processes, gloo).

One launch per case; each asserts on the run's ``metrics.jsonl``:
- every preset runs at TP=2 or PP=2; on step 1 the PPO ratio is exactly 1 (old log-probs
  and the first update's log-probs come from the same weights and micro-batches) and the
  KL to the reference is exactly 0 (the reference starts as the actor's weights);
- a run killed after a checkpoint resumes and continues with the metrics of an
  uninterrupted run;
- GRPO, LitePPO and PPO each raise the reward on the toy task within a bounded number of steps.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "toy_liteppo_cpu.yaml"
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A warmed-up tiny model and toy data, built once for the module."""
    from megappo.demo import prepare

    out = tmp_path_factory.mktemp("toy")
    return prepare(out, seed=7, sft_steps=100)


def _command(toy, run_dir: Path, overrides: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
        "-m", "megappo.train", "--config", str(RECIPE),
        f"model.hf_path={toy['model']}", f"data.train_path={toy['train']}", f"data.eval_path={toy['eval']}",
        f"train.run_dir={run_dir}", "checkpoint.save_hf_at_end=false", "logging.progress_bar=false",
        *overrides,
    ]


def _env() -> dict:
    # The toy recipe runs on the CPU; hide any GPU so that also holds on a GPU host.
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")


def _train(toy, run_dir: Path, overrides: list[str], timeout: float = 400) -> list[dict]:
    proc = subprocess.run(_command(toy, run_dir, overrides), env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return _metrics(run_dir)


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# The loop's options ride along with the presets: shuffled mini-batches with LitePPO, dynamic sampling with GRPO, the overlong
# filter, DAPO's soft overlong penalty and truncated importance sampling with Dr.GRPO.
# ppo packs its micro-batches (padding removed, several per mini-batch at PP=2);
# grpo uses the exact vocabulary KL loss from the TP-sharded logits (kl_penalty=full);
# reinforce_pp_baseline also saves HF weights every step and scores with a reward function
# that raises on some responses; dr_grpo adds a KL loss so the reference runs at PP=2 too.
PRESET_LAYOUTS = [
    ("liteppo", ["parallel.tensor_model_parallel_size=2", "train.shuffle_minibatches=true"]),
    ("grpo", ["parallel.tensor_model_parallel_size=2", "algo.dynamic_sampling=true", "algo.max_sampling_rounds=3",
              "algo.kl_penalty=full"]),
    ("reinforce_pp_baseline", ["parallel.tensor_model_parallel_size=2", "checkpoint.save_hf_every=1"]),
    ("ppo", ["parallel.pipeline_model_parallel_size=2", "rollout.num_return_sequences_in_group=2",
             "train.packed_sequences=true", "train.max_tokens_per_microbatch=256"]),
    ("dr_grpo", ["parallel.pipeline_model_parallel_size=2", "algo.overlong_filter=true",
                 "algo.overlong_buffer_len=2", "algo.tis_clip=2.0", "algo.use_kl_loss=true"]),
]
USES_REFERENCE = {"grpo", "reinforce_pp_baseline", "dr_grpo"}

# The metrics the end-to-end issue names, logged every step (the critic's for PPO, the
# reference KL where a reference model runs).
STEP_METRICS = (
    "reward/mean", "reward/std", "reward/accuracy", "reward/errors", "reward/timeouts",
    "response_length/mean", "response_length/max", "response_length/truncated_frac",
    "actor/entropy", "actor/pg_loss", "actor/pg_clipfrac", "actor/pg_clipfrac_low", "actor/pg_clipfrac_high",
    "actor/ppo_kl", "actor/grad_norm", "actor/lr",
    "time/rollout", "time/reward", "time/logprobs", "time/train", "time/sync", "perf/tokens_per_s",
    "rollout/logp_diff_mean", "rollout/logp_diff_max", "sync/seconds", "sync/gbps",
)
CRITIC_METRICS = ("critic/vf_loss", "critic/explained_variance", "critic/grad_norm", "critic/lr")

FLAKY_REWARD = """
from megappo.data.answers import exact_integer_reward as toy_reward

def flaky_toy(response, answer, prompt):
    if response.endswith("7"):
        raise RuntimeError("this reward function fails on purpose")
    return toy_reward(response, answer, prompt)
"""


@pytest.mark.parametrize("preset,layout", PRESET_LAYOUTS, ids=[p for p, _ in PRESET_LAYOUTS])
def test_preset_first_step_is_on_policy(toy, tmp_path, preset, layout):
    # One mini-batch per step: the whole update is on-policy, so the ratio of step 1 is 1.
    on_policy = ["train.mini_batch_size=null", "algo.ppo_epochs=1"]
    export = ["train.eval_every=1", "checkpoint.save_hf_at_end=true"] if preset == "liteppo" else ["train.eval_every=0"]
    if preset == "reinforce_pp_baseline":
        (tmp_path / "flaky_reward.py").write_text(FLAKY_REWARD)
        export.append(f"reward.fn={tmp_path / 'flaky_reward.py'}:flaky_toy")
    rows = _train(toy, tmp_path, [f"algo.preset={preset}", "train.steps=2", *export, *on_policy, *layout])
    assert [r["step"] for r in rows] == ([0, 1, 2] if preset == "liteppo" else [1, 2])  # step 0: the evaluation before training
    first = next(r for r in rows if r["step"] == 1)
    assert first["actor/ratio_min"] == 1.0 and first["actor/ratio_max"] == 1.0, first
    assert first["actor/pg_clipfrac"] == 0.0
    if preset in USES_REFERENCE:  # the reference starts as the actor: exactly zero KL
        assert first["actor/kl_ref"] == 0.0, first.get("actor/kl_ref")
    else:
        assert "actor/kl_ref" not in first, "no reference model should run"
    expected = STEP_METRICS + (CRITIC_METRICS if preset == "ppo" else ())
    for row in (r for r in rows if r["step"] >= 1):
        missing = [k for k in expected if k not in row]
        assert not missing, f"step {row['step']} lacks {missing}"
    if preset == "grpo":  # the exact KL of two identical models' distributions is exactly 0
        assert first["actor/kl_loss"] == 0.0 and rows[-1]["actor/kl_loss"] > 0.0
    if preset == "grpo":  # dynamic sampling: 1 to 3 generation rounds per step
        assert all(1 <= r["rollout/sampling_rounds"] <= 3 for r in rows), [r["rollout/sampling_rounds"] for r in rows]
    if preset == "dr_grpo":  # truncated IS weights are exp(old - rollout) ~ 1 right after a sync
        assert first["actor/tis_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    if preset == "reinforce_pp_baseline":
        _check_failing_reward_and_hf_every_step(tmp_path, rows)
    # The engine and the trainer agree on the rollout log-probs after the initial sync.
    assert first["rollout/logp_diff_max"] < 1e-4
    assert (tmp_path / "checkpoints" / "latest").exists()
    if preset == "liteppo":
        _check_export_evaluates_like_trainer(toy, tmp_path, rows)


def _check_export_evaluates_like_trainer(toy, run_dir: Path, rows: list[dict]) -> None:
    """The final actor saved in HF format (gathered from TP=2 shards), evaluated by
    tools/evaluate.py outside training, scores exactly the trainer's last evaluation."""
    final = run_dir / "hf" / "final"
    assert (final / "config.json").exists()
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "evaluate.py"), "--config", str(RECIPE), "--hf-dir", str(final),
         "--data", toy["eval"], f"data.train_path={toy['train']}"],
        env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["num_samples"] == rows[-1]["eval/num_samples"]
    assert result["accuracy"] == pytest.approx(rows[-1]["eval/accuracy"], abs=1e-9)
    # The same from the training checkpoint (TP=2 shards, exported inside the tool).
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "evaluate.py"), "--config", str(RECIPE), "--ckpt", str(run_dir / "checkpoints"),
         "--data", toy["eval"], f"model.hf_path={toy['model']}", f"data.train_path={toy['train']}"],
        env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    from_ckpt = json.loads(out.stdout.strip().splitlines()[-1])
    assert from_ckpt["accuracy"] == result["accuracy"] and from_ckpt["num_samples"] == result["num_samples"]


def _check_failing_reward_and_hf_every_step(run_dir: Path, rows: list[dict]) -> None:
    """A reward function that raises scores 0 and is counted, and the run goes on; with
    checkpoint.save_hf_every=1 each step leaves an HF directory transformers loads."""
    assert sum(r["reward/errors"] for r in rows) > 0, "the failing reward function was never counted"
    import torch
    from transformers import AutoModelForCausalLM

    weights = []
    for step in (1, 2):
        model = AutoModelForCausalLM.from_pretrained(run_dir / "hf" / f"step_{step}", dtype=torch.float32)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.equal(weights[0], weights[1]), "step 2's export should hold the weights after its update"


def test_killed_run_resumes_like_uninterrupted(toy, tmp_path):
    common = ["train.eval_every=0", "checkpoint.save_every=2", "checkpoint.keep_last=2"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_command(toy, killed, [*common, "train.steps=1000"]), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    # torchrun starts each worker in a session of its own: kill the whole tree, by PID.
    import psutil

    tree = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    for p in tree:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(tree, timeout=30)
    proc.wait()
    assert latest.exists(), "the run never wrote a checkpoint"
    saved = int(latest.read_text().strip().rsplit("_", 1)[-1])
    end = saved + 2
    resumed = _train(toy, killed, [*common, f"train.steps={end}"])
    reference = _train(toy, tmp_path / "uninterrupted", [*common, f"train.steps={end}"])
    assert [r["step"] for r in resumed] == list(range(1, end + 1)), "metrics.jsonl has each step exactly once"
    keys = ("reward/mean", "actor/pg_loss", "actor/grad_norm", "response_length/mean")
    for a, b in zip(resumed[saved:], reference[saved:]):
        for k in keys:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a["step"], k, a[k], b[k])


# Loaded by every Python process of the run through PYTHONPATH; only the trainer ranks
# (torchrun sets LOCAL_RANK) patch the embedded engine so that its N-th generate call fails
# inside generation, as a crashing kernel or an out-of-memory error would.
FAILING_ENGINE = """
import os
if os.environ.get("LOCAL_RANK") is not None and os.environ.get("MEGAPPO_TEST_FAIL_GENERATE_AT"):
    from megappo.rollout import embedded

    fail_at = int(os.environ["MEGAPPO_TEST_FAIL_GENERATE_AT"])
    calls = [0]
    original = embedded.EmbeddedEngine._generate_chunk

    def failing_chunk(self, prompts, first, *args, **kwargs):
        if first == 0:
            calls[0] += 1
        if calls[0] >= fail_at:
            raise RuntimeError("injected generation failure")
        return original(self, prompts, first, *args, **kwargs)

    embedded.EmbeddedEngine._generate_chunk = failing_chunk
"""


def test_engine_failure_stops_the_run_and_keeps_its_checkpoint(toy, tmp_path):
    """Generation fails at step 3: the run exits non-zero with an error naming the engine,
    the step-2 checkpoint stays the latest and intact, and a restart resumes from it."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(FAILING_ENGINE)
    run_dir = tmp_path / "run"
    common = ["train.eval_every=0", "checkpoint.save_every=2", "checkpoint.keep_last=2"]
    env = dict(_env(), PYTHONPATH=os.pathsep.join([str(inject), os.environ.get("PYTHONPATH", "")]),
               MEGAPPO_TEST_FAIL_GENERATE_AT="3")  # fmt: skip
    proc = subprocess.run(_command(toy, run_dir, [*common, "train.steps=4"]), env=env, capture_output=True,
                          text=True, timeout=400)  # fmt: skip
    assert proc.returncode != 0, "the run should fail when its engine fails"
    output = proc.stdout + proc.stderr
    assert "embedded" in output and "injected generation failure" in output, output[-4000:]
    latest = run_dir / "checkpoints" / "latest"
    assert latest.read_text().strip().endswith("_2"), latest.read_text()
    assert [r["step"] for r in _metrics(run_dir)] == [1, 2]
    resumed = _train(toy, run_dir, [*common, "train.steps=4"])
    assert [r["step"] for r in resumed] == [1, 2, 3, 4], "the restart resumes after step 2, each step once"


@pytest.mark.parametrize("preset", ["liteppo", "grpo", "ppo"])
def test_reward_rises_on_toy_task(toy, tmp_path, preset):
    steps = 80
    extra = ["rollout.num_return_sequences_in_group=4", "optim.critic_lr=1e-3"] if preset == "ppo" else []
    rows = _train(toy, tmp_path, [f"algo.preset={preset}", f"train.steps={steps}", "train.eval_every=0", *extra])
    rewards = [r["reward/mean"] for r in rows]
    first, last = sum(rewards[:15]) / 15, sum(rewards[-15:]) / 15
    assert last > first + 0.07, f"{preset}: mean reward {first:.3f} over the first 15 steps -> {last:.3f} over the last 15"

