"""Bad HF directories are rejected before any conversion, with every problem named:
unsupported architecture, a shard the index names but the directory lacks, a config that
disagrees with the weights, missing / unexpected tensors, a config that disagrees with the
model being loaded. No process group or Megatron import is needed for these."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_fixtures import make_tiny_hf_model
from megappo.models.spec import ModelSpec
from megappo.weights.hf_io import HFCheckpoint
from megappo.weights.model_io import validate_hf_dir


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A small Qwen2 model saved in several shards with an index."""
    return make_tiny_hf_model(tmp_path_factory.mktemp("hf"), "qwen2", layers=2, max_shard_size="40KB")


def _copy(src, tmp_path, name="m"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _validate(path, spec=None, strict=True):
    with HFCheckpoint(path) as ckpt:
        return validate_hf_dir(spec or ModelSpec.from_hf_dir(path), ckpt, strict=strict)


def test_a_good_directory_passes(sharded):
    assert _validate(sharded) == []


def test_unsupported_architecture(sharded, tmp_path):
    d = _copy(sharded, tmp_path)
    _edit_config(d, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'.*GPT2LMHeadModel"):
        ModelSpec.from_hf_dir(d)
    _edit_config(d, model_type="qwen2", architectures=["Qwen2ForSequenceClassification"])
    with pytest.raises(ValueError, match="unsupported architecture Qwen2ForSequenceClassification"):
        _validate(d)


def test_missing_shard_file_is_named(sharded, tmp_path):
    d = _copy(sharded, tmp_path)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (d / victim).unlink()
    with pytest.raises(ValueError, match=f"names shard files that are not in .*{victim} \\(holds "):
        HFCheckpoint(d)


def test_config_that_disagrees_with_the_weights(sharded, tmp_path):
    d = _copy(sharded, tmp_path)
    _edit_config(d, intermediate_size=128)
    with pytest.raises(ValueError) as e:
        _validate(d)
    msg = str(e.value)
    assert "the weights do not match the config" in msg
    for layer in (0, 1):
        for proj in ("gate_proj", "up_proj"):
            assert f"model.layers.{layer}.mlp.{proj}.weight: shape [96, 64] in the checkpoint, config implies [128, 64]" in msg
        assert f"model.layers.{layer}.mlp.down_proj.weight: shape [64, 96] in the checkpoint, config implies [64, 128]" in msg


def test_missing_and_unexpected_tensors(tmp_path):
    d = make_tiny_hf_model(tmp_path, "llama", layers=1, name="single")
    state = load_file(d / "model.safetensors")
    del state["model.layers.0.self_attn.v_proj.weight"]
    state["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        _validate(d)
    assert "missing tensor model.layers.0.self_attn.v_proj.weight (expected shape [32, 64])" in str(e.value)
    assert "unexpected tensor model.layers.0.self_attn.o_proj.bias" in str(e.value)
    with pytest.raises(ValueError, match="missing tensor") as e:
        _validate(d, strict=False)
    assert "unexpected tensor" not in str(e.value)


def test_config_that_disagrees_with_the_model(sharded):
    other = ModelSpec.from_hf_config({**json.loads((sharded / "config.json").read_text()), "num_hidden_layers": 4})
    with pytest.raises(ValueError, match="does not match the model being loaded: num_layers: model 4, config.json 2"):
        _validate(sharded, spec=other)


def test_not_a_safetensors_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="only PyTorch .bin weights found"):
        HFCheckpoint(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        HFCheckpoint(tmp_path / "empty")


def test_corrupt_safetensors_is_named(sharded, tmp_path):
    """A truncated or garbled file (an interrupted download) is a ValueError naming the file,
    not safetensors' own SafetensorError naming none."""
    single = make_tiny_hf_model(tmp_path, "llama", layers=1, name="single")
    data = (single / "model.safetensors").read_bytes()
    (single / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"single/model.safetensors: not a readable safetensors file \(SafetensorError: .*\); "
                                         r"it is corrupt or truncated"):
        HFCheckpoint(single)

    d = _copy(sharded, tmp_path)
    victim = sorted(set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values()))[1]
    (d / victim).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbled header}")
    with pytest.raises(ValueError, match=rf"m/{victim}: not a readable safetensors file .*invalid JSON"):
        _validate(d)  # the index opens; the shard fails when its header is read


def _tied_with_head(tmp_path, head_from_embedding):
    d = make_tiny_hf_model(tmp_path, "qwen3", layers=1, tie=True, name=f"tied-{head_from_embedding}")
    state = load_file(d / "model.safetensors")
    assert "lm_head.weight" not in state  # transformers does not store a tied head
    emb = state["model.embed_tokens.weight"]
    state["lm_head.weight"] = emb.clone() if head_from_embedding else emb + 0.25
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    return d


def test_tied_config_with_a_stored_head_warns(tmp_path, caplog, monkeypatch):
    from megappo.weights import model_io

    monkeypatch.setattr(model_io, "_TIED_HEAD_WARNED", set())  # once per directory per process: start afresh
    for same in (True, False):
        d = _tied_with_head(tmp_path, same)
        with caplog.at_level(logging.WARNING, logger="megappo"):
            caplog.clear()
            assert _validate(d) == []  # tolerated, not an error, even when strict
            _validate(d)  # once per directory: actor and reference load the same one
        warned = [r.getMessage() for r in caplog.records if "tie_word_embeddings" in r.getMessage()]
        assert len(warned) == 1, warned
        assert f"{d}: config.json sets tie_word_embeddings=true, so the file's lm_head.weight is not loaded" in warned[0]
        assert ("it equals the embedding" in warned[0]) == same
        assert ("it DIFFERS from the embedding (max |diff| 0.25)" in warned[0]) != same
