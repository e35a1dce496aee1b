"""Megatron-core models from a ``ModelSpec``: the TransformerConfig, the layer spec, the
GPT model of one pipeline stage, and the critic's value head.

Model construction never touches process groups (STYLE point 6): it reads the TP/PP
sizes and ranks from Megatron's ``parallel_state`` after ``megappo.parallel.init_parallel``,
or, for a model with its own layout, from the ``ModelGroups`` the parallel layer made for it.

Layer specs: ``local`` (plain torch; the only one that runs on CPU) or
``transformer_engine`` (fused TE modules; needed for FP8). The two name their norm weights
differently (``input_layernorm.weight`` vs ``self_attention.linear_qkv.layer_norm_weight``);
the weight mapping in ``megappo.weights`` reads which one a model uses from
``model.megappo_transformer_impl``.

Critic value head: the LM head is replaced by ``ValueHead``, a replicated
``Linear(hidden, 1)`` (with bias), initialized N(0, ``value_head_init_std``) with zero bias;
std 0 gives a zero head, so the first values are exactly 0 and GAE starts from the
Monte-Carlo returns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F

from megappo.config.passthrough import TRANSFORMER, check_megatron_section
from megappo.models.spec import ModelSpec

log = logging.getLogger("megappo")

Role = Literal["actor", "critic", "reference"]


@dataclass(frozen=True)
class BuildOptions:
    """How to build, beyond the architecture (from ``cfg.model`` and ``cfg.parallel``)."""

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    dtype: torch.dtype = torch.float32
    transformer_impl: Literal["local", "transformer_engine"] = "local"
    fp8_format: str | None = None
    fp8_recipe: str = "delayed"
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"
    fp8_param: bool = False
    recompute_granularity: str | None = None
    recompute_num_layers: int = 1
    sequence_parallel: bool = False
    value_head_init_std: float = 0.0
    ep: int = 1
    """Expert-parallel size (``parallel.expert_model_parallel_size``)."""
    moe_aux_loss_coeff: float | None = None
    """Load-balancing loss coefficient; None: the family's (``ModelSpec.router_aux_loss_coef``)."""
    moe_z_loss_coeff: float | None = None
    moe_capacity_factor: float | None = None
    """None: dropless (every token reaches its experts)."""
    routing_replay: bool = False
    """MoE actor: replay the forward-only pass's experts in training passes (``models.routing``)."""
    routing_replay_source: str = "old"
    """``old``: replay the forward-only pass's recording; ``rollout``: the rollout engine's
    routing (``TokenBatch.routed_experts_BSLK``) in every pass (``algo.routing_replay_source``)."""
    megatron: Mapping[str, Any] = field(default_factory=dict)
    """Extra ``TransformerConfig`` fields (``model.megatron``), laid over megappo's defaults
    (``config.passthrough.TRANSFORMER_DEFAULTS``: no dropout, fusions off, CPU initialization);
    a field megappo sets from another key is a ``ValueError`` naming that key."""


