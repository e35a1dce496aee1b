"""Mixture-of-experts models against transformers and against one rank (two processes, gloo, CPU).

One ``torchrun --nproc-per-node 2 tests/mp/moe_checks.py`` launch (module fixture) runs tiny
Qwen3-MoE (with a dense layer from ``mlp_only_layers``) and Mixtral models at EP=1, EP=2,
TP=2 and PP=2 and writes every comparison as a max abs difference; see its docstring. The
test then exports the checkpoint that ``convert_hf_to_megatron(ep=2)`` wrote with
``tools/convert_megatron_to_hf.py`` in a world of one and compares it bit for bit.
Measured (fp32, 2-core CPU): log-probs within 4.8e-7 of transformers at every layout,
EP=2 gradients within 1.9e-6 of one rank (gradient norm ~100), the loss equal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_fixtures import read_hf_state

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("qwen3_moe", "mixtral", "qwen2_moe")
TOL = 1e-4  # the bound for fp32 parity with transformers


def _env():
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "CUDA_VISIBLE_DEVICES": ""}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("moe_mp")
    out = work / "results.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO_ROOT / "tests" / "mp" / "moe_checks.py"), "--out", str(out), "--workdir", str(work)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=480)
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if "Warning" not in line)[-6000:]
        pytest.fail(f"moe_checks.py failed (exit {proc.returncode}):\n{tail}")
    return json.loads(out.read_text()), work


@pytest.mark.parametrize("layout", ("ep1", "ep2", "tp2", "pp2"))
@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_match_transformers(run, layout, family):
    assert run[0][f"{layout}_{family}_logprobs_vs_hf"] < TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_ep2_loss_and_gradients_match_one_rank(run, family):
    r = run[0]
    assert r[f"ep2_{family}_loss"] < 1e-4
    assert r[f"ep2_{family}_grads"] < 1e-5
    assert r[f"ep2_{family}_ref_grad_norm"] > 1.0  # the gradients compared are not ~0
    # Each rank holds 2 of the 4 experts of every routed layer (qwen3_moe: layer 0 only).
    assert r[f"ep2_{family}_local_expert_tensors"] == {"qwen3_moe": 4, "mixtral": 8, "qwen2_moe": 8}[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_ep2_hf_megatron_hf_is_bit_exact(run, family):
    assert run[0][f"ep2_{family}_roundtrip_not_exact"] == 0.0
    assert run[0][f"ep2_{family}_roundtrip_tensors"] == len(read_hf_state(run[1] / family))


@pytest.mark.parametrize("family", FAMILIES)
def test_ep2_weight_sync_streams_every_expert_in_small_buckets(run, family):
    r = run[0]
    assert r[f"ep2_{family}_sync_not_exact"] == 0.0
    assert r[f"ep2_{family}_sync_peak_over_bound"] <= 1.0  # no bucket above max(16 KiB, largest tensor)
    assert r[f"ep2_{family}_sync_buckets"] > 10


@pytest.mark.parametrize("layout", ("ep1", "ep2"))
@pytest.mark.parametrize("family", FAMILIES)
def test_weight_sync_into_the_embedded_engine_is_exact_and_its_logprobs_are_the_trainers(run, layout, family):
    """A Megatron MoE policy synced into the real embedded engine (transformers 5, experts
    fused in memory): every tensor equals from_pretrained's, the checksums agree, and the
    policy's log-probs of the engine's samples equal the engine's."""
    r, tag = run[0], f"{layout}_{family}"
    assert r[f"{tag}_engine_not_exact"] == 0.0
    assert r[f"{tag}_engine_checksum_mismatch"] == 0.0
    assert r[f"{tag}_engine_tokens"] >= 10
    assert r[f"{tag}_engine_vs_megatron"] < TOL


@pytest.mark.parametrize("tag", ("r3_ep2", "r3_pp2"))
def test_replaying_the_rollout_routing_gives_a_first_ratio_of_exactly_one(run, tag):
    """Rollout routing replay at EP=2 (routers replay global expert ids before the all-to-all)
    and PP=2 (each stage's routers find their layers' columns): the first ratio is exactly 1
    and the trainer's log-probs are the engine's, though its own routing differs at nearly
    every token (without replay they differ by far more)."""
    r = run[0]
    assert r[f"{tag}_ratio_minus_1"] == 0.0
    assert r[f"{tag}_engine_vs_trainer"] < 1e-5
    assert r[f"{tag}_rollout_routing_changed_frac"] > 0.9
    assert r["r3_ep2_free_engine_vs_trainer"] > 1e-3


def test_checkpoint_converted_at_ep2_exports_bit_exact_at_world_one(run):
    work = run[1]
    family = "mixtral"
    out = work / "mixtral-export"
    cmd = [sys.executable, str(REPO_ROOT / "tools" / "convert_megatron_to_hf.py"), "--ckpt", str(work / f"{family}-ckpt-ep2"),
           "--out", str(out), "--hf-config", str(work / family)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = read_hf_state(work / family), read_hf_state(out)
    assert sorted(a) == sorted(b)
    assert all(a[k].dtype == b[k].dtype and a[k].equal(b[k]) for k in a)
