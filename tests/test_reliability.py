"""Reliability (issue 14): the checkpoint directory's bookkeeping (bug 2: pruning by save
order, never ``latest``; another lineage's checkpoints set aside, not deleted; a resume from an
earlier step; ``hf/step_N`` pruning), what a resume does with a changed config (bug 4), and
helper processes that survive preemption signals and die with the trainer (bugs 1 and 9).
Everything here runs without a process group; the multi-rank paths are in
tests/test_checkpoint.py and tests/test_launch.py."""

from __future__ import annotations

import json
import logging
import os

import pytest

from megappo import checkpoint_dir as cdir


def _save(root, step, saved_ns=None):
    d = root / f"step_{step}"
    d.mkdir(parents=True)
    meta = {"format": "megappo-train/1", "step": step, "roles": ["actor"], "spec": {}}
    if saved_ns is not None:
        meta["saved_ns"] = saved_ns
    (d / cdir.META).write_text(json.dumps(meta))
    return d


def _names(root):
    return sorted(n for n in os.listdir(root) if n != cdir.SET_ASIDE)


# ---- bug 2: pruning --------------------------------------------------------------------------


def test_prune_keeps_the_newest_saves_not_the_highest_steps(tmp_path):
    """A run restarted over an old directory saves step_1 after step_10: keeping the highest
    step numbers deleted the checkpoint just written (and ``latest`` then named nothing)."""
    for step, ns in ((8, 1), (9, 2), (10, 3), (1, 4)):
        _save(tmp_path, step, ns)
    (tmp_path / cdir.LATEST).write_text("step_1\n")
    assert cdir.prune(str(tmp_path), keep_last=2) == [8, 9]
    assert _names(tmp_path) == ["latest", "step_1", "step_10"]


def test_prune_never_deletes_what_latest_names(tmp_path):
    for step, ns in ((3, 1), (4, 2), (5, 3)):
        _save(tmp_path, step, ns)
    (tmp_path / cdir.LATEST).write_text("step_3\n")  # rolled back by hand to the oldest save
    assert cdir.prune(str(tmp_path), keep_last=1) == [4]
    assert _names(tmp_path) == ["latest", "step_3", "step_5"]


def test_save_order_of_checkpoints_without_saved_ns_is_their_meta_mtime(tmp_path):
    for step, mtime in ((20, 100), (2, 200)):
        d = _save(tmp_path, step)
        os.utime(d / cdir.META, ns=(mtime * 10**9, mtime * 10**9))
    assert cdir.steps_by_save_order(str(tmp_path)) == [20, 2]


# ---- bug 2: where a run starts ---------------------------------------------------------------


def test_resume_never_sets_existing_checkpoints_aside(tmp_path, caplog):
    from megappo.checkpoint import CheckpointManager

    _save(tmp_path, 4, 1)
    (tmp_path / cdir.LATEST).write_text("step_4\n")
    with caplog.at_level(logging.WARNING, logger="megappo"):
        assert CheckpointManager(tmp_path).start("never") is None
    assert _names(tmp_path) == []
    (moved,) = os.listdir(tmp_path / cdir.SET_ASIDE)
    assert moved.endswith("-resume-never")
    assert sorted(os.listdir(tmp_path / cdir.SET_ASIDE / moved)) == ["latest", "step_4"]
    assert "nothing was deleted" in caplog.text and moved in caplog.text


def test_resume_from_an_earlier_step_sets_later_ones_aside(tmp_path):
    for step in (2, 4, 6, 8):
        _save(tmp_path, step, step)
    (tmp_path / cdir.LATEST).write_text("step_8\n")
    assert cdir.start_checkpoint(str(tmp_path), "auto", "4") == str(tmp_path / "step_4")
    assert _names(tmp_path) == ["latest", "step_2", "step_4"]
    assert (tmp_path / cdir.LATEST).read_text().strip() == "step_4"
    (moved,) = os.listdir(tmp_path / cdir.SET_ASIDE)
    assert moved.endswith("-after-step_4") and sorted(os.listdir(tmp_path / cdir.SET_ASIDE / moved)) == ["step_6", "step_8"]
    # latest edited by hand to an earlier step: the same
    (tmp_path / cdir.LATEST).write_text("step_2\n")
    assert cdir.start_checkpoint(str(tmp_path)) == str(tmp_path / "step_2")
    assert _names(tmp_path) == ["latest", "step_2"]
    # the usual resume moves nothing
    assert cdir.start_checkpoint(str(tmp_path)) == str(tmp_path / "step_2")
    assert len(os.listdir(tmp_path / cdir.SET_ASIDE)) == 2


