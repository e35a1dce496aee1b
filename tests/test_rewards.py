"""Reward functions (megappo.data.rewards): registry, scores, errors, timeouts, user functions.

The worker pools are module-scoped fixtures: spawning workers (and importing sympy for
math_verify) is the expensive part, and reusing a pool across calls is itself under test.
"""

from __future__ import annotations

import logging
import sys
import textwrap

import pytest

from megappo.config.schema import RewardConfig
from megappo.data.rewards import RewardFunction, gsm8k_reward, resolve_reward

USER_MODULE = textwrap.dedent(
    '''
    import os, signal, sys, time

    def length_score(response, answer, prompt):
        return len(response) / 10

    def flaky(response, answer, prompt):
        if response == "boom":
            raise RuntimeError("kaboom")
        if response == "slow":
            time.sleep(60)
        if response == "exit":
            sys.exit(1)
        if response == "nan":
            return float("nan")
        if response == "text":
            return "yes"
        return response == answer

    def stubborn(response, answer, prompt):
        if response == "stuck":  # a hang that no signal ends: only killing the worker does
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            time.sleep(60)
        if response == "die":
            os._exit(3)
        return True

    def imported_modules(response, answer, prompt):
        return float(sum(name in sys.modules for name in ("torch", "transformers", "megatron", "math_verify")))

    exact = lambda response, answer, prompt: response.strip() == answer
    '''
)


@pytest.fixture(scope="module")
def user_module(tmp_path_factory):
    directory = tmp_path_factory.mktemp("user_rewards")
    (directory / "my_rewards.py").write_text(USER_MODULE)
    sys.path.insert(0, str(directory))
    yield directory
    sys.path.remove(str(directory))
    sys.modules.pop("my_rewards", None)


@pytest.fixture(scope="module")
def math_reward():
    with RewardFunction.from_config(RewardConfig(fn="math_verify", num_workers=2, timeout_s=20.0)) as reward:
        yield reward


def test_registry_and_errors():
    assert resolve_reward("gsm8k").fn is gsm8k_reward
    with pytest.raises(ValueError, match="Did you mean 'gsm8k'"):
        resolve_reward("gsm8")
    with pytest.raises(ValueError, match="cannot import no_such_module_xyz"):
        resolve_reward("no_such_module_xyz:fn")


def test_package_exports_are_lazy():
    import megappo.data as data
    from megappo.data import PromptLoader, RewardFunction as Exported

    assert Exported is RewardFunction and PromptLoader.__module__ == "megappo.data.loader"
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        data.Nope  # noqa: B018


def test_gsm8k_scores_and_format_reward():
    cfg = RewardConfig(fn="gsm8k", format_reward=0.1, correct_score=1.0, incorrect_score=-0.5)
    with RewardFunction.from_config(cfg) as reward:
        result = reward.score(
            ["so #### 1,234", "the answer is 72.", "#### 5", "no idea"],
            ["work #### 1234", "#### 72", "#### 6", "#### 1"],
            ["q"] * 4,
        )
    assert result.scores == pytest.approx([1.1, 1.0, -0.4, -0.5])
    assert result.correct == [True, True, False, False]
    assert result.well_formed == [True, False, True, False]
    assert (result.num_errors, result.num_timeouts) == (0, 0)
    assert reward._pool is None  # gsm8k runs in-process


def test_inline_error_scores_zero_and_is_counted(caplog):
    with RewardFunction.from_config(RewardConfig(fn="gsm8k")) as reward, caplog.at_level(logging.WARNING):
        result = reward.score(["#### 3", "#### 3"], ["#### 3", "no number in the reference"], ["", ""])
    assert result.scores == [1.0, 0.0] and result.correct == [True, False] and result.num_errors == 1
    assert "1 of 2 responses raised and scored 0" in caplog.text and "no number in the reference" in caplog.text


def test_toy_reward():
    with RewardFunction.from_config(RewardConfig(fn="toy", format_reward=0.5)) as reward:
        result = reward.score(["68", " 68<eos>junk", "6 8", "69", "abc"], ["68"] * 5, ["23+45="] * 5)
    assert result.correct == [True, True, False, False, False]
    assert result.scores == [1.5, 1.5, 0.0, 0.5, 0.0]


