"""The launchers, end to end on CPU: launch/torchrun.sh, launch/slurm/train.sbatch and
launch/slurm/sglang_servers.sbatch, with the toy recipe on a one-node Slurm cluster started on
localhost (tests/slurm_cluster.py; packages from .ci/setup_slurm.sh).

- --dry-run through the launchers validates the recipe against the process count: a good one
  exits 0, a world size that TP x PP does not divide exits 2 with the message, and a bad
  recipe submitted for real fails in the job before torchrun starts;
- torchrun.sh trains on one node; two torchrun "nodes" meet through a c10d rendezvous;
- an sbatch job trains and checkpoints; one signalled for preemption (SIGUSR1 to the batch
  shell) checkpoints, requeues itself and resumes, with every step in metrics.jsonl once;
- the SGLang server job hands its URLs to a dependent trainer job (a stand-in server:
  tests/mp/launch_fake_sglang.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import SETUP_HINT, SlurmCluster, free_port, missing_binaries

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN_SH = ROOT / "launch" / "torchrun.sh"
TRAIN_SBATCH = ROOT / "launch" / "slurm" / "train.sbatch"
SGLANG_SBATCH = ROOT / "launch" / "slurm" / "sglang_servers.sbatch"
TOY_RECIPE = ROOT / "recipes" / "toy_liteppo_cpu.yaml"
BIG_RECIPE = ROOT / "recipes" / "gsm8k_liteppo.yaml"  # TP 2: world sizes must be even
JOB_TIMEOUT = 400.0
QUIET = ["checkpoint.save_hf_at_end=false", "logging.progress_bar=false", "logging.tensorboard=false",
         "train.eval_every=0", "checkpoint.save_every=0"]  # fmt: skip


def _env(**extra: str) -> dict[str, str]:
    """The test's interpreter first on PATH (the launchers call `python` and `torchrun`)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # CPU recipes
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for key in ("NPROC", "NPROC_PER_NODE", "NNODES", "RECIPE", "OVERRIDES", "WORLD_SIZE", "RANK"):
        env.pop(key, None)
    env.update(extra)
    return env


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _assert_trained(run_dir: Path, steps: int) -> None:
    assert _steps(run_dir) == list(range(1, steps + 1))
    latest = run_dir / "checkpoints" / "latest"
    assert latest.is_file(), f"no checkpoint pointer in {run_dir / 'checkpoints'}"
    assert (run_dir / "checkpoints" / latest.read_text().strip()).is_dir()


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> list[str]:
    """Overrides pointing the toy recipe at a tiny random model and toy data (no warm-up)."""
    from megappo.demo import prepare

    paths = prepare(tmp_path_factory.mktemp("toy"), seed=7, sft_steps=0)
    return [f"model.hf_path={paths['model']}", f"data.train_path={paths['train']}", f"data.eval_path={paths['eval']}"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node Slurm cluster on localhost for this module's jobs."""
    missing = missing_binaries()
    problem = None
    if missing:
        problem = f"Slurm is not installed (missing {', '.join(missing)}): {SETUP_HINT}"
    elif os.geteuid() != 0:
        problem = "starting munged and slurmd for the test cluster needs root"
    if problem:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI must run the Slurm launcher tests: {problem}")
        pytest.skip(problem)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def _run(cmd: list, env: dict, timeout: float = 120, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


# -- dry-run through the launchers (no Slurm, no torch: seconds) ------------------------------


def test_nothing_kills_processes_by_name():
    """House rule: launchers, CI and tests stop processes by PID (or process group), never
    by name, which could hit another user's or another job's processes."""
    import re

    by_name = re.compile(r"\b(pkill|killall|pgrep)\b")
    files = [ROOT / "Makefile", *(ROOT / ".ci").iterdir()]
    for folder in ("launch", "tests", "megappo", "tools"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".sh", ".sbatch", "") and p.is_file()]
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in files if "__pycache__" not in p.parts
                 for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
                 if by_name.search(line) and p.name != Path(__file__).name]  # fmt: skip
    assert len(files) > 20 and not offenders, offenders


def test_torchrun_sh_dry_run_good_layout():
    out = _run([TORCHRUN_SH, BIG_RECIPE, "--nproc", "8", "--dry-run"], _env())
    assert out.returncode == 0, out.stderr
    assert "world size 8 = TP 2 x PP 1 x DP 4" in out.stdout
    assert "--dry-run --world-size 8" in out.stderr  # the command is printed


def test_torchrun_sh_dry_run_bad_layout():
    out = _run([TORCHRUN_SH, BIG_RECIPE, "--dry-run"], _env(NPROC="3"))
    assert out.returncode == 2
    assert "error: world size 3 is not divisible by parallel.tensor_model_parallel_size" in out.stderr


