"""Rollout ranks apart from trainer ranks (``parallel.rollout_world_size=1``) end to end on the
toy task: ``torchrun --nproc-per-node 2``, rank 0 trains, rank 1 runs the embedded engine.

- ``sync``: the metrics of a colocated one-rank run, exactly (tolerance 0): the same
  weights reach the engine bit for bit over gloo, the sampling seeds are functions of the
  step and the replica, and both engines run the same ops on one thread each;
- ``async`` with partial rollouts: staleness within the bound, and after every weight sync
  the engine's own checksum of what it holds equals the trainer's of what it sent;
- the rollout rank killed (SIGKILL) or frozen (SIGSTOP) mid-run: the trainer fails within
  about ``parallel.rollout_timeout_s`` with a ``RolloutEngineError`` naming rank 1 and its
  host, and nothing waits on (the launch ends).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.test_e2e import _command, _env, _metrics

pytestmark = pytest.mark.slow

DISAGG = ["parallel.rollout_world_size=1", "parallel.rollout_timeout_s=5"]
SMALL = ["train.rollout_batch_size=16", "train.mini_batch_size=8", "train.eval_every=0", "checkpoint.save_every=0"]
VOLATILE = ("time/", "perf/", "sync/", "rollout/buffer_fill")

# Every weight sync compares checksums (the run itself checks only its first).
HOOK = """
import os
if os.environ.get("LOCAL_RANK") is not None and os.environ.get("MEGAPPO_TEST_CHECK_EVERY_SYNC"):
    from megappo.loop import rollout_side

    sync = rollout_side.RolloutSide.sync_weights

    def checked_sync(self, models):
        self.weights_checked = False
        return sync(self, models)

    rollout_side.RolloutSide.sync_weights = checked_sync
"""


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tiny model (a short warm-up: these tests compare runs, they need no learning) and the toy data."""
    from megappo.demo import prepare

    return prepare(tmp_path_factory.mktemp("toy"), seed=7, sft_steps=10)


def _launch(toy, run_dir: Path, overrides: list[str], nproc: int = 2, env=None, **popen):
    command = _command(toy, run_dir, overrides)
    command[command.index("--nproc-per-node") + 1] = str(nproc)
    return subprocess.Popen(command, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _finish(proc, timeout: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-6000:]
    return out


def test_sync_reproduces_the_colocated_run(toy, tmp_path):
    steps = ["train.steps=3"]
    colocated = _launch(toy, tmp_path / "colocated", [*SMALL, *steps], nproc=1)
    _finish(colocated)
    disaggregated = _launch(toy, tmp_path / "disaggregated", [*SMALL, *steps, *DISAGG])
    out = _finish(disaggregated)
    assert "on rollout rank 1 (" in out
    a, b = _metrics(tmp_path / "colocated"), _metrics(tmp_path / "disaggregated")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b):
        same = {k: v for k, v in x.items() if not k.startswith(VOLATILE)}
        assert same == {k: y.get(k) for k in same}, x["step"]


def test_async_keeps_the_bound_and_every_sync_checks_out(toy, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    env = dict(_env(), MEGAPPO_TEST_CHECK_EVERY_SYNC="1")
    env["PYTHONPATH"] = os.pathsep.join([str(hook), env.get("PYTHONPATH", "")])
    overrides = [*SMALL, *DISAGG, "train.steps=5", "rollout.mode=async", "rollout.max_staleness=2",
                 "rollout.partial_rollout=true", "algo.policy_loss=decoupled"]
    out = _finish(_launch(toy, tmp_path / "run", overrides, env=env))
    rows = _metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    stale = [r["rollout/staleness_max"] for r in rows]
    assert all(0 <= s <= 2 for s in stale) and max(stale) >= 1, stale  # generated ahead, never beyond the bound
    checked = re.findall(r"on rollout rank 1 \(.*\) holds the trainer's weights \(checksum", out)
    assert len(checked) == 6, out[-4000:]  # the start-up sync and one per step
    assert "differs from the trainer's" not in out


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_a_lost_rollout_rank_fails_the_trainer_naming_it(toy, tmp_path, sig):
    import psutil

    proc = _launch(toy, tmp_path / "run", [*SMALL, *DISAGG, "train.steps=1000", "rollout.mode=async"],
                   start_new_session=True)
    tree = psutil.Process(proc.pid)
    watchdog = threading.Timer(180, lambda: [p.kill() for p in tree.children(recursive=True) + [tree]])
    watchdog.start()
    lines, victim, elapsed = [], None, None
    try:
        for line in proc.stdout:
            lines.append(line)
            found = re.search(r"on rollout rank 1 \(\S+ \(pid (\d+)\)\)", line)
            victim = int(found.group(1)) if found and victim is None else victim
            if line.startswith("INFO: step 3/"):  # the rollout rank has served a few steps
                os.kill(victim, sig)
                start = time.monotonic()
            if "RolloutEngineError:" in line and elapsed is None:
                elapsed = time.monotonic() - start
                if sig == signal.SIGSTOP:  # torchrun would SIGKILL it 30 s after SIGTERM: spare the test that wait
                    os.kill(victim, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            for p in tree.children(recursive=True) + [tree]:
                p.kill()
        if victim is not None and psutil.pid_exists(victim):
            os.kill(victim, signal.SIGKILL)
    out = "".join(lines)
    assert proc.returncode != 0
    assert elapsed is not None, out[-6000:]
    assert elapsed < 20, f"the trainer took {elapsed:.1f} s to fail (parallel.rollout_timeout_s=5)"
    error = re.search(r"RolloutEngineError: (.*)", out).group(1)
    assert re.search(r"rollout rank 1 \(\S+ \(pid \d+\)\)", error), error  # the rank and its host
