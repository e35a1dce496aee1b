"""The offline tools, called through their ``main(argv)`` in one plain process (a phase of
``weights_launch.py``; pytest: tests/test_tools_convert.py):

  convert_hf_to_megatron (world 1) -> convert_megatron_to_hf: bit-exact round trip
  convert_megatron_to_hf on the TP=2 checkpoint of the tp2 phase: bit-exact
  convert_hf_to_megatron under torchrun at TP=2 (phase tools_tp2), back at world 1: bit-exact
  convert_megatron_to_hf on the training checkpoint (its actor): the trained weights
  compare_logprobs on given token ids: one JSON line per comparison
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
from pathlib import Path

import torch

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def tool(name):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def same_weights(a: dict, b: dict) -> list[str]:
    """Names that differ (missing on either side, or not bit-equal)."""
    return sorted(set(a) ^ set(b)) + [n for n in a if n in b and not torch.equal(a[n], b[n])]


def phase_tools(ctx, res, write):
    from hf_fixtures import read_hf_state

    hf2m, m2hf, compare = tool("convert_hf_to_megatron"), tool("convert_megatron_to_hf"), tool("compare_logprobs")
    w = Path(ctx.work)

    src = ctx.zoo["mistral-untied"]
    res["hf2m_rc"] = hf2m.main(["--hf-dir", str(src), "--out", str(w / "tool-mcore")])
    res["hf2m_meta"] = json.loads((w / "tool-mcore" / "megappo_model.json").read_text())["saved_layout"]
    res["m2hf_rc"] = m2hf.main(["--ckpt", str(w / "tool-mcore"), "--out", str(w / "tool-hf"), "--max-shard-gb", "0.00004"])
    res["m2hf_mismatch"] = same_weights(read_hf_state(src), read_hf_state(w / "tool-hf"))
    res["m2hf_files"] = sorted(os.listdir(w / "tool-hf"))
    # --out safety on a real checkpoint (issue 14): an earlier export is replaced without
    # asking; the checkpoint itself and a user's directory are not (unless --overwrite).
    res["m2hf_again_rc"] = m2hf.main(["--ckpt", str(w / "tool-mcore"), "--out", str(w / "tool-hf")])
    res["m2hf_again_mismatch"] = same_weights(read_hf_state(src), read_hf_state(w / "tool-hf"))
    ckpt_files = sorted(os.listdir(w / "tool-mcore"))
    res["m2hf_onto_ckpt_rc"] = m2hf.main(["--ckpt", str(w / "tool-mcore"), "--out", str(w / "tool-mcore"), "--overwrite"])
    res["m2hf_onto_ckpt_kept"] = sorted(os.listdir(w / "tool-mcore")) == ckpt_files
    mine = w / "users-dir"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    res["m2hf_users_dir_rc"] = m2hf.main(["--ckpt", str(w / "tool-mcore"), "--out", str(mine)])
    res["m2hf_users_dir_kept"] = (mine / "notes.txt").is_file()
    res["m2hf_overwrite_rc"] = m2hf.main(["--ckpt", str(w / "tool-mcore"), "--out", str(mine), "--overwrite"])
    res["m2hf_overwrite_files"] = sorted(os.listdir(mine))

    res["m2hf_tp2_rc"] = m2hf.main(["--ckpt", str(w / "mcore-tp2"), "--out", str(w / "tool-hf-tp2")])
    res["m2hf_tp2_mismatch"] = same_weights(read_hf_state(ctx.zoo["qwen3-tied"]), read_hf_state(w / "tool-hf-tp2"))
    res["m2hf_tool_tp2_rc"] = m2hf.main(["--ckpt", str(w / "tool-mcore-tp2"), "--out", str(w / "tool-hf-tool-tp2")])
    res["m2hf_tool_tp2_mismatch"] = same_weights(read_hf_state(ctx.zoo["llama-untied"]), read_hf_state(w / "tool-hf-tool-tp2"))

    res["m2hf_train_rc"] = m2hf.main(
        ["--ckpt", str(ctx.ckpt_dir), "--out", str(w / "tool-hf-train"), "--hf-config", str(ctx.zoo["qwen3-tied"])]
    )
    res["m2hf_train_mismatch"] = same_weights(ctx.trained_actor, read_hf_state(w / "tool-hf-train"))
    from transformers import AutoModelForCausalLM

    res["m2hf_train_loads"] = AutoModelForCausalLM.from_pretrained(w / "tool-hf-train").config.model_type
    write()

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        res["compare_rc"] = compare.main(["--hf-dir", str(ctx.zoo["llama-tied"]), "--token-ids", "1,5,9,2,7,3,88;3,3,7,8,100,0,9"])
    res["compare_lines"] = [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]


def phase_tools_tp2(ctx, res, write):
    """tools/convert_hf_to_megatron.py under torchrun at TP=2 (each rank loads its shards)."""
    out = Path(ctx.work) / "tool-mcore-tp2"
    res["hf2m_tp2_rc"] = tool("convert_hf_to_megatron").main(["--hf-dir", str(ctx.zoo["llama-untied"]), "--out", str(out), "--tp", "2"])
    res["hf2m_tp2_meta"] = json.loads((out / "megappo_model.json").read_text())["saved_layout"]
