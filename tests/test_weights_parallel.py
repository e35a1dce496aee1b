"""HF weights into and out of real Megatron models at world 1, TP=2, PP=2 and PP=2 x VPP=2,
for every family tied and untied (and Llama-3 RoPE scaling, a Mistral sliding window): logits against transformers, bit-exact export
(iter_hf_tensors, save_hf), the critic, and a TP=2 Megatron checkpoint read at PP=2.

The work runs in the shared launches of tests/mp/weights_launch.py (one process group per
layout, all checks in it); these tests assert on the JSON they wrote.
"""

from __future__ import annotations

import pytest

from hf_fixtures import FAMILIES
from mp.weights_launch import CRITIC_KEYS, results

pytestmark = pytest.mark.slow

KEYS = [f"{f}-{t}" for f in FAMILIES for t in ("untied", "tied")] + ["llama-rope-llama3", "mistral-window"]
LAYOUTS = {"world1": "tp1pp1", "tp2": "tp2pp1", "pp2": "tp1pp2"}
LOGITS_TOL = 1e-4


@pytest.fixture(scope="module")
def runs():
    return results()


def _merged(rows: list[dict]) -> dict:
    """Per-rank dicts -> key: [value of each rank that reported it]."""
    out: dict = {}
    for row in rows:
        for k, v in row.items():
            out.setdefault(k, []).append(v)
    return out


@pytest.mark.parametrize("phase", list(LAYOUTS))
@pytest.mark.parametrize("key", KEYS)
def test_logits_match_transformers(runs, phase, key):
    got = _merged(runs.read(phase))[f"{LAYOUTS[phase]}/{key}/logits_max_abs_diff"]
    assert max(got) < LOGITS_TOL, got


@pytest.mark.parametrize("phase", list(LAYOUTS))
@pytest.mark.parametrize("key", KEYS)
def test_export_is_bit_exact(runs, phase, key):
    """iter_hf_tensors: every rank's tensors equal the HF files, and the stages together
    yield each HF tensor exactly once; save_hf: the directory transformers loads holds
    the same tensors, the same logits and the tokenizer."""
    tag = f"{LAYOUTS[phase]}/{key}"
    rows = runs.read(phase)
    m = _merged(rows)
    assert all(bad == [] for bad in m[f"{tag}/iter_mismatch"])
    per_rank = [r[f"{tag}/iter_names"] for r in rows]
    if phase == "pp2":  # each stage yields its own layers
        assert not set(per_rank[0]) & set(per_rank[1])
        names = per_rank[0] + per_rank[1]
    else:  # every TP rank receives the same full tensors
        assert all(p == per_rank[0] for p in per_rank)
        names = per_rank[0]
    assert sorted(names) == m[f"{tag}/hf_names"][0]
    assert m[f"{tag}/save_hf_names_equal"] == [True]
    assert m[f"{tag}/save_hf_mismatch"] == [[]]
    assert m[f"{tag}/save_hf_logits_diff"] == [0.0]
    assert m[f"{tag}/save_hf_tokenizer_ok"] == [True]
    assert m[f"{tag}/save_hf_no_tmp"] == [True]
    files = m[f"{tag}/save_hf_files"][0]
    assert "model.safetensors.index.json" in files and "config.json" in files and "tokenizer.json" in files
    assert any(f.startswith("model-00001-of-") for f in files)


@pytest.mark.parametrize("phase", list(LAYOUTS))
@pytest.mark.parametrize("key", CRITIC_KEYS)
def test_critic_trunk_from_hf_value_head_kept(runs, phase, key):
    tag = f"{LAYOUTS[phase]}/{key}"
    m = _merged(runs.read(phase))
    assert all(bad == [] for bad in m[f"{tag}/critic_mismatch"])
    names = {n for ns in m[f"{tag}/critic_names"] for n in ns}
    assert "lm_head.weight" not in names and "model.norm.weight" in names and "model.embed_tokens.weight" in names
    assert m[f"{tag}/critic_head_zero"] and all(m[f"{tag}/critic_head_zero"])


@pytest.mark.parametrize("key", ["llama-tied", "qwen2-untied"])
def test_virtual_pipeline_chunks(runs, key):
    rows = runs.read("vpp2")
    tag = f"tp1pp2vpp2/{key}"
    m = _merged(rows)
    assert max(m[f"{tag}/logits_max_abs_diff"]) < LOGITS_TOL
    assert all(bad == [] for bad in m[f"{tag}/iter_mismatch"])
    stages = [r[f"{tag}/iter_names"] for r in rows]
    assert not set(stages[0]) & set(stages[1])
    # Stage 0 holds chunks 0 and 2 of 4 layers: layers 0 and 2.
    layers = {int(n.split(".")[2]) for r in rows[:1] for n in stages[0] if n.startswith("model.layers.")}
    assert len(layers) == 2
    assert m[f"{tag}/save_hf_mismatch"] == [[]]


def test_tp2_megatron_checkpoint_loads_at_pp2(runs):
    """A distributed checkpoint saved at TP=2 reshards into PP=2 bit-exactly."""
    tag = "tp1pp2/qwen3-tied/from_mcore"
    m = _merged(runs.read("pp2"))
    assert max(m[f"{tag}/logits_max_abs_diff"]) < LOGITS_TOL
    assert all(bad == [] for bad in m[f"{tag}/iter_mismatch"])
    assert m[f"{tag}/save_hf_mismatch"] == [[]]


@pytest.mark.parametrize("phase", ["tp2", "pp2"])
def test_compare_logprobs_at_layout(runs, phase):
    rows = [r for r in runs.read(phase) if r.get(f"{LAYOUTS[phase]}/compare")][0][f"{LAYOUTS[phase]}/compare"]
    by = {r["compare"]: r for r in rows}
    assert by["megatron_vs_hf"]["max_abs_diff"] < LOGITS_TOL
    assert by["engine_vs_megatron"]["max_abs_diff"] < LOGITS_TOL
    assert by["megatron_vs_hf"]["source"] == ("megatron_checkpoint" if phase == "pp2" else "hf")
