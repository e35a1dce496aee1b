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
def test_out_safety_on_a_real_checkpoint(tools_run):
    r = tools_run
    assert r["m2hf_again_rc"] == 0 and r["m2hf_again_mismatch"] == []  # an earlier export: replaced
    assert r["m2hf_onto_ckpt_rc"] == 2 and r["m2hf_onto_ckpt_kept"]  # was: exit 0, checkpoint deleted
    assert r["m2hf_users_dir_rc"] == 2 and r["m2hf_users_dir_kept"]
    assert r["m2hf_overwrite_rc"] == 0 and "notes.txt" not in r["m2hf_overwrite_files"]
    assert "model.safetensors" in r["m2hf_overwrite_files"] and "config.json" in r["m2hf_overwrite_files"]


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


def _fake_model_checkpoint(path: Path) -> Path:
    """Enough of a model checkpoint for the tool to resolve it (the --out checks run before
    Megatron starts, so no weights are needed); the slow phase converts real ones."""
    path.mkdir(parents=True)
    (path / "megappo_model.json").write_text(json.dumps({"format": "megappo-megatron-model/1", "spec": {}, "hf_config": {}}))
    (path / "common.pt").write_bytes(b"weights")
    return path


def _m2hf(capsys, *argv):
    capsys.readouterr()
    rc = _tool("convert_megatron_to_hf").main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def test_out_never_replaces_the_checkpoint_or_a_users_directory(tmp_path, capsys):
    ck = _fake_model_checkpoint(tmp_path / "ck")
    before = sorted(p.name for p in ck.iterdir())
    for out, words in [
        (ck, "is the checkpoint being converted"),
        (ck / "hf", "is inside the checkpoint being converted"),
        (tmp_path, "holds the checkpoint being converted"),
    ]:
        for extra in ([], ["--overwrite"]):  # --overwrite never allows these
            rc, err = _m2hf(capsys, "--ckpt", ck, "--out", out, *extra)
            assert rc == 2 and err.startswith(f"error: --out {out} {words}"), err
    assert sorted(p.name for p in ck.iterdir()) == before and not (ck / "hf").exists()

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's file")
    rc, err = _m2hf(capsys, "--ckpt", ck, "--out", mine)
    assert rc == 2 and "is not empty and is not an earlier HF export (it holds notes.txt)" in err and "--overwrite" in err
    assert (mine / "notes.txt").read_text() == "a user's file"

    other = _fake_model_checkpoint(tmp_path / "other-ckpt")
    rc, err = _m2hf(capsys, "--ckpt", ck, "--out", other, "--overwrite")
    assert rc == 2 and "holds a checkpoint (megappo_model.json); refusing to replace it, even with --overwrite" in err
    (tmp_path / "file").write_text("x")
    rc, err = _m2hf(capsys, "--ckpt", ck, "--out", tmp_path / "file")
    assert rc == 2 and "is a file, not a directory" in err


def test_missing_hf_config_directory_is_an_error(tmp_path, capsys):
    ck = _fake_model_checkpoint(tmp_path / "ck")
    rc, err = _m2hf(capsys, "--ckpt", ck, "--out", tmp_path / "hf", "--hf-config", tmp_path / "no-such-model")
    assert rc == 2 and err.strip() == f"error: --hf-config {tmp_path / 'no-such-model'}: no such directory"
    (tmp_path / "empty").mkdir()
    rc, err = _m2hf(capsys, "--ckpt", ck, "--out", tmp_path / "hf", "--hf-config", tmp_path / "empty")
    assert rc == 2 and "neither a config.json nor tokenizer files" in err
    assert not (tmp_path / "hf").exists()


def test_what_counts_as_an_earlier_export(tmp_path):
    from megappo.weights.export import is_hf_export

    d = tmp_path / "hf"
    d.mkdir()
    assert not is_hf_export(d) and not is_hf_export(tmp_path / "absent")
    for name in ("config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "model.safetensors.index.json", "tokenizer.json", "generation_config.json"):
        (d / name).write_text("{}")
    assert is_hf_export(d)
    (d / "README.md").write_text("mine")
    assert not is_hf_export(d)


def test_hf_to_megatron_out_must_be_empty(tmp_path, capsys):
    src = make_tiny_hf_model(tmp_path, "llama", layers=1)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "afile").write_text("x")
    for out, words in [("full", "is not empty; refusing"), ("afile", "is a file, not a directory")]:
        capsys.readouterr()
        rc = _tool("convert_hf_to_megatron").main(["--hf-dir", str(src), "--out", str(tmp_path / out)])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith(f"error: --out {tmp_path / out}") and words in err


@pytest.mark.slow
def test_tools_print_no_warning_noise(tmp_path):
    """Each tool as a user runs it (its own process): no apex / Transformer Engine fallback
    UserWarnings and no torch.distributed.checkpoint FutureWarnings, on save or on load."""
    import subprocess
    import sys

    src = make_tiny_hf_model(tmp_path, "qwen3", layers=1, tokenizer=True)
    runs = [
        ["convert_hf_to_megatron.py", "--hf-dir", src, "--out", tmp_path / "mcore"],
        ["convert_megatron_to_hf.py", "--ckpt", tmp_path / "mcore", "--out", tmp_path / "hf"],
    ]
    for tool, *argv in runs:
        done = subprocess.run([sys.executable, str(TOOLS / tool), *map(str, argv)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "Warning" not in done.stderr and "warnings.warn" not in done.stderr, f"{tool}: {done.stderr}"
    assert (tmp_path / "hf" / "model.safetensors").is_file()
