"""What megappo needs to know of a HuggingFace decoder: ``ModelSpec`` from ``config.json``.

One spec serves the Megatron model builder, the weight mapping and the rollout engine, so
a checkpoint is validated once. Supported families: Llama, Qwen2 (QKV bias), Qwen3
(QK-norm, explicit head_dim) and Mistral (optional sliding window). Mixture-of-experts
families are rejected here by name until their weight mapping exists.

Both config dialects are read: transformers 4.x (``rope_theta``, ``rope_scaling``) and 5.x
(``rope_parameters``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch

SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelSpec:
    family: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_type: str
    rope_factor: float | None
    rope_low_freq_factor: float | None
    rope_high_freq_factor: float | None
    rope_original_max_position: int | None
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    sliding_window: int | None
    initializer_range: float
    bos_token_id: int | None
    eos_token_id: int | list[int] | None

    def padded_vocab_size(self, tp: int) -> int:
        """Vocabulary padded to a multiple of TP (Megatron shards the embedding rows).
        Padded ids never occur; their logits are masked out of every softmax."""
        return int(math.ceil(self.vocab_size / tp) * tp)

    def rope_inv_freq(self) -> torch.Tensor:
        """Inverse RoPE frequencies exactly as transformers computes them for this config
        (float32): default, linear scaling (divide by factor) or Llama-3 scaling."""
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim))
        if self.rope_type == "linear":
            return inv / self.rope_factor
        if self.rope_type == "llama3":
            factor, lo, hi = self.rope_factor, self.rope_low_freq_factor, self.rope_high_freq_factor
            old_len = self.rope_original_max_position
            low_wavelen, high_wavelen = old_len / lo, old_len / hi
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
            smooth = (old_len / wavelen - lo) / (hi - lo)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            return torch.where(medium, smoothed, scaled)
        return inv

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], *, source: str = "config.json") -> "ModelSpec":
        """Validate an HF ``config.json`` dict and build the spec; every problem found is
        listed in one ``ValueError`` that names ``source``."""
        family = cfg.get("model_type")
        if family not in SUPPORTED_FAMILIES:
            archs = cfg.get("architectures") or []
            raise ValueError(
                f"{source}: unsupported model_type {family!r} (architectures {archs}); "
                f"megappo supports {', '.join(SUPPORTED_FAMILIES)}"
            )
        problems = []
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if not isinstance(cfg.get(key), int):
                problems.append(f"{key} missing or not an integer ({cfg.get(key)!r})")
        if problems:
            raise ValueError(f"{source}: " + "; ".join(problems))
        if cfg.get("hidden_act", "silu") != "silu":
            problems.append(f"hidden_act {cfg['hidden_act']!r} (only silu / SwiGLU is supported)")
        if cfg.get("attention_bias") and family != "qwen2":
            problems.append(f"attention_bias=true ({family} then also has an o_proj bias, which Megatron's attention cannot hold)")
        if cfg.get("mlp_bias"):
            problems.append("mlp_bias=true (MLP biases are not supported)")
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads") or heads
        if heads % kv_heads:
            problems.append(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads

        rope = dict(cfg.get("rope_parameters") or {})
        legacy = cfg.get("rope_scaling") or {}
        rope = {**legacy, **rope}
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            problems.append(f"rope type {rope_type!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        sliding = None
        if family == "mistral":
            sliding = cfg.get("sliding_window")
        elif cfg.get("use_sliding_window"):
            problems.append("use_sliding_window=true (per-layer sliding windows are not supported)")
        if problems:
            raise ValueError(f"{source}: " + "; ".join(problems))

        return cls(
            family=family,
            num_layers=cfg["num_hidden_layers"],
            hidden_size=cfg["hidden_size"],
            ffn_hidden_size=cfg["intermediate_size"],
            num_attention_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=cfg["vocab_size"],
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_type=rope_type,
            rope_factor=rope.get("factor"),
            rope_low_freq_factor=rope.get("low_freq_factor"),
            rope_high_freq_factor=rope.get("high_freq_factor"),
            rope_original_max_position=rope.get("original_max_position_embeddings"),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 always has QKV biases (and no o_proj bias); its config has no attention_bias key.
            qkv_bias=family == "qwen2",
            qk_norm=family == "qwen3",
            sliding_window=sliding,
            initializer_range=float(cfg.get("initializer_range", 0.02)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
        )

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> "ModelSpec":
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise ValueError(f"{path}: no config.json (is this a HuggingFace model directory?)")
        with open(cfg_path) as f:
            try:
                cfg = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{cfg_path}: malformed JSON at line {e.lineno}: {e.msg}") from None
        return cls.from_hf_config(cfg, source=cfg_path)

    def check_parallel(self, tp: int, pp: int, vpp: int | None = None) -> None:
        """Raise ``ValueError`` naming the numbers when this model cannot be split so."""
        problems = []
        if self.num_attention_heads % tp:
            problems.append(f"tensor_model_parallel_size {tp} does not divide num_attention_heads {self.num_attention_heads}")
        if self.num_kv_heads % tp:
            problems.append(f"tensor_model_parallel_size {tp} does not divide num_key_value_heads {self.num_kv_heads}")
        chunks = pp * (vpp or 1)
        if self.num_layers % chunks:
            what = f"pipeline_model_parallel_size {pp}" + (f" x virtual {vpp}" if vpp else "")
            problems.append(f"{what} does not divide num_hidden_layers {self.num_layers}")
        if problems:
            raise ValueError("; ".join(problems))
