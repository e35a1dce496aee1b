"""The conversion tools and compare_logprobs. The slow tests assert on the ``tools`` phase
of tests/mp/weights_launch.py (each tool's ``main`` in a plain world-1 process); the fast
ones check argument handling and that a bad input is a one-line error (exit status 2)
before Megatron is even imported."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from hf_fixtures import make_tiny_hf_model

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tools_run():
    from mp.weights_launch import results

    (r,) = results().read("tools")
    return r


@pytest.mark.slow
def test_hf_to_megatron_to_hf_is_bit_exact(tools_run):
    r = tools_run
    assert r["hf2m_rc"] == 0 and r["m2hf_rc"] == 0
    assert r["hf2m_meta"] == {"tp": 1, "pp": 1, "vpp": None}
    assert r["m2hf_mismatch"] == []
    files = r["m2hf_files"]
    assert "model.safetensors.index.json" in files and "tokenizer.json" in files and "generation_config.json" in files


@pytest.mark.slow
def test_tp2_checkpoint_converts_at_world_1(tools_run):
    assert tools_run["m2hf_tp2_rc"] == 0 and tools_run["m2hf_tp2_mismatch"] == []


@pytest.mark.slow
def test_hf_to_megatron_tool_at_tp2_round_trips(tools_run):
    from mp.weights_launch import results

    for rank in results().read("tools_tp2"):
        assert rank["hf2m_tp2_rc"] == 0 and rank["hf2m_tp2_meta"] == {"tp": 2, "pp": 1, "vpp": None}
    assert tools_run["m2hf_tool_tp2_rc"] == 0 and tools_run["m2hf_tool_tp2_mismatch"] == []


@pytest.mark.slow
def test_training_checkpoint_actor_converts(tools_run):
    assert tools_run["m2hf_train_rc"] == 0
    assert tools_run["m2hf_train_mismatch"] == []  # equals the resumed, trained actor
    assert tools_run["m2hf_train_loads"] == "qwen3"


@pytest.mark.slow
def test_compare_logprobs_prints_one_json_line_per_comparison(tools_run):
    assert tools_run["compare_rc"] == 0
    lines = {row["compare"]: row for row in tools_run["compare_lines"]}
    assert set(lines) == {"megatron_vs_hf", "engine_vs_megatron", "weights_checksum"}
    checksum = lines.pop("weights_checksum")
    assert checksum["match"] is True and checksum["scope"] == "all"
    assert lines["megatron_vs_hf"]["num_tokens"] == 12  # two given sequences of 7 tokens
    for row in lines.values():
        assert row["max_abs_diff"] < 1e-4 and row["mean_abs_diff"] <= row["max_abs_diff"]


def test_help_of_every_tool():
    for name in ("convert_hf_to_megatron", "convert_megatron_to_hf", "compare_logprobs"):
        with pytest.raises(SystemExit) as e:
            _tool(name).main(["--help"])
        assert e.value.code == 0


def test_bad_hf_directory_is_a_clear_error(tmp_path, capsys):
    d = make_tiny_hf_model(tmp_path, "qwen3", layers=1)
    capsys.readouterr()
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": 4}))
    rc = _tool("convert_hf_to_megatron").main(["--hf-dir", str(d), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ")
    assert "model.layers.0.self_attn.k_proj.weight: shape [32, 64] in the checkpoint, config implies [64, 64]" in err
    assert not (tmp_path / "out").exists()


def test_not_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    rc = _tool("convert_megatron_to_hf").main(["--ckpt", str(tmp_path), "--out", str(tmp_path / "hf")])
    assert rc == 2
    assert "neither a model checkpoint (megappo_model.json) nor a training checkpoint" in capsys.readouterr().err


def test_token_ids_argument():
    parse = _tool("compare_logprobs").parse_token_ids
    assert parse("1,5,9;3,3,7") == [[1, 5, 9], [3, 3, 7]]
    with pytest.raises(Exception, match="must look like"):
        parse("1,x")


def test_corrupt_safetensors_is_a_clear_error(tmp_path, capsys):
    d = make_tiny_hf_model(tmp_path, "llama", layers=1)
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    capsys.readouterr()
    rc = _tool("convert_hf_to_megatron").main(["--hf-dir", str(d), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: {weights}: not a readable safetensors file") and "Traceback" not in err
    assert not (tmp_path / "out").exists()
