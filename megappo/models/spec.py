"""What megappo needs to know of a HuggingFace decoder: ``ModelSpec`` from ``config.json``.

One spec serves the Megatron model builder, the weight mapping and the rollout engine, so
a checkpoint is validated once. Supported families: Llama, Qwen2 (QKV bias), Qwen3
(QK-norm, explicit head_dim), Mistral (optional sliding window), and the mixture-of-experts
families Qwen3-MoE (Qwen3 attention, routed experts without a shared expert, optional dense
layers by ``decoder_sparse_step`` / ``mlp_only_layers``), Qwen2-MoE (Qwen2 attention with
QKV bias, the same routing plus a sigmoid-gated shared expert) and Mixtral (Mistral
attention, every layer routed). Other MoE variants are rejected naming the field
(``config.model_files.hf_config_problems``, shared with the dry run).

Both config dialects are read: transformers 4.x (``rope_theta``, ``rope_scaling``) and 5.x
(``rope_parameters``).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch

# The architecture checks read only config.json, so they live with the config checks (the
# dry run makes them without torch); re-exported here where the model code looks for them.
from megappo.config.model_files import (  # noqa: F401
    SUPPORTED_FAMILIES,
    SUPPORTED_ROPE_TYPES,
    hf_config_problems,
    read_config_json,
    rope_parameters,
)


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
    num_experts: int = 0
    """Routed experts per MoE layer (0: a dense model)."""
    moe_topk: int = 0
    moe_ffn_hidden_size: int = 0
    """Each expert's intermediate size."""
    moe_norm_topk_prob: bool = True
    """Top-k probabilities renormalised to sum 1 (Mixtral always; Qwen3-MoE's ``norm_topk_prob``)."""
    moe_layers: tuple[int, ...] = ()
    """0-based numbers of the layers whose MLP is the routed MoE block (the others are dense)."""
    router_aux_loss_coef: float = 0.0
    moe_shared_expert_ffn: int = 0
    """Intermediate size of the gated shared expert (Qwen2-MoE); 0: none."""
    """The family's load-balancing loss coefficient (``router_aux_loss_coef``), the default of
    ``model.moe.aux_loss_coeff``."""

    def __post_init__(self):
        # A spec read back from JSON (a checkpoint's metadata) has the layers as a list.
        object.__setattr__(self, "moe_layers", tuple(self.moe_layers))

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

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
        problems = hf_config_problems(cfg)
        if problems:
            raise ValueError(f"{source}: " + "; ".join(problems))
        family = cfg["model_type"]
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        rope, rope_type = rope_parameters(cfg)
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        sliding = cfg.get("sliding_window") if family in ("mistral", "mixtral") else None
        moe = _moe_fields(cfg)

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
            qkv_bias=family == "qwen2" or (family == "qwen2_moe" and bool(cfg.get("qkv_bias", True))),
            qk_norm=family in ("qwen3", "qwen3_moe"),
            sliding_window=sliding,
            initializer_range=float(cfg.get("initializer_range", 0.02)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            **moe,
        )

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> "ModelSpec":
        return cls.from_hf_config(read_config_json(str(path)), source=os.path.join(path, "config.json"))

    def check_parallel(self, tp: int, pp: int, vpp: int | None = None, ep: int = 1) -> None:
        """Raise ``ValueError`` naming the numbers when this model cannot be split so."""
        problems = []
        if ep > 1 and not self.is_moe:
            problems.append(f"expert_model_parallel_size {ep} needs a mixture-of-experts model ({self.family} is dense)")
        elif self.is_moe and self.num_experts % ep:
            problems.append(f"expert_model_parallel_size {ep} does not divide the number of experts {self.num_experts}")
        if self.is_moe and tp > 1 and self.moe_ffn_hidden_size % tp:
            problems.append(f"tensor_model_parallel_size {tp} does not divide the expert intermediate size {self.moe_ffn_hidden_size}")
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


def _moe_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """The ``ModelSpec`` MoE fields of a Qwen3-MoE or Mixtral config (none for dense ones).

    Qwen3-MoE: layer i is routed unless it is in ``mlp_only_layers`` or ``(i + 1)`` is not a
    multiple of ``decoder_sparse_step`` (transformers' ``Qwen3MoeDecoderLayer``); its
    experts have ``moe_intermediate_size``, its dense layers ``intermediate_size``.
    Mixtral: every layer routed, experts of ``intermediate_size``, top-k renormalised.
    Qwen2-MoE: Qwen3-MoE's layout plus a shared expert (``shared_expert_intermediate_size``)
    scaled by a sigmoid gate."""
    family, n = cfg["model_type"], cfg["num_hidden_layers"]
    if family in ("qwen3_moe", "qwen2_moe"):
        step, dense = cfg.get("decoder_sparse_step", 1) or 1, set(cfg.get("mlp_only_layers") or ())
        layers = tuple(i for i in range(n) if i not in dense and (i + 1) % step == 0)
        return dict(num_experts=cfg.get("num_experts") or cfg["num_local_experts"], moe_topk=cfg["num_experts_per_tok"],
                    moe_ffn_hidden_size=cfg["moe_intermediate_size"], moe_norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
                    moe_layers=layers, router_aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.001)),
                    moe_shared_expert_ffn=int(cfg.get("shared_expert_intermediate_size") or 0) if family == "qwen2_moe" else 0)
    if family == "mixtral":
        return dict(num_experts=cfg["num_local_experts"], moe_topk=cfg["num_experts_per_tok"],
                    moe_ffn_hidden_size=cfg["intermediate_size"], moe_norm_topk_prob=True,
                    moe_layers=tuple(range(n)), router_aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.02)))
    return {}
