"""Asynchronous rollouts end to end on the toy task under torchrun (2 CPU processes, gloo):

- ``rollout.mode=async`` with ``max_staleness=0`` logs the synchronous run's metrics, number
  for number (the same samples: seeds are functions of the step; the same updates);
- under a slow trainer, ``max_staleness=2`` (with the decoupled loss) reaches staleness 2 and never exceeds it;
- killed with SIGKILL while the producer has handed out prompts beyond the checkpoint, the
  resumed run trains every prompt of an uninterrupted run, none skipped, none twice.

A module on PYTHONPATH (the trainer ranks import it through ``sitecustomize``) records the
prompts of every batch the trainer takes, per rank and step, and can slow the trainer down.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_e2e import _command, _env, _metrics, toy  # noqa: F401 - the module's fixture

pytestmark = pytest.mark.slow

HOOK = """
import os, json, time
if os.environ.get("LOCAL_RANK") is not None and os.environ.get("MEGAPPO_TEST_PROMPT_LOG"):
    from megappo.loop import rollout_stream

    take, sync = rollout_stream.RolloutStream.take, rollout_stream.RolloutStream.sync_weights
    slow = float(os.environ.get("MEGAPPO_TEST_SLOW_TRAIN_S", "0"))

    def logged_take(self, step):
        batch, metrics = take(self, step)
        path = os.environ["MEGAPPO_TEST_PROMPT_LOG"] + "." + os.environ["RANK"]
        with open(path, "a") as f:
            f.write(json.dumps({"step": step, "prompts": sorted(set(batch.prompt_texts))}) + "\\n")
        return batch, metrics

    def slow_sync(self, models, *, version):
        time.sleep(slow)  # a trainer slower than generation: the producer runs ahead
        return sync(self, models, version=version)

    rollout_stream.RolloutStream.take = logged_take
    rollout_stream.RolloutStream.sync_weights = slow_sync
