"""Training checkpoints: resume equals an uninterrupted run; a save that fails or is killed
midway leaves the previous checkpoint and ``latest`` alone; a resume at another DP size;
mismatched tokenizer / architecture; pruning. The slow tests assert on the shared launches
of tests/mp/weights_launch.py (phases ckpt_train at DP=2 and ckpt_resume at DP=1); the
fast ones exercise the directory logic without a process group."""

from __future__ import annotations

import json

import pytest

from megappo.checkpoint import LATEST, META, CheckpointManager, read_meta


@pytest.fixture(scope="module")
def runs():
    from mp.weights_launch import results

    return results()


@pytest.mark.slow
def test_resume_repeats_the_next_step_exactly(runs):
    for r in runs.read("ckpt_train"):
        assert r["dp"] == 2
        # actor (distributed optimizer) and critic (plain optimizer), bit-exact; step 3
        # also checks the restored Adam moments, step counts and LR schedule
        assert r["loss2_resumed"] == r["loss2"]
        assert r["loss3_resumed"] == r["loss3"]
        assert r["weights3_resumed"] == r["weights3"]
        assert r["loss1"] != r["loss2"] != r["loss3"]
        assert r["rng_restored"]
        assert r["extra"] == {"data": {"cursor": 4}, "kl": {"coef": 0.1}, "step": 1, "reward_stats": [1.0, 2.0]}


@pytest.mark.slow
def test_failed_save_leaves_latest(runs):
    for r in runs.read("ckpt_train"):
        assert r["injected_error"] == "injected failure after the critic's files"
        assert r["latest_after_error"] == "step_1"


@pytest.mark.slow
def test_killed_save_leaves_previous_checkpoint_loadable(runs):
    assert runs.launch_errors["A"] is not None and "SIGKILL" in runs.launch_errors["A"], "launch A should die of its SIGKILL"
    (r,) = runs.read("ckpt_resume")
    # After the kill: latest still names step_1, the killed save's temporary directory is
    # still there, and step_1 loads (the resume below ran from it).
    assert r["latest"] == "step_1"
    assert r["dirs_before"] == [".tmp-step_3", "latest", "step_1"]
    assert r["extra_step"] == 1


@pytest.mark.slow
def test_resume_at_another_dp_size(runs):
    (train,) = runs.read("ckpt_train")[:1]
    (r,) = runs.read("ckpt_resume")
    for step in ("loss2", "loss3"):
        for a, b in zip(r[f"{step}_resumed_dp1"], train[step]):
            assert abs(a - b) < 1e-5, (step, r[f"{step}_resumed_dp1"], train[step])


@pytest.mark.slow
def test_mismatched_tokenizer_or_architecture_is_an_error(runs):
    (r,) = runs.read("ckpt_resume")
    assert "tokenizer tok-A" in r["tokenizer_error"] and "tokenizer tok-B" in r["tokenizer_error"]
    assert "hidden_size: this run 128, checkpoint 64" in r["architecture_error"]
    assert "num_kv_heads: this run 4, checkpoint 2" in r["architecture_error"]


@pytest.mark.slow
def test_next_save_cleans_up_and_prunes(runs):
    (r,) = runs.read("ckpt_resume")
    assert r["dirs_after"] == ["latest", "step_2"]  # stale .tmp-step_3 removed; keep_last=1 pruned step_1
    assert r["latest_after"] == "step_2"


# ---- directory logic, no process group --------------------------------------------------


def _fake_step(root, step, *, complete=True):
    d = root / f"step_{step}"
    d.mkdir(parents=True)
    if complete:
        (d / META).write_text(json.dumps({"format": "megappo-train/1", "step": step, "roles": ["actor"], "spec": {}}))
    return d


def test_latest_and_steps(tmp_path):
    mgr = CheckpointManager(tmp_path / "ckpt")
    assert mgr.latest() is None and mgr.steps() == []
    root = tmp_path / "ckpt"
    _fake_step(root, 3)
    _fake_step(root, 10)
    _fake_step(root, 12, complete=False)
    (root / ".tmp-step_13").mkdir()
    assert mgr.steps() == [3, 10]
    (root / LATEST).write_text("step_10\n")
    assert mgr.latest() == str(root / "step_10")
    assert read_meta(mgr.latest())["step"] == 10


def test_latest_pointing_at_an_incomplete_checkpoint_is_an_error(tmp_path):
    root = tmp_path / "ckpt"
    _fake_step(root, 12, complete=False)
    (root / LATEST).write_text("step_12\n")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        CheckpointManager(root).latest()


def test_bad_settings_and_foreign_directories(tmp_path):
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        CheckpointManager(tmp_path, keep_last=0)
    with pytest.raises(ValueError, match="optimizer_sharding"):
        CheckpointManager(tmp_path, optimizer_sharding="fully_sharded_model_space")
    with pytest.raises(ValueError, match="not a complete megappo training checkpoint"):
        read_meta(tmp_path)
    (tmp_path / META).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="expected 'megappo-train/1'"):
        read_meta(tmp_path)


def test_each_role_is_checked_against_its_own_saved_spec():
    from megappo.checkpoint import check_role_specs
    from megappo.models.spec import ModelSpec

    base = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
    actor = ModelSpec.from_hf_config(base)
    critic = ModelSpec.from_hf_config({**base, "num_hidden_layers": 3})  # model.critic_hf_path: another trunk
    meta = {"spec": actor.to_dict(), "specs": {"actor": actor.to_dict(), "critic": critic.to_dict()}}
    check_role_specs({"actor": actor, "critic": critic}, meta, source="ckpt")
    with pytest.raises(ValueError, match=r"ckpt \(critic\).*num_layers: this run 2, checkpoint 3"):
        check_role_specs({"actor": actor, "critic": actor}, meta, source="ckpt")
    check_role_specs({"actor": actor, "critic": actor}, {"spec": actor.to_dict()}, source="old")  # no per-role specs


def test_tokenizer_fingerprint_tells_tokenizers_apart():
    from megappo.toolkit.char_tokenizer import build_char_tokenizer
    from megappo.loop.state import tokenizer_fingerprint

    a, b = build_char_tokenizer("0123456789+="), build_char_tokenizer("0123456789+-=")
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(build_char_tokenizer("0123456789+="))
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)