def test_torchrun_sh_needs_a_process_count_without_gpus():
    if shutil.which("nvidia-smi"):
        pytest.skip("nvidia-smi present: the GPU count is used")
    out = _run([TORCHRUN_SH, BIG_RECIPE, "--dry-run"], _env())
    assert out.returncode == 2
    assert "--nproc N" in out.stderr


def test_train_sbatch_dry_run_outside_slurm():
    good = _run([TRAIN_SBATCH, BIG_RECIPE, "--dry-run"], _env(NNODES="2", NPROC_PER_NODE="4"))
    assert good.returncode == 0, good.stderr
    assert "world size 8 = TP 2 x PP 1 x DP 4" in good.stdout
    bad = _run([TRAIN_SBATCH, BIG_RECIPE, "--dry-run"], _env(NNODES="3", NPROC_PER_NODE="1"))
    assert bad.returncode == 2
    assert "error: world size 3 is not divisible" in bad.stderr
    from_env = _run([TRAIN_SBATCH, "--dry-run"], _env(NPROC_PER_NODE="8", RECIPE=str(BIG_RECIPE),
                                                      OVERRIDES="parallel.tensor_model_parallel_size=4 train.steps=5"))
    assert from_env.returncode == 0, from_env.stderr
    assert "world size 8 = TP 4 x PP 1 x DP 2" in from_env.stdout and "\n  steps: 5\n" in from_env.stdout
    no_job = _run([TRAIN_SBATCH, BIG_RECIPE], _env(NPROC_PER_NODE="2"))
    assert no_job.returncode == 2
    assert "not inside a Slurm job" in no_job.stderr


# -- torchrun ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_sh_trains(toy, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [TORCHRUN_SH, TOY_RECIPE, "--nproc", "2", *toy, f"train.run_dir={run_dir}", "train.steps=2", *QUIET]
    out = _run(cmd, _env(), timeout=JOB_TIMEOUT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "+ torchrun --standalone --nnodes=1 --nproc-per-node=2" in out.stderr
    _assert_trained(run_dir, 2)


@pytest.mark.slow
def test_preemption_signal_to_the_process_group_saves_and_exits_124(toy, tmp_path):
    """Issue 14, bug 1: SIGUSR1 to the launcher's whole process group (torchrun's killpg and
    Slurm reach every process) after a periodic save, with a reward run in worker processes:
    the reward workers and the checkpoint writer's helper survive, the trainer saves the
    current step, the launcher exits 124 (torchrun alone exits 1), and a rerun resumes.
    The launcher finds the checkout's .venv itself: no interpreter on PATH."""
    run_dir = tmp_path / "run"
    steps = 12
    cmd = [TORCHRUN_SH, TOY_RECIPE, "--nproc", "2", *toy, f"train.run_dir={run_dir}", f"train.steps={steps}", *QUIET,
           "checkpoint.save_every=2", "checkpoint.keep_last=2", "reward.fn=megappo.data.answers:exact_integer_reward"]  # fmt: skip
    env = _env(PATH="/usr/bin:/bin")  # neither python nor torchrun on PATH
    env.pop("VIRTUAL_ENV", None)
    if (ROOT / ".venv" / "bin" / "python").resolve() != Path(sys.executable).resolve():
        env["PYTHON"] = sys.executable  # another interpreter runs the tests: use it
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(c) for c in cmd], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + JOB_TIMEOUT
        while len(_steps(run_dir)) < 3:  # past the first periodic save: the helpers exist
            assert proc.poll() is None, log_path.read_text()[-4000:]
            assert time.monotonic() < deadline, "no third step within the timeout"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGUSR1)
        code = proc.wait(timeout=JOB_TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    first = log_path.read_text(errors="replace")
    assert code == 124, first[-6000:]
    assert "every rank checkpointed after the preemption signal" in first
    assert "BrokenPipeError" not in first and "BrokenProcessPool" not in first and "restarted" not in first
    done = _steps(run_dir)
    assert done == list(range(1, len(done) + 1)) and len(done) < steps
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{done[-1]}"
    again = _run(cmd, env, timeout=JOB_TIMEOUT)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-4000:]
    assert "resumed from" in again.stdout + again.stderr
    _assert_trained(run_dir, steps)