def te_available() -> bool:
    """Transformer Engine imports (never true on CPU machines: TE needs CUDA libraries)."""
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def fp8_capable_gpu() -> bool:
    """An FP8 tensor-core GPU is visible (compute capability 8.9 or newer: Ada, Hopper, Blackwell)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def resolve_transformer_impl(requested: str, device: torch.device) -> str:
    """``auto``: Transformer Engine on GPU when installed, else local. An explicit request
    that cannot be met is an error that says what to install."""
    if requested == "auto":
        return "transformer_engine" if device.type == "cuda" and te_available() else "local"
    if requested == "transformer_engine":
        if device.type != "cuda":
            raise ValueError("model.transformer_impl=transformer_engine needs a CUDA GPU; use local (or auto) on CPU")
        if not te_available():
            raise ValueError(
                "model.transformer_impl=transformer_engine but Transformer Engine is not importable: "
                "pip install megappo[te] (transformer-engine[pytorch]) in a CUDA environment, or use local"
            )
    return requested


def check_fp8(opts: BuildOptions) -> None:
    """FP8 needs the TE spec, TE itself and an FP8-capable GPU; name what is missing."""
    if opts.fp8_format is None:
        return
    missing = []
    if not te_available():
        missing.append("Transformer Engine (pip install megappo[te], i.e. transformer-engine[pytorch])")
    if not fp8_capable_gpu():
        missing.append("an FP8-capable GPU (compute capability >= 8.9: Ada, Hopper or Blackwell)")
    if opts.transformer_impl != "transformer_engine":
        missing.append("model.transformer_impl=transformer_engine (the local spec has no FP8 path)")
    if opts.fp8_recipe == "mxfp8" and torch.cuda.is_available() and torch.cuda.get_device_capability() < (10, 0):
        missing.append("a Blackwell GPU for fp8 recipe mxfp8 (use delayed, tensorwise or blockwise on Hopper)")
    if missing:
        raise ValueError(f"model.fp8.format={opts.fp8_format} needs " + " and ".join(missing))


def fp8_fields(opts: BuildOptions) -> dict:
    """``model.fp8`` as Megatron's own ``TransformerConfig`` fields (empty without FP8).

    ``fp8`` is the format (e4m3 | hybrid), ``fp8_recipe`` the scaling recipe (delayed |
    tensorwise | blockwise | mxfp8); the amax history settings only mean something to the
    delayed recipe, so only it gets them. ``fp8_param`` (keep the GEMM weights in FP8)
    comes with ``model.fp8.param_gather``, whose other half, the DDP config's
    ``fp8_param_gather``, is ``ddp_fp8_fields``; Megatron-LM's ``--fp8-param-gather`` sets
    both the same way."""
    if opts.fp8_format is None:
        return {}
    fields = dict(fp8=opts.fp8_format, fp8_recipe=opts.fp8_recipe, fp8_param=opts.fp8_param)
    if opts.fp8_recipe == "delayed":
        fields.update(fp8_amax_history_len=opts.fp8_amax_history_len, fp8_amax_compute_algo=opts.fp8_amax_compute_algo)
    return fields


def ddp_fp8_fields(fp8_param: bool, use_distributed_optimizer: bool) -> dict:
    """``DistributedDataParallelConfig`` fields: all-gather the parameters in FP8
    (``fp8_param_gather``) when they are kept in FP8 (``fp8_fields``' ``fp8_param``). That
    all-gather is the distributed optimizer's (Megatron-LM asserts the same pairing)."""
    if not fp8_param:
        return {}
    if not use_distributed_optimizer:
        raise ValueError("model.fp8.param_gather=true needs parallel.use_distributed_optimizer=true")
    return {"fp8_param_gather": True}


def transformer_config(spec: ModelSpec, opts: BuildOptions):
    """The Megatron ``TransformerConfig`` for ``spec`` under ``opts``."""
    from megatron.core.transformer import TransformerConfig

    spec.check_parallel(opts.tp, opts.pp, opts.vpp, opts.ep)
    check_fp8(opts)
    if opts.sequence_parallel and opts.transformer_impl != "transformer_engine":
        raise ValueError("parallel.sequence_parallel needs model.transformer_impl=transformer_engine (the local spec's torch norms do not support it)")
    extra = check_megatron_section(TRANSFORMER, opts.megatron)  # model.megatron: no owned, no unknown field
    bf16 = opts.dtype == torch.bfloat16
    recompute = {}
    if opts.recompute_granularity == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=opts.recompute_num_layers)
    elif opts.recompute_granularity == "selective":
        recompute = dict(recompute_granularity="selective")
    return TransformerConfig(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_kv_heads,
        kv_channels=spec.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=spec.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        qk_layernorm=spec.qk_norm,
        # HF's sliding window W lets a token see itself and the W-1 tokens before it.
        window_size=(spec.sliding_window - 1, 0) if spec.sliding_window else None,
        init_method_std=spec.initializer_range,
        tensor_model_parallel_size=opts.tp,
        pipeline_model_parallel_size=opts.pp,
        virtual_pipeline_model_parallel_size=opts.vpp,
        sequence_parallel=opts.sequence_parallel,
        params_dtype=opts.dtype,
        pipeline_dtype=opts.dtype,
        bf16=bf16,
        # Variable-length micro-batches through the pipeline schedules.
        variable_seq_lengths=True,
        # Interleaved schedule: with PP=2 the previous and the next stage are one rank, and
        # batched send-prev/send-next messages are indistinguishable (Megatron-LM issue
        # #750); overlapped p2p sends the two directions separately.
        overlap_p2p_comm=opts.vpp is not None,
        batch_p2p_comm=opts.vpp is None,
        **fp8_fields(opts),
        **recompute,
        **{**TRANSFORMER.defaults, **moe_fields(spec, opts), **_no_cuda_graph_scope(TransformerConfig), **extra},
    )