def test_start_errors_name_the_problem(tmp_path):
    _save(tmp_path, 3, 1)
    with pytest.raises(ValueError, match="no 'latest' pointer: name one with checkpoint.resume_from"):
        cdir.start_checkpoint(str(tmp_path))
    with pytest.raises(ValueError, match=r"resume_from='7'.*complete checkpoints in .*: step_3"):
        cdir.start_checkpoint(str(tmp_path), "auto", "7")
    with pytest.raises(ValueError, match="contradicts checkpoint.resume_from"):
        cdir.start_checkpoint(str(tmp_path), "never", "3")
    assert cdir.start_checkpoint(str(tmp_path), "auto", "step_3") == str(tmp_path / "step_3")
    other = tmp_path / "other-run"
    src = _save(other, 9, 1)
    assert cdir.start_checkpoint(str(tmp_path), "auto", str(src)) == str(src)
    assert _names(tmp_path) == ["other-run"]  # this directory's lineage is set aside


def test_hf_exports_pruned_to_keep_last_hf(tmp_path):
    for i, name in enumerate(["step_30", "step_10", "step_20", "final"]):  # step_30: an older run's
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, ns=(i * 10**9, i * 10**9))
    assert cdir.prune_hf_exports(str(tmp_path), 0) == []
    assert cdir.prune_hf_exports(str(tmp_path), 2) == ["step_30"]
    assert sorted(os.listdir(tmp_path)) == ["final", "step_10", "step_20"]
    with pytest.raises(ValueError, match="keep_last_hf must be >= 0"):
        cdir.prune_hf_exports(str(tmp_path), -1)


# ---- bug 4: a resume with a changed config ---------------------------------------------------


def test_changed_keys_are_logged_and_an_algorithm_change_refused(caplog):
    from megappo.checkpoint_config import check_resume_config

    saved = {"algo": {"preset": "liteppo", "clip": 0.2}, "optim": {"lr": 1e-3}, "train": {"steps": 10}}
    run = {"algo": {"preset": "grpo", "clip": 0.2}, "optim": {"lr": 5e-4}, "train": {"steps": 10}}
    with pytest.raises(ValueError, match=r"another algorithm setting \(algo.preset: 'liteppo' -> 'grpo'\).*allow_algo_change=true"):
        check_resume_config(saved, run, step=4, source="ckpt/step_4")
    with caplog.at_level(logging.WARNING, logger="megappo"):
        changes = check_resume_config(saved, run, step=4, source="ckpt/step_4", allow_algo_change=True)
    assert changes == [("algo.preset", "liteppo", "grpo"), ("optim.lr", 1e-3, 5e-4)]
    assert "optim.lr changed: 0.001 -> 0.0005; applied" in caplog.text
    assert "nothing left to train" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="megappo"):
        check_resume_config(saved, {**saved, "train": {"steps": 4}}, step=4, source="ckpt/step_4")
    assert "ckpt/step_4 is at step 4 and train.steps=4: there is nothing left to train" in caplog.text


def _optimizer_and_scheduler(lr, warmup, betas):
    import torch
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3))
    # Megatron's param groups carry their own max_lr / min_lr (get_lr reads those first).
    opt = torch.optim.AdamW([{"params": [p], "max_lr": lr, "min_lr": lr, "wd_mult": 1.0}], lr=lr, betas=betas)
    sched = OptimizerParamScheduler(opt, init_lr=0.0, max_lr=lr, min_lr=lr, lr_warmup_steps=warmup,
                                    lr_decay_steps=warmup + 1, lr_decay_style="constant", start_wd=0.0, end_wd=0.0,
                                    wd_incr_steps=1, wd_incr_style="constant")  # fmt: skip
    return p, opt, sched


def test_resume_applies_the_runs_optimizer_settings():
    from megappo.checkpoint_config import run_settings_win

    p, old_opt, old_sched = _optimizer_and_scheduler(1e-3, 4, (0.9, 0.999))
    for _ in range(3):
        old_sched.step(1)
        p.grad = p.detach().clone()
        old_opt.step()
    saved_opt, saved_sched = old_opt.state_dict(), old_sched.state_dict()

    # Without it (the bug): the restored param groups and scheduler keep the old rate.
    _, opt, sched = _optimizer_and_scheduler(5e-4, 1, (0.8, 0.99))
    opt.load_state_dict(saved_opt)
    sched.load_state_dict(saved_sched)
    assert opt.param_groups[0]["lr"] == pytest.approx(3 / 4 * 1e-3)

    _, opt, sched = _optimizer_and_scheduler(5e-4, 1, (0.8, 0.99))
    with run_settings_win(opt, sched):
        opt.load_state_dict(saved_opt)
        sched.load_state_dict(saved_sched)
    group = opt.param_groups[0]
    assert sched.num_steps == 3 and sched.max_lr == 5e-4 and sched.lr_warmup_steps == 1
    assert group["lr"] == 5e-4 and group["max_lr"] == 5e-4 and group["betas"] == (0.8, 0.99)
    state = next(iter(opt.state.values()))
    assert float(state["step"]) == 3.0 and state["exp_avg"].abs().sum() > 0  # Adam's state is the checkpoint's


# ---- through Megatron: the shared launches of tests/mp/weights_launch.py (phase ckpt_resume) --


@pytest.fixture(scope="module")
def resumed():
    from mp.weights_launch import results

    (r,) = results().read("ckpt_resume")
    return r