def test_math_verify_equivalences(math_reward):
    cases = [
        ("The answer is $\\boxed{0.5}$.", "\\frac{1}{2}", True),
        ("so it is 1/2", "0.5", True),
        ("$\\boxed{2^{1/2}}$", "\\sqrt{2}", True),
        ("\\boxed{\\frac{2}{4}}", "\\boxed{\\frac{1}{2}}", True),
        ("\\boxed{0.6}", "\\frac{1}{2}", False),
        ("I do not know", "3", False),
    ]
    result = math_reward.score([c[0] for c in cases], [c[1] for c in cases], [""] * len(cases))
    assert result.correct == [c[2] for c in cases]
    assert result.scores == [1.0 if c[2] else 0.0 for c in cases]
    assert result.well_formed == ["\\boxed" in c[0] for c in cases]
    # The pool is reused: a second call does not start new workers.
    pool = math_reward._pool._executor
    assert math_reward.score(["\\boxed{3}"], ["3"], [""]).correct == [True]
    assert math_reward._pool._executor is pool


def test_math_verify_unparseable_reference_is_an_error(math_reward):
    result = math_reward.score(["\\boxed{1}"], ["\\text{}"], [""])
    assert result.scores == [0.0] and result.num_errors == 1


def test_user_function_errors_and_timeouts(user_module, caplog):
    cfg = RewardConfig(fn="my_rewards:flaky", num_workers=2, timeout_s=0.5)
    with RewardFunction.from_config(cfg, kill_grace_s=20.0) as reward, caplog.at_level(logging.WARNING):
        responses = ["7", "boom", "slow", "exit", "nan", "text", "8"]
        result = reward.score(responses, ["7"] * 7, [""] * 7)
        assert result.correct == [True, False, False, False, False, False, False]
        assert result.scores == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
        assert (result.num_errors, result.num_timeouts) == (4, 1)
        assert reward._pool.restarts == 0  # the in-worker timer ended the sleep
        assert "4 of 7 responses raised" in caplog.text and "RuntimeError: kaboom" in caplog.text
        assert "1 of 7 responses timed out" in caplog.text
        later = reward.score(["3", "4"], ["3", "3"], ["", ""])  # later calls still work
        assert later.correct == [True, False] and later.num_errors == later.num_timeouts == 0


def test_hard_hang_kills_and_restarts_the_pool(user_module):
    cfg = RewardConfig(fn="my_rewards:stubborn", num_workers=2, timeout_s=0.3)
    with RewardFunction.from_config(cfg, kill_grace_s=0.7) as reward:
        assert reward.score(["ok"], ["x"], [""]).scores == [1.0]  # workers started
        result = reward.score(["a", "stuck", "b", "c"], ["x"] * 4, [""] * 4)
        assert result.scores == [1.0, 0.0, 1.0, 1.0] and result.num_timeouts == 1
        assert reward._pool.restarts == 1
        assert reward.score(["e"], ["x"], [""]).scores == [1.0]


def test_crashing_worker_is_an_error_and_bystanders_rerun(user_module):
    # A short watchdog: the re-runs on fresh pools must get fresh clocks, or they time out.
    cfg = RewardConfig(fn="my_rewards:stubborn", num_workers=2, timeout_s=0.3)
    with RewardFunction.from_config(cfg, kill_grace_s=0.2) as reward:
        result = reward.score(["die", "d", "f"], ["x"] * 3, [""] * 3)
        assert result.scores == [0.0, 1.0, 1.0]
        assert (result.num_errors, result.num_timeouts) == (1, 0)
        assert reward._pool.restarts == 2  # with its bystander, then alone


