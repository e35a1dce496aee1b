"""What a model's and a tokenizer's files say, read without torch or transformers.

The checks here need only the files, so the dry run makes them before any start-up cost
(and on a login node): ``config.json`` present and valid JSON, an architecture megappo can
build (``hf_config_problems``, which ``models.spec.ModelSpec`` also applies, so the two can
never disagree), and a tokenizer whose ids fit the model's vocabulary (``tokenizer.json``).
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "qwen3_moe", "mixtral", "qwen2_moe")
MOE_FAMILIES = ("qwen3_moe", "mixtral", "qwen2_moe")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# config.json keys that announce a mixture-of-experts model inside a dense family's name.
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")


def read_config_json(path: str) -> dict[str, Any]:
    """The ``config.json`` of HF model directory ``path``, as it is (what ``ModelSpec`` reads).
    A ``ValueError`` naming the file when it is missing, unreadable or not a JSON object."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise ValueError(f"{path}: no config.json (is this a HuggingFace model directory?)")
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: malformed JSON at line {e.lineno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: cannot be read: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def read_hf_config(path: Optional[str]) -> Optional[dict[str, Any]]:
    """``read_config_json`` (the ``text_config`` of a multimodal one) or None when there is no
    readable, well-formed one: for checks that only apply when the numbers are known."""
    if not path:
        return None
    try:
        data = read_config_json(path)
    except ValueError:
        return None
    data = data.get("text_config", data)
    return data if isinstance(data, dict) else None


def hf_config_problems(cfg: dict[str, Any]) -> list[str]:
    """Everything that stops megappo from building this HF config, one message each (empty
    when supported). The first problem of an unsupported family is the only one given."""
    family = cfg.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        archs = cfg.get("architectures") or []
        moe = f" (a mixture-of-experts model; supported MoE families: {', '.join(MOE_FAMILIES)})" if "moe" in str(family).lower() or any(
            k in cfg for k in _MOE_KEYS) else ""
        return [f"unsupported model_type {family!r} (architectures {archs}){moe}; megappo supports {', '.join(SUPPORTED_FAMILIES)}"]
    problems = [
        f"{key} missing or not an integer ({cfg.get(key)!r})"
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        if not isinstance(cfg.get(key), int) or isinstance(cfg.get(key), bool)
    ]
    if problems:
        return problems
    experts = {k: cfg[k] for k in _MOE_KEYS if cfg.get(k)}
    if family in MOE_FAMILIES:
        problems += moe_config_problems(cfg)
    elif experts:
        problems.append(f"mixture-of-experts settings {experts} in a dense {family} config (MoE families: {', '.join(MOE_FAMILIES)})")
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {cfg['hidden_act']!r} (only silu / SwiGLU is supported)")
    if cfg.get("attention_bias") and family not in ("qwen2", "qwen2_moe"):
        problems.append(f"attention_bias=true ({family} then also has an o_proj bias, which Megatron's attention cannot hold)")
    if cfg.get("mlp_bias"):
        problems.append("mlp_bias=true (MLP biases are not supported)")
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    if heads % kv_heads:
        problems.append(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    rope_type = rope_parameters(cfg)[1]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        problems.append(f"rope type {rope_type!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if family != "mistral" and cfg.get("use_sliding_window"):
        problems.append("use_sliding_window=true (per-layer sliding windows are not supported)")
    return problems


def moe_config_problems(cfg: dict[str, Any]) -> list[str]:
    """The MoE settings of a Qwen3-MoE / Mixtral config that megappo cannot represent, each
    naming its field: a shared expert (Qwen2-MoE style), router jitter, or a missing expert count."""
    family, problems = cfg["model_type"], []
    # transformers 5 writes Qwen3-MoE's num_experts as num_local_experts (its attribute map).
    n_key = "num_experts" if family != "mixtral" and "num_experts" in cfg else "num_local_experts"
    for key in (n_key, "num_experts_per_tok"):
        if not isinstance(cfg.get(key), int) or cfg[key] < 1:
            problems.append(f"{key} missing or not a positive integer ({cfg.get(key)!r})")
    if not problems and cfg["num_experts_per_tok"] > cfg[n_key]:
        problems.append(f"num_experts_per_tok {cfg['num_experts_per_tok']} exceeds {n_key} {cfg[n_key]}")
    normalised = family == "mixtral" or bool(cfg.get("norm_topk_prob"))
    if not problems and cfg["num_experts_per_tok"] == 1 and normalised:
        problems.append("num_experts_per_tok=1 with a renormalised top-k (Mixtral, or norm_topk_prob=true) weights every "
                        "token's expert by 1, which Megatron's router cannot express (it needs pre-softmax scores at top-1)")
    if family == "qwen2_moe" and not cfg.get("shared_expert_intermediate_size"):
        problems.append("shared_expert_intermediate_size missing or 0 (a Qwen2-MoE without its shared expert is not supported)")
    elif family != "qwen2_moe" and cfg.get("shared_expert_intermediate_size"):
        problems.append("shared_expert_intermediate_size (a shared expert) is not supported for " + family)
    if cfg.get("router_jitter_noise"):
        problems.append(f"router_jitter_noise={cfg['router_jitter_noise']} (router input jitter) is not supported")
    if family in ("qwen3_moe", "qwen2_moe") and not isinstance(cfg.get("moe_intermediate_size"), int):
        problems.append(f"moe_intermediate_size missing or not an integer ({cfg.get('moe_intermediate_size')!r})")
    return problems


def rope_parameters(cfg: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """(RoPE parameters, rope type) from either config dialect: transformers 4.x
    (``rope_theta``, ``rope_scaling``) or 5.x (``rope_parameters``)."""
    rope = {**(cfg.get("rope_scaling") or {}), **(cfg.get("rope_parameters") or {})}
    return rope, rope.get("rope_type", rope.get("type", "default")) or "default"


def check_hf_model_dir(path: str, what: str) -> Optional[int]:
    """Raise ``ValueError`` naming ``what`` (the config key) when ``path``'s ``config.json`` is
    missing, malformed or describes an unsupported model; returns its ``vocab_size``."""
    try:
        cfg = read_config_json(path)
    except ValueError as error:
        raise ValueError(f"{what}={path!r}: {error}") from None
    problems = hf_config_problems(cfg)
    if problems:
        raise ValueError(f"{what}={path!r}: {os.path.join(path, 'config.json')}: " + "; ".join(problems))
    return cfg["vocab_size"]


def tokenizer_size(path: str) -> Optional[int]:
    """The number of token ids a tokenizer directory can produce (its largest id + 1), read
    from ``tokenizer.json`` (vocabulary and added tokens); None when there is no
    ``tokenizer.json`` (a sentencepiece-only tokenizer needs its library to be read)."""
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        return None
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{file}: not a readable tokenizer file: {e}") from None
    ids = [t.get("id") for t in data.get("added_tokens") or [] if isinstance(t, dict)]
    vocab = (data.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel: token -> id
        ids.extend(vocab.values())
    elif isinstance(vocab, list):  # Unigram: [token, score] pairs, id = position
        ids.append(len(vocab) - 1)
    ids = [i for i in ids if isinstance(i, int)]
    return max(ids) + 1 if ids else None


def check_tokenizer_fits(num_tokens: int, vocab_size: int, tokenizer: str, model: str) -> None:
    """A ``ValueError`` when a tokenizer can produce ids the model has no embedding row for
    (the first rollout would fail with an out-of-range index). The trainer calls this at
    start-up with ``len(tokenizer)``; the dry run with ``tokenizer_size``."""
    if num_tokens > vocab_size:
        raise ValueError(
            f"the tokenizer ({tokenizer}) has {num_tokens} tokens but the model ({model}) has vocab_size={vocab_size}: "
            "ids from the tokenizer's upper range have no embedding row; use the model's own tokenizer"
        )
