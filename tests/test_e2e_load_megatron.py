"""``model.load_megatron`` is the weights a run starts from (issue: it used to be ignored and
``model.hf_path``'s weights trained instead): a run started from a Megatron checkpoint of
*other* weights, one step at a negligible learning rate, exports exactly those weights. PPO
with a KL loss, so the actor, the reference and the critic's trunk all load from it (PP=2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_e2e import ROOT, _env, _train, toy  # noqa: F401 - the module-scoped fixture

pytestmark = pytest.mark.slow


def _state(hf_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(hf_dir).glob("*.safetensors")):
        out |= load_file(str(f))
    return out


def test_load_megatron_weights_are_the_ones_trained(toy, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM

    other = tmp_path / "other"
    model = AutoModelForCausalLM.from_pretrained(toy["model"], dtype=torch.float32)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(other)
    ckpt = tmp_path / "ckpt"
    subprocess.run([sys.executable, str(ROOT / "tools" / "convert_hf_to_megatron.py"), "--hf-dir", str(other), "--out", str(ckpt)],
                   env=_env(), check=True, capture_output=True, timeout=300)

    run = tmp_path / "run"
    _train(toy, run, ["algo.preset=ppo", "algo.use_kl_loss=true", "parallel.pipeline_model_parallel_size=2",
                      "rollout.num_return_sequences_in_group=2", f"model.load_megatron={ckpt}", "optim.lr=1e-30",
                      "optim.critic_lr=1e-30", "train.steps=1", "train.eval_every=0", "checkpoint.save_hf_at_end=true"])
    exported, wanted, base = _state(run / "hf" / "final"), _state(other), _state(toy["model"])
    assert exported.keys() == wanted.keys()
    for name, tensor in wanted.items():
        assert torch.equal(exported[name], tensor), name
    # The control: the HF base model's weights differ, so the check can fail.
    assert max((base[k] - wanted[k]).abs().max().item() for k in wanted) > 0.01