def test_user_function_from_file_float_scores_and_light_workers(user_module):
    path = f"{user_module / 'my_rewards.py'}:length_score"
    with RewardFunction.from_config(RewardConfig(fn=path, num_workers=1, format_reward=1.0)) as reward:
        result = reward.score(["abcde", "abcdefghij"], ["", ""], ["", ""])
        assert result.scores == [0.5, 1.0]  # a float is the score; no marker, so no format reward
        assert result.correct == [False, True]  # correct: at least reward.correct_score
    with RewardFunction.from_config(RewardConfig(fn="my_rewards:imported_modules", num_workers=1)) as reward:
        assert reward.score(["x"], ["y"], [""]).scores == [0.0]  # no torch/transformers in workers
    with RewardFunction.from_config(RewardConfig(fn="my_rewards:exact", num_workers=1)) as reward:
        assert reward.score(["5 ", "6"], ["5", "5"], ["", ""]).correct == [True, False]  # a lambda works


def test_register_reward_runs_in_workers(user_module):
    import my_rewards

    from megappo.data.rewards import REWARDS, RewardSpec, register_reward

    register_reward("my_exact", RewardSpec(my_rewards.flaky, well_formed=str.isdigit))
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_reward("my_exact", RewardSpec(my_rewards.flaky))
        cfg = RewardConfig(fn="my_exact", num_workers=1, format_reward=0.5)
        with RewardFunction.from_config(cfg) as reward:
            assert reward.score(["4", "x"], ["4", "4"], ["", ""]).scores == [1.5, 0.0]
    finally:
        REWARDS.pop("my_exact")


def test_user_function_path_errors(user_module):
    with pytest.raises(ValueError, match="has no attribute 'flakey'; did you mean 'flaky'"):
        resolve_reward("my_rewards:flakey")
    with pytest.raises(ValueError, match="no such file"):
        resolve_reward("/nonexistent/rewards.py:fn")
    with pytest.raises(ValueError, match="score\\(\\) needs one answer and one prompt per response"):
        RewardFunction.from_config(RewardConfig(fn="gsm8k")).score(["a"], [], [])