def moe_fields(spec: ModelSpec, opts: BuildOptions) -> dict:
    """Megatron's MoE ``TransformerConfig`` fields for a mixture-of-experts spec (empty for dense).

    Routing as transformers computes it: softmax over all experts, top-k, then (Mixtral;
    Qwen3-MoE with ``norm_topk_prob``) renormalised over the k, which equals Megatron's
    softmax over the top-k logits (``moe_router_pre_softmax=False``); Qwen3-MoE without
    it keeps the full-softmax probabilities (``moe_router_pre_softmax=True``). Dropless
    unless a capacity factor is set. The token dispatcher stays megappo's pass-through default,
    all-to-all (the all-gather one rejects variable sequence lengths); other Megatron MoE
    options (``moe_router_dtype``, ``moe_permute_fusion``, ...) come through ``model.megatron``. Experts: ``SequentialMLP`` on the local spec, TE's
    grouped GEMM (``TEGroupedMLP``) on the Transformer Engine spec. Expert tensor
    parallelism equals TP (Megatron's default), so experts split like dense MLPs."""
    if not spec.is_moe:
        return {}
    aux = spec.router_aux_loss_coef if opts.moe_aux_loss_coeff is None else opts.moe_aux_loss_coeff
    moe_layers = set(spec.moe_layers)
    return dict(
        num_moe_experts=spec.num_experts,
        moe_ffn_hidden_size=spec.moe_ffn_hidden_size,
        moe_router_topk=spec.moe_topk,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not spec.moe_norm_topk_prob,
        moe_layer_freq=[1 if i in moe_layers else 0 for i in range(spec.num_layers)],
        moe_router_load_balancing_type="aux_loss" if aux > 0 else "none",
        moe_aux_loss_coeff=aux,
        moe_z_loss_coeff=opts.moe_z_loss_coeff or None,
        moe_expert_capacity_factor=opts.moe_capacity_factor,
        moe_grouped_gemm=opts.transformer_impl == "transformer_engine",
        expert_model_parallel_size=opts.ep,
        # Qwen2-MoE's shared expert: sigmoid(x . gate) * SwiGLU(x), as Megatron's gated SharedExpertMLP.
        moe_shared_expert_intermediate_size=spec.moe_shared_expert_ffn or None,
        moe_shared_expert_gate=spec.moe_shared_expert_ffn > 0,
    )


def _no_cuda_graph_scope(config_cls) -> dict:
    """No CUDA graphs: an empty scope. megatron-core 0.16's default, ``"full"``, warns that
    it is deprecated on every config built (and means the same as the empty list)."""
    import dataclasses

    return {"cuda_graph_scope": []} if any(f.name == "cuda_graph_scope" for f in dataclasses.fields(config_cls)) else {}