"""

STEPS = 10
COMMON = ["train.eval_every=0", "checkpoint.save_every=2", "checkpoint.keep_last=2", "logging.console_every=1"]


def _hook_env(tmp_path: Path, log: Path, slow_s: float = 0.0) -> dict:
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir(exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(HOOK)
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(hook_dir), env.get("PYTHONPATH", "")])
    env["MEGAPPO_TEST_PROMPT_LOG"] = str(log)
    env["MEGAPPO_TEST_SLOW_TRAIN_S"] = str(slow_s)
    return env


def _run(toy, run_dir, overrides, env, timeout=400):
    proc = subprocess.run(_command(toy, run_dir, overrides), env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return _metrics(run_dir)


def _prompts(log: Path) -> dict[tuple[int, int], list[str]]:
    """(rank, step) -> the prompts that rank took for that step (later lines win: a resumed run's)."""
    out = {}
    for rank in (0, 1):
        for line in Path(f"{log}.{rank}").read_text().splitlines():
            row = json.loads(line)
            out[(rank, row["step"])] = row["prompts"]
    return out


VOLATILE = ("time/", "perf/", "sync/", "rollout/buffer_fill")


def test_max_staleness_zero_reproduces_sync_and_resume_is_lossless(toy, tmp_path):
    sync_log, async_log = tmp_path / "sync_prompts", tmp_path / "async_prompts"
    sync_rows = _run(toy, tmp_path / "sync", [*COMMON, f"train.steps={STEPS}"], _hook_env(tmp_path, sync_log))
    zero_rows = _run(toy, tmp_path / "async0", [*COMMON, f"train.steps={STEPS}", "rollout.mode=async", "rollout.max_staleness=0"],
                     _hook_env(tmp_path, async_log))
    assert len(sync_rows) == len(zero_rows) == STEPS
    for a, b in zip(sync_rows, zero_rows):
        same = {k: a[k] for k in a if not k.startswith(VOLATILE)}
        assert same == {k: b[k] for k in same}, a["step"]  # exactly equal: the same samples and updates
        assert b["rollout/staleness_max"] == 0.0
    reference = _prompts(sync_log)
    assert _prompts(async_log) == reference

    # Async, eta = 2, a slow trainer: killed after a checkpoint, then resumed.
    killed, log = tmp_path / "killed", tmp_path / "killed_prompts"
    overrides = [*COMMON, "rollout.mode=async", "rollout.max_staleness=2", "algo.policy_loss=decoupled"]
    env = _hook_env(tmp_path, log, slow_s=0.3)
    proc = subprocess.Popen(_command(toy, killed, [*overrides, "train.steps=1000"]), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    import psutil

    tree = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    for p in tree:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(tree, timeout=30)
    proc.wait()
    assert latest.exists(), "the run never wrote a checkpoint"
    saved = int(latest.read_text().strip().rsplit("_", 1)[-1])
    assert saved + 2 <= STEPS, f"killed too late (checkpoint {saved})"
    before = _prompts(log)
    rows = _run(toy, killed, [*overrides, f"train.steps={STEPS}"], env)
    after = _prompts(log)
    trained = {k: v for k, v in before.items() if k[1] <= saved} | {k: v for k, v in after.items() if k[1] > saved}
    assert trained == reference  # per rank and step: every prompt of the uninterrupted run, none skipped
    first_epoch = [p for (rank, step), v in trained.items() if step <= 5 for p in v]  # 354 prompts: 5 batches of 64
    assert len(first_epoch) == len(set(first_epoch)) == 5 * 64, "a prompt was trained twice within an epoch"
    stale = [r["rollout/staleness_max"] for r in rows]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert max(stale) == 2 and min(stale) >= 0 and all(s <= 2 for s in stale)
    assert all(0 < r["actor/behav_weight_mean"] <= 5.0 for r in rows)  # the decoupled loss ran, weights truncated at the cap


PARTIAL_HOOK = """
import os, json, time
if os.environ.get("LOCAL_RANK") is not None and os.environ.get("MEGAPPO_TEST_PARTIAL_LOG"):
    import torch
    from megappo import trainer
    from megappo.rollout import embedded

    choose_tokens = embedded.choose_tokens

    def slow_choose_tokens(*args, **kwargs):  # slow decoding: a weight sync lands while a batch is generated
        time.sleep(0.4)
        return choose_tokens(*args, **kwargs)

    score = trainer.Trainer.score_with_models

    def recorded_score(self, batch, step):
        score(self, batch, step)
        mask = batch.mask_BT > 0
        versions = batch.versions_BT()[:, : mask.shape[1]]
        diff = (batch.old_logprobs_BT - batch.rollout_logprobs_BT).abs()
        fresh, stale = mask & (versions == step - 1), mask & (versions < step - 1)
        row = {"step": step, "fresh": int(fresh.sum()), "stale": int(stale.sum()),
               "fresh_max_diff": float(diff[fresh].max()) if fresh.any() else 0.0,
               "stale_max_diff": float(diff[stale].max()) if stale.any() else 0.0,
               "spanning": int(((versions * mask).max(1).values > batch.policy_version_B).sum())}
        with open(os.environ["MEGAPPO_TEST_PARTIAL_LOG"] + "." + os.environ["RANK"], "a") as f:
            f.write(json.dumps(row) + "\\n")

    embedded.choose_tokens = slow_choose_tokens
    trainer.Trainer.score_with_models = recorded_score
"""


def test_partial_rollouts_continue_responses_under_the_new_weights(toy, tmp_path):
    """``rollout.partial_rollout=true``: weight syncs interrupt the batch being generated;
    responses that span a sync hold tokens of two versions, and the tokens sampled by the
    weights the step trains from have the trainer's own log-probs (the Megatron actor's
    recompute), while older tokens need not."""
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(PARTIAL_HOOK)
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(hook_dir), env.get("PYTHONPATH", "")])
    log = tmp_path / "partial"
    env["MEGAPPO_TEST_PARTIAL_LOG"] = str(log)
    rows = _run(toy, tmp_path / "run", ["train.eval_every=0", "checkpoint.save_every=0", "train.steps=5", "rollout.mode=async",
                                        "rollout.max_staleness=1", "rollout.partial_rollout=true", "algo.policy_loss=decoupled"], env)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["rollout/staleness_max"] <= 1 for r in rows)
    assert max(r["rollout/partial_frac"] for r in rows) > 0, "no response spanned a weight sync"
    recorded = [json.loads(line) for rank in (0, 1) for line in Path(f"{log}.{rank}").read_text().splitlines()]
    assert sum(r["spanning"] for r in recorded) > 0
    assert all(r["fresh_max_diff"] < 1e-4 for r in recorded), recorded  # engine == trainer on the trained version's tokens
    assert sum(r["fresh"] for r in recorded) > 0 and sum(r["stale"] for r in recorded) > 0
    assert max(r["stale_max_diff"] for r in recorded) > 1e-3  # the check tells the versions apart