def test_workers_do_not_reimport_the_parents_main(tmp_path, user_module, repo_root):
    # A script without a __main__ guard (as a torchrun entry point may be): spawn would
    # normally re-run it in every worker.
    script = tmp_path / "entry.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path[:0] = [{str(repo_root)!r}, {str(user_module)!r}]
            print("MAIN RUNS", flush=True)
            from megappo.config.schema import RewardConfig
            from megappo.data.rewards import RewardFunction
            with RewardFunction.from_config(RewardConfig(fn="my_rewards:flaky", num_workers=2)) as reward:
                print(reward.score(["1", "2"], ["1", "1"], ["", ""]).correct, flush=True)
            """
        )
    )
    import subprocess

    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["MAIN RUNS", "[True, False]"]
    assert done.stderr == ""


# ---- bounds on failures and time (issue 14, bug 5), one warning line per batch -------------


def test_failed_batches_in_a_row_stop_the_run():
    from megappo.data.rewards import RewardFailureError

    bad, good = ["no number"] * 4, ["#### 3"] * 4
    with RewardFunction.from_config(RewardConfig(fn="gsm8k")) as reward:  # defaults: > 0.5 failed, 2 in a row
        assert reward.score(["#### 3"] * 4, bad, [""] * 4).num_errors == 4  # first failed batch: scored 0
        assert reward.score(["#### 3"] * 4, bad[:2] + good[:2], [""] * 4).num_errors == 2  # half: not failed
        reward.score(["#### 3"] * 4, bad, [""] * 4)
        with pytest.raises(RewardFailureError) as err:
            reward.score(["#### 3"] * 4, bad[:3] + good[:1], [""] * 4)
    message = str(err.value)
    assert "failed on 3 of 4 responses (3 raised, 0 timed out; first error: ValueError: no number" in message
    assert "2 batch(es) in a row" in message and "reward.max_failed_fraction" in message
    with RewardFunction.from_config(RewardConfig(fn="gsm8k", max_failed_batches=1)) as reward:
        with pytest.raises(RewardFailureError):
            reward.score(["#### 3"] * 2, bad[:2], [""] * 2)
    with RewardFunction.from_config(RewardConfig(fn="gsm8k", max_failed_fraction=1.0, max_failed_batches=1)) as reward:
        assert reward.score(["#### 3"] * 2, bad[:2], [""] * 2).num_errors == 2  # 1 disables the bound
    with pytest.raises(ValueError, match="reward.max_failed_fraction must be in"):
        RewardFunction.from_config(RewardConfig(fn="gsm8k", max_failed_fraction=1.5))


def test_batch_deadline_bounds_a_batch_of_hanging_rewards(user_module, caplog):
    import time

    # Six responses that sleep 60 s, two workers, a 30 s per-item timeout: one at a time they
    # would take 3 x 30 s; the batch deadline ends them together after about 1.5 s.
    cfg = RewardConfig(fn="my_rewards:flaky", num_workers=2, timeout_s=30.0, batch_timeout_s=1.5, max_failed_fraction=1.0)
    with RewardFunction.from_config(cfg) as reward, caplog.at_level(logging.WARNING):
        assert reward.score(["7"], ["7"], [""]).correct == [True]  # workers started
        t0 = time.monotonic()
        result = reward.score(["7", "slow", "slow", "slow", "slow", "slow", "slow"], ["7"] * 7, [""] * 7)
        elapsed = time.monotonic() - t0
        assert result.correct[0] and result.num_timeouts == 6 and result.scores[1:] == [0.0] * 6
        assert 1.4 < elapsed < 12.0, elapsed
        assert "6 of 7 responses timed out and scored 0 (first: the batch's reward deadline (1.5 s) passed)" in caplog.text
        assert reward.score(["8", "7"], ["7", "7"], ["", ""]).correct == [False, True]  # a fresh pool scores again


def test_a_dying_worker_logs_one_line_per_batch(user_module, caplog):
    cfg = RewardConfig(fn="my_rewards:stubborn", num_workers=2, timeout_s=5.0, max_failed_fraction=1.0)
    with RewardFunction.from_config(cfg, kill_grace_s=5.0) as reward, caplog.at_level(logging.WARNING):
        result = reward.score(["die"] * 3 + ["ok"], ["x"] * 4, [""] * 4)
    assert result.num_errors == 3 and result.scores[3] == 1.0
    lines = [r.getMessage() for r in caplog.records if "restarted" in r.getMessage()]
    assert len(lines) == 1, lines
    assert f"restarted {reward._pool.restarts} time(s) in a batch of 4 items" in lines[0] and reward._pool.restarts >= 3


def test_workers_survive_preemption_signals(user_module):
    """torchrun's killpg and Slurm signal every process: the trainer handles SIGUSR1 / SIGTERM
    (and Ctrl-C's SIGINT) to save; reward workers must not die of them (bug 1)."""
    import os
    import time

    from megappo.helper_processes import PREEMPTION_SIGNALS, blocked_signals

    with RewardFunction.from_config(RewardConfig(fn="my_rewards:flaky", num_workers=2)) as reward:
        assert reward.score(["1"], ["1"], [""]).correct == [True]
        executor = reward._pool._executor
        pids = [p.pid for p in executor._processes.values()]
        assert len(pids) == 2
        for pid in pids:
            assert set(PREEMPTION_SIGNALS) <= blocked_signals(pid)
            for sig in PREEMPTION_SIGNALS:
                os.kill(pid, sig)
        time.sleep(0.5)
        assert reward.score(["1", "2", "3"], ["1", "2", "4"], [""] * 3).correct == [True, True, False]
        assert reward._pool._executor is executor and reward._pool.restarts == 0
    assert not set(PREEMPTION_SIGNALS) & blocked_signals(os.getpid())  # the parent's mask is restored


def test_a_worker_that_died_between_batches_is_replaced(user_module, caplog):
    import os
    import signal
    import time

    with RewardFunction.from_config(RewardConfig(fn="my_rewards:flaky", num_workers=1)) as reward:
        assert reward.score(["1"], ["1"], [""]).correct == [True]
        (worker,) = reward._pool._executor._processes.values()
        os.kill(worker.pid, signal.SIGKILL)  # e.g. the OOM killer, between two steps
        time.sleep(1.0)
        with caplog.at_level(logging.WARNING):
            assert reward.score(["1", "2"], ["1", "1"], ["", ""]).correct == [True, False]
        assert reward._pool.restarts == 1 and "found broken before a batch" in caplog.text
