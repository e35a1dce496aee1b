"""The prepared GPU check (``tools/gpu_check.py``, ``tools/gpu_check.sh``): its JSON
assembly and argument handling on CPU, a CPU smoke run of two of its sections (slow), and,
under the ``gpu`` marker (skipped without CUDA), the whole check on the GPU with every
pass/fail line asserted, so a user with a GPU gets the same checks from pytest.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def test_parse_json_output_takes_the_last_object_after_logs():
    text = 'log line\n{"a": 1}\nmore\n{\n "b": {"c": 2}\n}\n'
    assert gpu_check.parse_json_output(text) == {"b": {"c": 2}}
    with pytest.raises(ValueError, match="no JSON"):
        gpu_check.parse_json_output("nothing here\n")


def _good_report(device="cuda"):
    gib = 2**30
    return {
        "device": device,
        "actor_update": {"tokens_per_s": 5e4, "mfu": 0.4},
        "rl_step": {"phases_s": {"time/rollout": 1.0}, "ratio_min": 1.0, "ratio_max": 1.0, "kl_ref": 0.0},
        "probe": {
            "loss_scaling": {"passed": True}, "weight_sync": {"gbps": 3.0},
            "offload": {"bit_exact": True, "next_step_finite": True, "freed_bytes": 20 * gib},
            "memory": {"before": {"allocated": 25 * gib, "reserved": 40 * gib},
                       "offloaded": {"allocated": 4 * gib, "reserved": 5 * gib}},
        },
    }


def test_checks_pass_on_a_good_report_and_each_fails_on_its_fault():
    good = gpu_check.checks(_good_report())
    assert set(good) == {"actor_update_ran", "rl_step_ran", "first_step_ratio_is_1", "first_step_kl_is_0",
                         "loss_scaling_self_check", "weight_sync_ran", "offload_bit_exact", "offload_frees_memory"}
    assert all(good.values())
    faults = {
        "actor_update_ran": lambda r: r["actor_update"].update(mfu=1.5),
        "rl_step_ran": lambda r: r["rl_step"].update(error="exit 1"),
        "first_step_ratio_is_1": lambda r: r["rl_step"].update(ratio_max=1.0000001),
        "first_step_kl_is_0": lambda r: r["rl_step"].update(kl_ref=1e-9),
        "loss_scaling_self_check": lambda r: r["probe"]["loss_scaling"].update(passed=False),
        "weight_sync_ran": lambda r: r["probe"]["weight_sync"].update(gbps=0.0),
        "offload_bit_exact": lambda r: r["probe"]["offload"].update(bit_exact=False),
        "offload_frees_memory": lambda r: r["probe"]["memory"]["offloaded"].update(allocated=20 * 2**30),
    }
    for name, fault in faults.items():
        report = _good_report()
        fault(report)
        got = gpu_check.checks(report)
        assert [k for k, v in got.items() if not v] == [name], name
    # Only the sections that ran are checked; on CPU there is no memory check.
    cpu = _good_report("cpu")
    del cpu["rl_step"]
    assert set(gpu_check.checks(cpu)) == {"actor_update_ran", "loss_scaling_self_check", "weight_sync_ran", "offload_bit_exact"}


def test_first_step_summary_reads_step_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "eval/accuracy": 0.3},
            {"step": 1, "time/rollout": 2.0, "time/train": 1.0, "actor/ratio_min": 1.0, "actor/ratio_max": 1.0,
             "actor/kl_ref": 0.0, "reward/mean": 0.5},
            {"step": 2, "time/rollout": 9.0}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    s = gpu_check.first_step_summary(path)
    assert s["phases_s"] == {"time/rollout": 2.0, "time/train": 1.0} and s["ratio_max"] == 1.0 and s["kl_ref"] == 0.0
    path.write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(ValueError, match="no step 1"):
        gpu_check.first_step_summary(path)


def test_without_cuda_the_check_refuses_and_the_shell_script_checks_its_wheels(tmp_path):
    env = {**_env(), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--out", str(tmp_path / "r.json")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA device is visible" in proc.stderr
    sh = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--wheels", str(tmp_path)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=60)
    assert sh.returncode == 2 and "holds no .whl files" in sh.stderr


def test_a_spent_budget_still_writes_the_report(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--cpu-smoke", "--budget", "5",
                           "--out", str(out)], cwd=ROOT, env={**_env(), "CUDA_VISIBLE_DEVICES": ""},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    for section in gpu_check.SECTIONS:
        assert report[section] == {"error": "not run: the 5 s budget is spent"}
    assert report["checks"] and not any(report["checks"].values())


@pytest.mark.slow
def test_cpu_smoke_run_writes_one_report(tmp_path):
    """The actor-update and probe sections at tiny shapes on the CPU (the RL step section is
    the end-to-end tests' subject; it ran here too when this test was written)."""
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--cpu-smoke", "--only", "actor_update",
                           "probe", "--out", str(out)], cwd=ROOT, env={**_env(), "CUDA_VISIBLE_DEVICES": ""},
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["checks"] == {"actor_update_ran": True, "loss_scaling_self_check": True, "weight_sync_ran": True,
                                "offload_bit_exact": True}
    p = report["probe"]
    assert p["offload"]["freed_bytes"] > p["offload"]["offloaded_bytes"] > 0
    assert p["weight_sync"]["bytes"] > 0 and p["weight_sync"]["memcpy_gbps"] > 0
    assert p["loss_scaling"]["rel_diff_autograd"] < 1e-4


@pytest.fixture(scope="module")
def gpu_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "report.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--out", str(out)], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("check", ["actor_update_ran", "rl_step_ran", "first_step_ratio_is_1", "first_step_kl_is_0",
                                   "loss_scaling_self_check", "weight_sync_ran", "offload_bit_exact",
                                   "offload_frees_memory"])
def test_gpu_check(gpu_report, check):
    assert gpu_report["checks"][check], json.dumps({k: v for k, v in gpu_report.items() if k != "checks"}, indent=1)[:6000]