def layer_spec(spec: ModelSpec, opts: BuildOptions, config=None, vp_stage: int | None = None):
    """The layer spec: one for every layer of a dense model; for an MoE model the block
    spec of this stage, routed or dense per layer (``moe_layer_freq`` from ``spec.moe_layers``)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if spec.is_moe:
        return gpt_layer_specs.get_gpt_decoder_block_spec(
            config, use_transformer_engine=opts.transformer_impl == "transformer_engine",
            normalization="RMSNorm", vp_stage=vp_stage,
        )
    if opts.transformer_impl == "transformer_engine":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=spec.qk_norm)
    return gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=spec.qk_norm, normalization="RMSNorm")


class ValueHead(torch.nn.Module):
    """The critic's head: hidden [S, B, H] -> values [S, B, 1], replicated on TP ranks.

    Called the way GPTModel calls its output layer, so it slots in as ``output_layer``.
    With sequence parallelism the final norm's output is split along S over TP ranks: the
    head gathers it first (backward: each rank keeps its own slice of the gradient, since
    every rank computes the same replicated loss), so every rank has all the values.
    """

    def __init__(self, hidden_size: int, init_std: float, dtype: torch.dtype, sequence_parallel: bool = False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(1, hidden_size, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=dtype))
        self.sequence_parallel = False  # read by GPTModel for its own output-layer logic
        self.gather_sequence = sequence_parallel
        with torch.no_grad():
            if init_std > 0:
                self.weight.normal_(0.0, init_std)
            else:
                self.weight.zero_()

    def forward(self, hidden_states, weight=None, runtime_gather_output=None):
        if self.gather_sequence:
            from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

            hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False)
        return F.linear(hidden_states, self.weight, self.bias), None

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix, {}, sharded_offsets)


def build_model(spec: ModelSpec, role: Role, opts: BuildOptions, *, vp_stage: int | None = None, groups=None):
    """One pipeline stage (or one virtual chunk, ``vp_stage``) of a Megatron GPT model.

    ``role`` actor / reference: the LM head over the (TP-padded) vocabulary;
    ``critic``: the value head instead. The reference is built frozen (no grads).
    ``groups``: a ``megappo.parallel.model_groups.ModelGroups`` of the model's own layout
    (no virtual stages); None: Megatron's global ``parallel_state`` (the actor's layout).
    """
    from megatron.core import parallel_state as mpu
    from megatron.core.models.gpt import GPTModel

    if role not in ("actor", "critic", "reference"):
        raise ValueError(f"role must be actor, critic or reference; got {role!r}")
    config = transformer_config(spec, opts)
    if groups is not None and not groups.shares_actor_layout:
        assert vp_stage is None and (groups.tp, groups.pp) == (opts.tp, opts.pp), (groups, opts.tp, opts.pp)
        pre, post, pg_collection = groups.is_first_stage, groups.is_last_stage, groups.pg_collection
    else:
        pre = mpu.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = mpu.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        pg_collection = None
    tie = spec.tie_word_embeddings and role != "critic"
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(spec, opts, config, vp_stage),
        vocab_size=spec.padded_vocab_size(opts.tp),
        max_sequence_length=spec.max_position_embeddings,
        pre_process=pre,
        post_process=post,
        parallel_output=True,
        share_embeddings_and_output_weights=tie,
        position_embedding_type="rope",
        rotary_base=int(spec.rope_theta) if float(spec.rope_theta).is_integer() else spec.rope_theta,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )
    # Megatron's RoPE knows only Llama-3 scaling with fixed factors; set the exact
    # frequencies transformers uses for this config instead.
    model.rotary_pos_emb.inv_freq = spec.rope_inv_freq().to(model.rotary_pos_emb.inv_freq.device)
    if role == "critic" and post:
        model.output_layer = ValueHead(spec.hidden_size, opts.value_head_init_std, opts.dtype, opts.sequence_parallel)
    if role == "reference":
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
    model.megappo_spec = spec
    model.megappo_role = role
    model.megappo_transformer_impl = opts.transformer_impl
    if pg_collection is not None:
        model.megappo_groups = groups  # its TP rank for the weight mapping (``weights.model_io.placement_of``)
    return model


def build_model_chunks(spec: ModelSpec, role: Role, opts: BuildOptions, *, groups=None) -> list:
    """All model chunks of this rank: one, or ``vpp`` with interleaved pipelining.
    ``groups``: as for ``build_model``."""
    if opts.vpp is None:
        return [build_model(spec, role, opts, groups=groups)]
    return [build_model(spec, role, opts, vp_stage=i) for i in range(opts.vpp)]
