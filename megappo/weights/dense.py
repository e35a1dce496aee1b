"""The rules of a dense Llama-style decoder (RMSNorm, GQA attention, SwiGLU MLP) under the
HF names that Llama, Mistral, Qwen2 and Qwen3 share. Optional parts carry a condition
(QKV bias, QK-norm, untied head, a reward model's score head); a family picks its
architectures and config checks.
"""

from __future__ import annotations

from megappo.weights.base import TensorRule

L = "model.layers.{layer}."
H, V, F, Q, KV, D, N = "hidden", "vocab", "ffn", "q", "kv", "head_dim", "labels"

DENSE_RULES = (
    TensorRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), ((V, H),), stage="first", tp_dim=0, vocab=True),
    TensorRule(
        "input_layernorm.weight",
        (L + "input_layernorm.weight",),
        ((H,),),
        te_name="self_attention.linear_qkv.layer_norm_weight",
    ),
    TensorRule(
        "self_attention.linear_qkv.weight",
        (L + "self_attn.q_proj.weight", L + "self_attn.k_proj.weight", L + "self_attn.v_proj.weight"),
        ((Q, H), (KV, H), (KV, H)),
        fuse="qkv",
        tp_dim=0,
    ),
    TensorRule(
        "self_attention.linear_qkv.bias",
        (L + "self_attn.q_proj.bias", L + "self_attn.k_proj.bias", L + "self_attn.v_proj.bias"),
        ((Q,), (KV,), (KV,)),
        fuse="qkv",
        tp_dim=0,
        when="qkv_bias",
    ),
    TensorRule("self_attention.q_layernorm.weight", (L + "self_attn.q_norm.weight",), ((D,),), when="qk_norm"),
    TensorRule("self_attention.k_layernorm.weight", (L + "self_attn.k_norm.weight",), ((D,),), when="qk_norm"),
    TensorRule("self_attention.linear_proj.weight", (L + "self_attn.o_proj.weight",), ((H, Q),), tp_dim=1),
    TensorRule(
        "pre_mlp_layernorm.weight",
        (L + "post_attention_layernorm.weight",),
        ((H,),),
        te_name="mlp.linear_fc1.layer_norm_weight",
        layer_kind="dense",
    ),
    TensorRule(
        "mlp.linear_fc1.weight",
        (L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"),
        ((F, H), (F, H)),
        fuse="concat",
        tp_dim=0,
        layer_kind="dense",
    ),
    TensorRule("mlp.linear_fc2.weight", (L + "mlp.down_proj.weight",), ((H, F),), tp_dim=1, layer_kind="dense"),
    TensorRule("decoder.final_layernorm.weight", ("model.norm.weight",), ((H,),), stage="last"),
    TensorRule("output_layer.weight", ("lm_head.weight",), ((V, H),), stage="last", tp_dim=0, vocab=True, when="untied_head"),
    TensorRule(
        "output_layer.weight",
        ("model.embed_tokens.weight",),
        ((V, H),),
        stage="last",
        tp_dim=0,
        vocab=True,
        when="tied_head_copy",
        export=False,
    ),
    # A reward model (``*ForSequenceClassification``, one label): ``score`` is a bias-free
    # Linear(hidden, 1), replicated on TP ranks, in place of the LM head.
    TensorRule("output_layer.weight", ("score.weight",), ((N, H),), stage="last", when="score_head"),
)


def no_output_bias(cfg: dict) -> list[str]:
    """``attention_bias`` also gives ``o_proj`` a bias in Llama / Qwen3; Megatron's
    ``linear_proj`` has none (``add_bias_linear=False`` would add MLP biases too)."""
    if cfg.get("attention_bias"):
        return ["attention_bias=true gives o_proj a bias, which Megatron's linear_proj cannot hold (not supported)"]
    return []
