"""The typed configuration tree of megappo.

Every field carries its documentation in the string literal that follows it; the
config reference (``python -m megappo.config --markdown``) is generated from these
strings, so they are the one place a knob is explained.

Names follow the upstream projects where they name a knob: the RL knobs follow ROLL's
LitePPO page and AReaL's ``adv_norm`` (see ``../shared/seeds``), the parallel sizes and
optimizer fields follow Megatron-core, and ``rollout.sglang`` is passed through to
SGLang's ``ServerArgs`` unchanged.

``None`` on an optional field means "not set"; where such a field falls back to
another, its docstring says to which.  The tree is frozen after loading: code reads it,
never writes it (see ``loader.load_config``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

# The algorithm's knobs live in their own module (one file per concern, and schema.py stays
# under the size limit); they are part of this schema and importable from here.
from megappo.config.schema_algo import (  # noqa: F401
    AdvEstimator,
    AdvNormConfig,
    AlgoConfig,
    KLKind,
    LossAggMode,
    NormLevel,
    Preset,
)


@dataclass(frozen=True)
class FP8Config:
    format: Optional[Literal["e4m3", "hybrid"]] = None
    """FP8 data format through Transformer Engine (Megatron's ``fp8``); None disables FP8.
    ``hybrid`` uses E4M3 forward and E5M2 for gradients. Needs TE and an FP8-capable GPU
    (Hopper or newer); asking for it without either is an error."""
    recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    """FP8 scaling recipe (Megatron's ``fp8_recipe``): delayed scaling with an amax
    history, per-tensor current scaling, 128x128 block scaling, or MX block scaling (Blackwell)."""
    amax_history_len: int = 1024
    """Length of the amax history for the ``delayed`` recipe (Megatron's ``fp8_amax_history_len``)."""
    amax_compute_algo: Literal["max", "most_recent"] = "max"
    """How the ``delayed`` recipe reduces its amax history (Megatron's ``fp8_amax_compute_algo``)."""
    param_gather: bool = False
    """Keep parameters in FP8 for the distributed optimizer's all-gather (Megatron's ``fp8_param_gather``)."""


@dataclass(frozen=True)
class MoEConfig:
    aux_loss_coeff: Optional[float] = None
    """Load-balancing auxiliary loss coefficient (Megatron's ``moe_aux_loss_coeff``); None
    takes the family's ``router_aux_loss_coef`` from ``config.json``; 0 turns the loss off."""
    z_loss_coeff: Optional[float] = None
    """Router z-loss coefficient (Megatron's ``moe_z_loss_coeff``); None: no z-loss (neither
    Qwen3-MoE nor Mixtral trains with one)."""
    capacity_factor: Optional[float] = None
    """Expert capacity factor (Megatron's ``moe_expert_capacity_factor``); None is dropless:
    every token reaches its top-k experts, as in transformers and the rollout engines."""


@dataclass(frozen=True)
class ModelConfig:
    hf_path: Optional[str] = None
    """HuggingFace model directory (``config.json`` + safetensors) for the actor, the
    reference and, unless ``critic_hf_path`` is set, the critic trunk. Loaded directly at
    model build; no offline conversion is needed. Required unless ``load_megatron`` is set."""
    critic_hf_path: Optional[str] = None
    """HF directory for the critic trunk; None uses ``hf_path``. The value head is new
    (see ``value_head_init_std``)."""
    load_megatron: Optional[str] = None
    """A Megatron distributed checkpoint written by ``tools/convert_hf_to_megatron.py`` to
    load the actor from instead of ``hf_path``'s weights (``hf_path`` still gives the config
    and tokenizer)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Parameter and compute dtype: ``auto`` is bfloat16 mixed precision (fp32 master weights)
    on GPU and float32 on CPU."""
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """Megatron layer spec: ``local`` (plain torch, works on CPU) or ``transformer_engine``;
    ``auto`` uses Transformer Engine on GPU when it is installed and local otherwise."""
    fp8: FP8Config = field(default_factory=FP8Config)
    """FP8 training through Transformer Engine."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture-of-experts training settings (Qwen3-MoE, Mixtral); ignored by dense models."""
    recompute_granularity: Optional[Literal["full", "selective"]] = None
    """Activation recomputation (Megatron's ``recompute_granularity``); None keeps activations."""
    recompute_num_layers: int = 1
    """Layers per recomputation chunk when ``recompute_granularity`` is ``full``."""
    megatron: dict[str, Any] = field(default_factory=dict)
    """Extra ``megatron.core.transformer.TransformerConfig`` fields, spelled as Megatron spells
    them (``{attention_dropout: 0.1, apply_rope_fusion: true}``), checked against that dataclass
    at load and ``--dry-run``. megappo's own choices, which these override: dropout 0
    (``attention_dropout``, ``hidden_dropout``; RL fine-tuning normally uses none), fusions off
    (results must match transformers), ``use_cpu_initialization: true``,
    ``attention_softmax_in_fp32: true``. Fields megappo sets (layout, dtype, FP8,
    recomputation, the architecture from ``config.json``) are errors naming their key; see
    "Megatron pass-through" below."""
    value_head_init_std: float = 0.0
    """Standard deviation of the critic's new value head init (normal, zero bias); 0 gives a
    zero head so the first values are exactly 0."""
    reference_on_cpu: bool = False
    """Keep the frozen reference model's weights on CPU between uses and move them to the
    device only for its forward pass (saves GPU memory, costs a copy per step)."""


@dataclass(frozen=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    """Tensor-parallel size (Megatron). Must divide the attention heads and the KV heads."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel size (Megatron). Must divide the number of layers."""
    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Interleaved (virtual) pipeline chunks per stage; needs pipeline size > 1."""
    expert_model_parallel_size: int = 1
    """Expert-parallel size (Megatron) of a mixture-of-experts model: must divide the number
    of experts and the data-parallel size (world / (TP x PP)). Experts are also split over TP."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs TP > 1 and the Transformer Engine spec)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (Megatron's distributed optimizer)."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend: ``auto`` is NCCL on GPU and gloo on CPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the trainer runs: ``auto`` is CUDA when a GPU is visible, else CPU."""
    rollout_world_size: int = 0
    """Rollout ranks apart from the trainer's (README "Asynchronous rollouts"): the last
    ``rollout_world_size`` ranks of the launch each run one engine and nothing else, rollout rank
    i serving data-parallel replica i (so it must equal DP); TP x PP x DP spans the other ranks.
    0: colocated, each replica's engine on its first trainer rank."""
    rollout_timeout_s: float = 60.0
    """With rollout ranks: a trainer rank raises ``RolloutEngineError`` naming a rollout rank silent
    (no heartbeat) this long; a rollout rank stops when the trainer is silent this long."""


@dataclass(frozen=True)
class RolloutConfig:
    engine: Literal["embedded", "sglang", "sglang_server"] = "embedded"
    """Rollout engine: ``embedded`` (plain torch in the trainer process; the CPU default),
    ``sglang`` (colocated ``sglang.Engine``; with ``parallel.device: cpu`` for tests and debugging
    only, in the CPU SGLang environment) or ``sglang_server`` (external servers by URL)."""
    num_return_sequences_in_group: int = 8
    """Responses sampled per prompt (the group size G of GRPO/LitePPO); group-level
    statistics need at least 2."""
    response_length: int = 512
    """Maximum new tokens per response; longer responses are truncated (finish reason ``length``)."""
    temperature: float = 1.0
    """Sampling temperature; the trainer applies the same temperature to its log-probs."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0 disables)."""
    top_k: int = -1
    """Top-k sampling (-1 disables)."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Extra token ids that end a response (the tokenizer's EOS always does)."""
    weight_sync_bucket_mb: int = 512
    """Size of the buckets the actor's weights are streamed to the engine in; the extra
    memory of a sync is about one bucket."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device of the embedded engine: ``auto`` follows ``parallel.device``."""
    sglang: dict[str, Any] = field(default_factory=dict)
    """Extra ``sglang.srt.server_args.ServerArgs`` fields (e.g. ``mem_fraction_static``,
    ``tp_size``), passed through unchanged and checked against SGLang's own dataclass."""
    server_urls: list[str] = field(default_factory=list)
    """Base URLs of external SGLang servers for ``engine: sglang_server``."""
    server_timeout_s: float = 600.0
    """Timeout of every call to an SGLang engine (colocated) or server; a hang becomes an error
    naming the engine or the server."""
    eval_temperature: float = 0.0
    """Sampling temperature of evaluation (0 is greedy)."""
    mode: Literal["sync", "one_step_off", "async"] = "sync"
    """``sync``: each step generates its batch with the newest weights, then trains on it.
    ``one_step_off``: the batch of step k + 1 is generated (in a background thread of the
    engine rank) while step k trains, so every sample is exactly one version old.
    ``async``: a producer keeps generating batches ahead into a bounded buffer, as far as
    ``max_staleness`` allows; the trainer takes the oldest. See README "Asynchronous rollouts"."""
    max_staleness: int = 1
    """With ``mode: async``: the most policy versions a sample may lag behind the weights it
    trains (AReaL's eta). Admission control: a batch is not started when it would arrive
    staler than this. 0 reproduces ``sync``; ``one_step_off`` is 1."""
    partial_rollout: bool = False
    """With ``mode: one_step_off`` or ``async``: a weight sync interrupts the batch being
    generated instead of waiting for it; each response goes on from its tokens so far under
    the new weights, and every token records the version that sampled it (the staleness
    metrics, ``algo.mask_stale_tokens`` and the decoupled loss work per token). README
    "Asynchronous rollouts"."""


@dataclass(frozen=True)
class DataConfig:
    train_path: Optional[str] = None
    """Training prompts: a ``.jsonl`` or ``.parquet`` file."""
    eval_path: Optional[str] = None
    """Held-out prompts for periodic evaluation; None disables evaluation."""
    prompt_key: str = "prompt"
    """Field holding the prompt (a string, or a list of chat messages)."""
    answer_key: str = "answer"
    """Field holding the reference answer given to the reward function."""
    tokenizer_path: Optional[str] = None
    """Tokenizer directory; None uses ``model.hf_path``."""
    apply_chat_template: Literal["auto", "on", "off"] = "auto"
    """Wrap prompts in the tokenizer's chat template: ``auto`` when the tokenizer has one."""
    system_prompt: Optional[str] = None
    """System message prepended when the chat template is applied."""
    prompt_length: int = 512
    """Maximum prompt tokens; longer prompts are skipped and counted in the log."""
    shuffle: bool = True
    """Shuffle the prompts every epoch with the run seed."""
    max_eval_samples: Optional[int] = None
    """Evaluate on at most this many held-out prompts."""


@dataclass(frozen=True)
class RewardModelConfig:
    """A trained reward model scored in the RL loop, beside or instead of ``reward.fn``."""

    hf_path: Optional[str] = None
    """HF ``*ForSequenceClassification`` directory (Llama, Qwen2, Qwen3, Mistral; one label,
    ``score`` without bias), loaded into Megatron with its own TP x PP (below), frozen; None: no
    reward model. It scores prompt + response at the last token (EOS when the response finished)."""
    tensor_model_parallel_size: Optional[int] = None
    """The reward model's TP size; None: the actor's (``parallel.tensor_model_parallel_size``).
    TP x PP must divide the world size; each replica scores its share of every data-parallel
    shard's rows."""
    pipeline_model_parallel_size: Optional[int] = None
    """The reward model's PP size (no virtual stages); None: the actor's."""
    weight: float = 1.0
    """Weight of the model's score in the reward: ``rule_weight * reward.fn + weight * model``."""
    rule_weight: float = 0.0
    """Weight of the rule reward (``reward.fn``) when a reward model is set; 0: the model's
    score is the only reward."""
    tokenizer_path: Optional[str] = None
    """The reward model's tokenizer; None: its own directory's when it has tokenizer files,
    else the policy's (only if the vocabularies are the same size). When it differs from the
    policy's, the text is re-tokenized for it."""
    on_cpu: bool = False
    """Keep the reward model's weights on CPU between uses (as ``model.reference_on_cpu``)."""


@dataclass(frozen=True)
class RewardConfig:
    fn: str = "gsm8k"
    """Reward function: ``math_verify`` (MATH-style, ``\\boxed{}``), ``gsm8k`` (``#### answer``
    exact match), or a user function given as ``module:function``."""
    format_reward: float = 0.0
    """Extra reward for a well-formed answer (added to the correctness score)."""
    timeout_s: float = 10.0
    """Per-response timeout; a reward function that exceeds it or raises scores 0 and is counted."""
    num_workers: int = 2
    """Worker processes that run the reward function."""
    correct_score: float = 1.0
    """Score of a correct answer."""
    incorrect_score: float = 0.0
    """Score of an incorrect answer."""
    batch_timeout_s: float = 300.0
    """Deadline of one scoring batch (reward functions run in worker processes): responses still
    unscored then time out together, so hanging rewards cost one deadline per batch, not
    ``timeout_s`` per worker round; 0 disables."""
    max_failed_fraction: float = 0.5
    """A scoring batch in which more than this fraction of responses failed (raised or timed
    out) is a failed batch; 1 disables the bound."""
    max_failed_batches: int = 2
    """The run stops with an error after this many failed batches in a row."""
    model: RewardModelConfig = field(default_factory=RewardModelConfig)
    """A reward model (``*ForSequenceClassification``) scored beside or instead of ``fn``."""


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-6
    """Actor peak learning rate."""
    critic_lr: Optional[float] = None
    """Critic peak learning rate; None uses ``lr``."""
    min_lr: float = 0.0
    """Final learning rate of the cosine decay."""
    lr_warmup_steps: int = 0
    """Optimizer steps of linear warmup."""
    lr_decay_style: Literal["constant", "cosine"] = "constant"
    """Learning-rate schedule after warmup."""
    lr_decay_steps: Optional[int] = None
    """Optimizer steps over which cosine decays; None uses the run's total optimizer steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    megatron: dict[str, Any] = field(default_factory=dict)
    """Extra ``megatron.core.optimizer.OptimizerConfig`` fields of the actor's and the critic's
    optimizers (e.g. ``{decoupled_weight_decay: true}``), checked against that dataclass.
    Fields with a key of ours (lr, Adam, clip, dtype, distributed optimizer) are errors naming it."""
    ddp: dict[str, Any] = field(default_factory=dict)
    """``megatron.core.distributed.DistributedDataParallelConfig`` fields (gradient buckets and
    their reduction): ``grad_reduce_in_fp32`` (megappo's default true), ``overlap_grad_reduce``,
    ``overlap_param_gather`` (also given to the optimizer), ``bucket_size``, ...; checked against
    that dataclass."""


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    """RL steps (one rollout batch each)."""
    rollout_batch_size: int = 32
    """Prompts per RL step (global, over all data-parallel ranks)."""
    mini_batch_size: Optional[int] = None
    """Prompts per optimizer step (global); None is one optimizer step per epoch over the whole rollout batch."""
    shuffle_minibatches: bool = True
    """Shuffle each rank's responses before cutting them into mini-batches (a fresh seeded
    permutation per step and epoch, so a resumed run shuffles as the uninterrupted one), as
    TRL does; False takes mini-batches of whole, contiguous groups. Advantages are computed
    before the split, so group statistics are unaffected. On by default: on the CPU demo
    (3 seeds) held-out accuracy from step 140 on averaged 87-90% with it, about 77% without."""
    max_tokens_per_microbatch: int = 8192
    """Token budget of one micro-batch per data-parallel rank (prompt + response tokens;
    padding counts unless ``packed_sequences``)."""
    packed_sequences: bool = False
    """Remove padding: each micro-batch's sequences are concatenated into one row (a
    block-diagonal causal mask on the local spec, THD ``PackedSeqParams`` on the Transformer
    Engine spec) and ``max_tokens_per_microbatch`` counts real tokens; off, micro-batches are
    right-padded."""
    offload: bool = False
    """Colocated rollout on GPUs: move the actor's, critic's and reference's parameters, DDP
    gradient buffers and optimizer state to pinned host memory while the engine generates,
    and back before training (``megappo.models.offload.TrainerOffload``; Megatron's own
    buffers, bit-exact). Needed at 7B+ when the engine shares the GPUs; costs a host copy of
    the trainer state and a PCIe round trip per step. On a CPU run it frees nothing."""
    seed: int = 1234
    """Seed of data order, sampling and initialization."""
    run_dir: str = "runs/default"
    """Directory of metrics, TensorBoard logs and (by default) checkpoints."""
    eval_every: int = 0
    """Evaluate every N steps (and at step 0 and at the end); 0 disables."""


@dataclass(frozen=True)
class CheckpointConfig:
    dir: Optional[str] = None
    """Checkpoint directory; None uses ``<train.run_dir>/checkpoints``."""
    save_every: int = 0
    """Save a training checkpoint every N steps (and at the end); 0 only at the end."""
    keep_last: int = 2
    """Checkpoints kept; older ones are deleted after a new one is complete."""
    resume: Literal["auto", "never"] = "auto"
    """``auto`` resumes from the ``latest`` checkpoint of the checkpoint directory when there is one."""
    save_hf_every: int = 0
    """Also write the actor in HF format every N steps; 0 disables."""
    save_hf_at_end: bool = True
    """Write the final actor in HF format (``<run_dir>/hf``)."""
    keep_last_hf: int = 0
    """HF exports ``<run_dir>/hf/step_N`` (``save_hf_every``) kept, the most recent ones; 0 keeps
    all. ``hf/final`` is never pruned."""
    resume_from: Optional[str] = None
    """Resume from this checkpoint instead of ``latest``: a step (``12``), ``step_12``, or a path
    to a checkpoint directory. Later checkpoints of the checkpoint directory are moved to
    ``<dir>/set_aside/`` (not deleted), as are all of them with ``resume=never``."""
    allow_algo_change: bool = False
    """Resume a checkpoint whose ``algo`` settings differ from this run's (refused otherwise).
    Changed ``optim`` settings always apply on resume; every changed key is logged."""


@dataclass(frozen=True)
class LoggingConfig:
    tensorboard: bool = True
    """Write TensorBoard scalars to ``<run_dir>/tensorboard``."""
    console_every: int = 1
    """Print a metrics line every N steps."""
    progress_bar: bool = True
    """Show progress bars (steps, rollout) on rank 0 when attached to a terminal."""
    level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level of the ``megappo`` logger."""
    samples_every: int = 10
    """Show ``num_samples`` whole prompts and responses (with score and answer) every N steps:
    on the console, as TensorBoard text and appended to ``<run_dir>/samples.jsonl``; 0 disables."""
    num_samples: int = 2
    """Samples shown per ``samples_every`` step, spread over the batch (different prompts)."""
    wandb: bool = False
    """Also log scalars and samples to Weights & Biases (needs ``pip install wandb``); one
    W&B run per session, grouped by the run directory's name."""
    wandb_project: str = "megappo"
    """W&B project."""
    wandb_name: Optional[str] = None
    """W&B run name; None: the run directory's name."""
    wandb_mode: Literal["online", "offline"] = "online"
    """``offline`` writes under ``<run_dir>/wandb`` with no network (upload later with ``wandb sync``)."""


@dataclass(frozen=True)
class RewardTrainConfig:
    """The reward-model trainer (``python -m megappo.train_rm``). It also reads ``model``
    (``hf_path``: the causal LM or reward model to start from; ``dtype``), ``parallel``,
    ``optim``, ``data`` (``tokenizer_path``, ``apply_chat_template``, ``system_prompt``),
    ``train`` (``seed``, ``run_dir``, ``max_tokens_per_microbatch``), ``checkpoint`` and
    ``logging``."""

    train_path: Optional[str] = None
    """Preference pairs to train on: a ``.jsonl`` or ``.parquet`` file, one pair per row."""
    eval_path: Optional[str] = None
    """Held-out preference pairs (pair accuracy, margin and loss); None disables evaluation."""
    prompt_key: str = "prompt"
    """Field holding the prompt (a string, or a list of chat messages)."""
    chosen_key: str = "chosen"
    """Field holding the preferred response (a string, or a conversation ending with it)."""
    rejected_key: str = "rejected"
    """Field holding the dispreferred response (a string, or a conversation ending with it)."""
    max_length: int = 1024
    """Maximum prompt + response tokens of either side; longer pairs are skipped and counted."""
    epochs: int = 1
    """Passes over the training pairs."""
    batch_size: int = 32
    """Pairs per optimizer step (global, over all data-parallel ranks)."""
    eval_every: int = 0
    """Evaluate the held-out pairs every N steps (and at the end); 0: only at the end."""
    head_init_std: float = 0.0
    """Standard deviation of the new ``score`` head (normal init) when ``model.hf_path`` is a
    causal LM; 0 gives a zero head (every first score 0). Ignored when it is a reward model."""


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The actor, critic and reference models."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Process layout: tensor, pipeline and data parallelism."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """The rollout engine and sampling."""
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    """Advantages, losses and their tricks."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompt datasets."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward functions."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The RL loop."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Training checkpoints."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics and logs."""
    reward_train: RewardTrainConfig = field(default_factory=RewardTrainConfig)
    """Reward-model training from preference pairs (``megappo.train_rm``)."""
