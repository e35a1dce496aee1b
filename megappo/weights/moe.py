"""The rules of a routed mixture-of-experts MLP block, shared by Qwen3-MoE and Mixtral.

Megatron's MoE layer holds a router (``mlp.router.weight``, [experts, hidden], replicated on
TP ranks) and this expert-parallel rank's experts: ``SequentialMLP`` on the local spec
(``mlp.experts.local_experts.{i}.linear_fc1/fc2.weight``) or TE's grouped GEMM on the
Transformer Engine spec (``mlp.experts.linear_fc1.weight{i}``), ``i`` the local expert
number. Each expert is a SwiGLU MLP whose fc1 is ``[gate; up]`` and fc2 is ``down``, split
over (expert-)tensor-parallel ranks like a dense MLP. HF stores one tensor per expert and
projection on disk (transformers 5 fuses them in memory only); the families differ in the
names alone. The pre-MLP norm of a routed layer is a separate module under both specs (TE
fuses it into fc1 only in dense layers).
"""

from __future__ import annotations

from megappo.weights.base import TensorRule

L = "model.layers.{layer}."
H, E, F = "hidden", "experts", "moe_ffn"


def moe_rules(block: str, gate: str, up: str, down: str) -> tuple[TensorRule, ...]:
    """Rules of one family: ``block`` the HF MoE module (``mlp``, ``block_sparse_moe``) and the
    names of an expert's gate / up / down projections (``gate_proj`` or Mixtral's ``w1``...)."""
    ex = L + block + ".experts.{expert}."
    return (
        TensorRule("pre_mlp_layernorm.weight", (L + "post_attention_layernorm.weight",), ((H,),), layer_kind="moe"),
        TensorRule("mlp.router.weight", (L + block + ".gate.weight",), ((E, H),), layer_kind="moe"),
        TensorRule(
            "mlp.experts.local_experts.{expert}.linear_fc1.weight",
            (ex + gate + ".weight", ex + up + ".weight"),
            ((F, H), (F, H)),
            fuse="concat",
            tp_dim=0,
            layer_kind="moe",
            te_name="mlp.experts.linear_fc1.weight{expert}",
        ),
        TensorRule(
            "mlp.experts.local_experts.{expert}.linear_fc2.weight",
            (ex + down + ".weight",),
            ((H, F),),
            tp_dim=1,
            layer_kind="moe",
            te_name="mlp.experts.linear_fc2.weight{expert}",
        ),
    )