@pytest.mark.slow
def test_checkpoint_writer_helper_survives_preemption_signals(resumed):
    import signal

    assert {int(signal.SIGUSR1), int(signal.SIGTERM), int(signal.SIGINT)} <= set(resumed["writer_helper_blocked"])
    assert resumed["writer_helper_state"] in ("S", "R")  # alive, not a zombie
    assert resumed["writer_helper_pid_after_save"] == resumed["writer_helper_pid"]  # it served the next save


@pytest.mark.slow
def test_resume_applies_new_optimizer_settings_to_megatron(resumed):
    num_steps, max_lr = resumed["resumed_scheduler"]
    assert num_steps == resumed["saved_num_steps"] > 1 and max_lr == 5e-4
    for lr, group_max_lr, betas in resumed["resumed_groups"]:
        assert lr == group_max_lr == 5e-4 and betas == [0.8, 0.999]  # warm-up over: the new peak rate
    log = "\n".join(resumed["changed_config_log"])
    for key in ("optim.lr changed: 0.001 -> 0.0005", "optim.lr_warmup_steps changed: 3 -> 1", "optim.adam_beta1 changed: 0.9 -> 0.8"):
        assert key in log, log
    assert all(abs(x) < 1e6 for x in resumed["resumed_loss"])
    assert "algo.adv_estimator: 'grpo' -> 'gae'" in resumed["algo_change_error"]


# ---- bug 6: one run per run directory --------------------------------------------------------


def test_a_second_run_in_the_same_directory_is_told_who_holds_it(tmp_path, repo_root):
    import signal
    import socket
    import subprocess
    import sys

    from megappo.run_dir import RunDirLocked, lock_run_dir

    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from megappo.run_dir import lock_run_dir; lock = lock_run_dir(sys.argv[1]); "
         "print('locked', flush=True); sys.stdin.read()", str(run_dir)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=repo_root,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirLocked, match=rf"in use by another run \(host {socket.gethostname()}, pid {holder.pid}, since .*: -c "):
            lock_run_dir(run_dir)
        assert isinstance(RunDirLocked("x"), ValueError)  # train.py reports ValueErrors in one line
    finally:
        holder.send_signal(signal.SIGKILL)  # the kernel drops the lock with its holder: no stale lock
        holder.wait()
    with lock_run_dir(run_dir):
        with pytest.raises(RunDirLocked, match=f"pid {os.getpid()}"):
            lock_run_dir(run_dir)
    lock_run_dir(run_dir).release()  # released: free again


# ---- bugs 1 and 9: helpers outlive preemption signals and die with the trainer -------------

TRAINER_STANDIN = """
import json, os, sys
from megappo.checkpoint import start_writer_helper
from megappo.data.reward_pool import RewardWorkerPool

pool = RewardWorkerPool(2, timeout_s=30.0)
assert all(o.status == "ok" for o in pool.run(os.getpid, [()] * 4))
workers = sorted(p.pid for p in pool._executor._processes.values())
print(json.dumps({"manager": start_writer_helper(), "workers": workers}), flush=True)
sys.stdin.readline()  # the test signals the helpers meanwhile
from megatron.core.dist_checkpointing.strategies import filesystem_async
queue = filesystem_async._get_write_results_queue()
queue.put("through the helper")
assert all(o.status == "ok" for o in pool.run(os.getpid, [()] * 4))
print(json.dumps({"queue": queue.get(), "workers": sorted(p.pid for p in pool._executor._processes.values()),
                  "restarts": pool.restarts}), flush=True)
sys.stdin.readline()
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line.split()[1] for line in f)  # a zombie is dead
    except FileNotFoundError:
        return True


def test_helpers_survive_preemption_signals_and_die_with_the_trainer(repo_root):
    import signal
    import subprocess
    import sys
    import time

    from megappo.helper_processes import PREEMPTION_SIGNALS, blocked_signals

    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER_STANDIN], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, cwd=repo_root, env=env)  # fmt: skip
    try:
        started = json.loads(trainer.stdout.readline())
        helpers = [started["manager"], *started["workers"]]
        assert started["manager"] is not None and len(set(started["workers"])) == 2
        for pid in helpers:
            assert set(PREEMPTION_SIGNALS) <= blocked_signals(pid)
            for sig in PREEMPTION_SIGNALS:  # what torchrun's killpg and Slurm deliver to every process
                os.kill(pid, sig)
        time.sleep(0.5)
        trainer.stdin.write("go\n")
        trainer.stdin.flush()
        after = json.loads(trainer.stdout.readline())
        assert after == {"queue": "through the helper", "workers": started["workers"], "restarts": 0}
        trainer.send_signal(signal.SIGKILL)  # a rank killed with -9
        trainer.wait()
        deadline = time.monotonic() + 10
        while not all(_gone(pid) for pid in helpers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [pid for pid in helpers if not _gone(pid)] == [], "helpers outlived the trainer"
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()


def test_the_resolved_config_compares_equal_to_its_json_record():
    from megappo.checkpoint_config import config_changes
    from megappo.config import Config, config_to_dict

    run = config_to_dict(Config())
    assert config_changes(json.loads(json.dumps(run, default=str)), run) == []