@pytest.mark.slow
def test_a_reward_that_always_fails_stops_the_run(toy, tmp_path):
    """Issue 14, bug 5: every reward raises -> the second failed batch in a row stops the run on
    every rank with the reward's error (it used to train on zeros and exit 0)."""
    (tmp_path / "broken_reward.py").write_text("def score(response, answer, prompt):\n    raise RuntimeError('reward service down')\n")
    run_dir = tmp_path / "run"
    cmd = [TORCHRUN_SH, TOY_RECIPE, "--nproc", "2", *toy, f"train.run_dir={run_dir}", "train.steps=4", *QUIET,
           f"reward.fn={tmp_path / 'broken_reward.py'}:score"]  # fmt: skip
    out = _run(cmd, _env(), timeout=JOB_TIMEOUT)
    text = out.stdout + out.stderr
    assert out.returncode not in (0, 124), text[-4000:]
    assert "RewardFailureError" in text and "failed on 256 of 256 responses (256 raised" in text and "reward service down" in text, text[-6000:]
    assert _steps(run_dir) == [1]  # the first failed batch trained (on zeros); the second stopped the run


@pytest.mark.slow
def test_two_node_rendezvous_on_localhost(toy, tmp_path):
    """Two torchrun agents (one process each) meet through c10d on 127.0.0.1 and train."""
    run_dir = tmp_path / "run"
    port = free_port()
    procs = []
    for node in range(2):
        cmd = [
            "torchrun", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes",
            "-m", "megappo.train", "--config", str(TOY_RECIPE), *toy,
            f"train.run_dir={run_dir}", "train.steps=2", *QUIET,
        ]  # fmt: skip
        log = open(tmp_path / f"node{node}.log", "w")
        procs.append(subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))  # fmt: skip
        log.close()
    deadline = time.monotonic() + JOB_TIMEOUT
    try:
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # the agent's own session: it and its workers
                p.wait()
    logs = "\n".join((tmp_path / f"node{n}.log").read_text()[-3000:] for n in range(2))
    assert codes == [0, 0], logs
    _assert_trained(run_dir, 2)


# -- Slurm ------------------------------------------------------------------------------------


def _host_resolves(host: str) -> bool:
    try:
        socket.gethostbyname(host)
        return True
    except OSError:
        return False


def _sbatch_train(slurm: SlurmCluster, tmp_path: Path, args: list, nproc: int = 2, cpus: int = 2, **env: str) -> str:
    cpus = min(cpus, slurm.cpus)
    if not _host_resolves(slurm.host):
        env.setdefault("RDZV_HOST", "127.0.0.1")  # the node name is the rendezvous host by default
    return slurm.sbatch(
        [f"--cpus-per-task={cpus}", f"--output={tmp_path}/batch-%j.out", str(TRAIN_SBATCH), *map(str, args)],
        env=slurm.env(_env(NPROC_PER_NODE=str(nproc), **env)),
        cwd=ROOT,
    )




def _batch_output(tmp_path: Path, job: str) -> str:
    path = tmp_path / f"batch-{job}.out"
    return path.read_text(errors="replace") if path.exists() else "(no batch output)"


@pytest.mark.slow
def test_sbatch_validates_before_starting(slurm, tmp_path):
    run_dir = tmp_path / "run"
    bad = _sbatch_train(slurm, tmp_path, [BIG_RECIPE, f"train.run_dir={run_dir}"], nproc=3)
    good = _sbatch_train(slurm, tmp_path, [BIG_RECIPE, f"train.run_dir={run_dir}", "--dry-run"], nproc=2)
    bad_info = slurm.wait_job(bad, timeout=120)
    assert bad_info["JobState"] == "FAILED" and bad_info["ExitCode"] == "2:0", bad_info
    assert "error: world size 3 is not divisible" in _batch_output(tmp_path, bad)
    assert not run_dir.exists(), "torchrun was started for an invalid recipe"
    good_info = slurm.wait_job(good, timeout=120)
    assert good_info["JobState"] == "COMPLETED", _batch_output(tmp_path, good)
    assert "world size 2 = TP 2 x PP 1 x DP 1" in _batch_output(tmp_path, good)


@pytest.mark.slow
def test_sbatch_trains_and_checkpoints(slurm, toy, tmp_path):
    """Also: given SGLANG_JOB_ID, a completed training cancels that (server) job."""
    run_dir = tmp_path / "run"
    servers = slurm.sbatch(["--cpus-per-task=1", "--output=/dev/null", "--wrap", "sleep 600"], env=slurm.env(_env()))
    job = _sbatch_train(
        slurm, tmp_path, [TOY_RECIPE, *toy, f"train.run_dir={run_dir}", "train.steps=3", *QUIET],
        cpus=1, SGLANG_JOB_ID=servers,
    )  # fmt: skip
    try:
        info = slurm.wait_job(job, timeout=JOB_TIMEOUT)
        node_log = run_dir / "logs" / f"{job}-{slurm.host}.log"
        assert info["JobState"] == "COMPLETED", _batch_output(tmp_path, job) + (
            node_log.read_text()[-4000:] if node_log.exists() else ""
        )
        assert node_log.is_file()
        _assert_trained(run_dir, 3)
        assert slurm.wait_job(servers, timeout=60)["JobState"] == "CANCELLED"
    finally:
        slurm.cancel(servers)  # already done when the test passes


