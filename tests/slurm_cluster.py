"""A throw-away one-node Slurm cluster on localhost for the launcher tests.

Recipe: /work/shared/notes/slurm-localhost.md. munged, slurmctld and slurmd run as child
processes of the test session with every state file, socket and log under one temporary
directory, on ports picked free at start, so two test sessions on one machine do not meet.
They are stopped by PID (slurmd, slurmctld, munged in that order), never by name.

Client commands (sbatch, scontrol, ...) find the cluster through ``SLURM_CONF``: use
``cluster.env()`` as the environment of every subprocess. Install the packages with
``.ci/setup_slurm.sh``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "srun")
SETUP_HINT = "install Slurm and munge with `.ci/setup_slurm.sh` (Debian: slurmctld slurmd slurm-client munge)"


def missing_binaries() -> list[str]:
    return [name for name in DAEMONS if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SLURM_CONF = """\
ClusterName=megappo-ci
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge}/munge.socket.2,cred_expire=5
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
ReturnToService=2
KillWait=10
MinJobAge=600
MailProg=/bin/true
StateSaveLocation={s}/state
SlurmdSpoolDir={s}/spool
SlurmctldPidFile={s}/slurmctld.pid
SlurmdPidFile={s}/slurmd.pid
SlurmctldLogFile={s}/log/slurmctld.log
SlurmdLogFile={s}/log/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """munged + slurmctld + slurmd under ``root``; ``start()`` waits until the node is idle."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self._procs: list[tuple[str, subprocess.Popen]] = []
        self.munge_dir: Optional[Path] = None

    def env(self, base: Optional[dict[str, str]] = None, **extra: str) -> dict[str, str]:
        """``base`` (default: this process's environment) for the cluster's clients and jobs."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        for key in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"]:
            del env[key]  # a test run inside a Slurm job must not leak that job's settings
        env.update(extra)
        return env

    def start(self, timeout: float = 60.0) -> None:
        s = self.root
        for sub in ("state", "spool", "log"):
            (s / sub).mkdir(parents=True, exist_ok=True)
        # munged runs as user munge, which must reach its directory: pytest's tmp dirs are
        # private to root, so the socket lives in a directory of its own directly under /tmp.
        m = self.munge_dir = Path(tempfile.mkdtemp(prefix="megappo-munge-"))
        m.chmod(0o755)
        shutil.chown(m, "munge", "munge")
        self.conf.write_text(
            SLURM_CONF.format(
                host=self.host, s=s, munge=m, cpus=self.cpus, ctld_port=free_port(), slurmd_port=free_port()
            )
        )
        munged = [
            "setpriv", "--reuid=munge", "--regid=munge", "--init-groups", _which("munged"), "-F",
            f"--socket={m}/munge.socket.2", f"--pid-file={m}/munged.pid",
            f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed",
        ]  # fmt: skip
        self._spawn("munged", munged)
        self._wait(lambda: (m / "munge.socket.2").exists(), 10, "munged socket")
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", str(self.conf)])
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf)])
        self._wait(self._node_idle, timeout, "the node to be idle in sinfo")

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld", "munged"):
            for pname, proc in self._procs:
                if pname != name or proc.poll() is not None:
                    continue
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._procs.clear()
        if self.munge_dir is not None:
            shutil.rmtree(self.munge_dir, ignore_errors=True)
            self.munge_dir = None

    # -- jobs -------------------------------------------------------------------------

    def sbatch(self, args: list[str], env: Optional[dict[str, str]] = None, cwd: Optional[Path] = None) -> str:
        out = subprocess.run(
            [_which("sbatch"), "--parsable", *args], env=env or self.env(), cwd=cwd, capture_output=True, text=True
        )
        if out.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed ({out.returncode}): {out.stderr}")
        return out.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, StdOut, ...)."""
        out = subprocess.run(
            [_which("scontrol"), "show", "job", "-o", job_id], env=self.env(), capture_output=True, text=True
        )
        return dict(re.findall(r"(\w[\w:/]*)=(\S*)", out.stdout))

    def wait_job(self, job_id: str, timeout: float, states: tuple[str, ...] = ("COMPLETED", "FAILED", "CANCELLED",
                 "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE")) -> dict[str, str]:  # fmt: skip
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        self.cancel(job_id)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout:.0f} s; last: {info}\n{self.logs_tail()}")

    def cancel(self, job_id: str, *flags: str) -> None:
        subprocess.run([_which("scancel"), *flags, job_id], env=self.env(), check=False)

    def logs_tail(self, n: int = 30) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / "log" / name
            if path.exists():
                parts.append(f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-n:]))
        return "\n".join(parts)

    # -- internals --------------------------------------------------------------------

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "w")
        proc = subprocess.Popen(cmd, env=self.env(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self._procs.append((name, proc))

    def _node_idle(self) -> bool:
        for name, proc in self._procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}\n{self.logs_tail()}")
        out = subprocess.run(
            [_which("sinfo"), "-h", "-N", "-o", "%T"], env=self.env(), capture_output=True, text=True
        )
        return out.returncode == 0 and out.stdout.strip() == "idle"

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs_tail()}")