@pytest.mark.slow
def test_sbatch_preemption_requeues_and_resumes(slurm, toy, tmp_path):
    """SIGUSR1 to the batch shell (what --signal=B:USR1@120 sends before the time limit):
    the trainer checkpoints and stops, the job requeues itself and the next run resumes.
    With checkpoint.save_every=0 the only checkpoint before the end is the preemption one."""
    run_dir = tmp_path / "run"
    steps = 8
    job = _sbatch_train(slurm, tmp_path, [TOY_RECIPE, *toy, f"train.run_dir={run_dir}", f"train.steps={steps}", *QUIET])
    deadline = time.monotonic() + JOB_TIMEOUT
    while not _steps(run_dir):
        state = slurm.job_info(job).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"{state}: {_batch_output(tmp_path, job)}"
        assert time.monotonic() < deadline, "no training step within the timeout"
        time.sleep(0.2)
    slurm.cancel(job, "--signal=USR1", "--batch")
    info = slurm.wait_job(job, timeout=JOB_TIMEOUT)
    batch = _batch_output(tmp_path, job)
    node_log = (run_dir / "logs" / f"{job}-{slurm.host}.log").read_text(errors="replace")
    assert info["JobState"] == "COMPLETED", batch + node_log[-4000:]
    assert info["Restarts"] == "1", info
    assert "requeueing job" in batch
    assert "resumed from" in node_log, node_log[-4000:]
    assert _steps(run_dir) == list(range(1, steps + 1)), "steps lost or repeated across the requeue"
    _assert_trained(run_dir, steps)


@pytest.mark.slow
def test_sglang_servers_hand_urls_to_the_trainer(slurm, tmp_path):
    if slurm.cpus < 2:
        pytest.skip("needs 2 CPUs: the server job and the trainer job run side by side")
    if not _host_resolves(slurm.host):
        pytest.skip(f"the node name {slurm.host!r} does not resolve: the server URLs use it")
    fake = tmp_path / "fake"
    (fake / "sglang").mkdir(parents=True)
    (fake / "sglang" / "__init__.py").write_text("")
    shutil.copy(ROOT / "tests" / "mp" / "launch_fake_sglang.py", fake / "sglang" / "launch_server.py")
    run_dir = tmp_path / "run"
    port = free_port()
    srv = slurm.sbatch(
        ["--cpus-per-task=1", f"--output={tmp_path}/batch-%j.out", str(SGLANG_SBATCH), "/models/m", str(run_dir),
         "--fake-startup-s", "2"],  # fmt: skip
        env=slurm.env(_env(PYTHONPATH=str(fake), SGLANG_PORT=str(port))),
        cwd=ROOT,
    )
    urls_file = run_dir / "sglang_urls.txt"
    trainer = slurm.sbatch(
        ["--cpus-per-task=1", f"--dependency=after:{srv}", f"--output={tmp_path}/batch-%j.out", str(TRAIN_SBATCH),
         str(BIG_RECIPE), "rollout.engine=sglang_server", f"train.run_dir={run_dir}", "--dry-run"],  # fmt: skip
        env=slurm.env(_env(NPROC_PER_NODE="2", SGLANG_URLS_FILE=str(urls_file), SGLANG_JOB_ID=srv)),
        cwd=ROOT,
    )
    try:
        info = slurm.wait_job(trainer, timeout=180)
        url = f"http://{slurm.host}:{port}"
        assert info["JobState"] == "COMPLETED", _batch_output(tmp_path, trainer) + _batch_output(tmp_path, srv)
        assert urls_file.read_text().splitlines() == [f"# slurm job {srv}", url]
        assert f"rollout.server_urls=[{url}]" in _batch_output(tmp_path, srv)
        assert f"server_urls:\n  - {url}" in _batch_output(tmp_path, trainer)
        assert slurm.job_info(srv)["JobState"] == "RUNNING"
    finally:
        slurm.cancel(srv)
    slurm.wait_job(srv, timeout=60)
    deadline = time.monotonic() + 30
    while urls_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not urls_file.exists(), "the server job left its URL file behind"
