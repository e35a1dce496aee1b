"""Upstream options passed through as dicts, checked against the upstream dataclasses.

Megatron-core and SGLang have hundreds of options; megappo declares typed keys only for
what it owns (the parallel layout, dtype, the FP8 choice, recomputation, the optimizer's
Adam and clip settings) and passes the long tail through unchanged (STYLE point 5):

  ``model.megatron``   extra ``megatron.core.transformer.TransformerConfig`` fields
  ``optim.megatron``   extra ``megatron.core.optimizer.OptimizerConfig`` fields
  ``optim.ddp``        ``megatron.core.distributed.DistributedDataParallelConfig`` fields
  ``rollout.sglang``   ``sglang.srt.server_args.ServerArgs`` fields

A key is checked against the class's own ``dataclasses.fields`` (an unknown key is an error
with a did-you-mean, as our own keys are; a value of a plain type is type-checked); a field
megappo sets itself is an error naming the key that controls it, so there is one place to
set everything. Megatron is imported only when one of its dicts is non-empty, so a dry run
of a recipe without them stays free of torch. SGLang's ``ServerArgs`` fields (a dataclass in
older SGLang, a msgspec Struct from 0.5.21) are read from the installed SGLang, imported in a
child process only when ``rollout.sglang`` is set for an SGLang engine; without SGLang the keys
are reported as not checked.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import types
import typing
from functools import lru_cache
from typing import Any, Literal, Mapping, Optional, Union

from megappo.config.coerce import coerce
from megappo.config.errors import ConfigError

_ARCH = "the model's config.json (model.hf_path): the architecture is read from it"
_LAYOUT_UNSUPPORTED = "not supported: megappo's layout is TP x PP x DP (parallel.*); context and expert parallelism are not implemented"

# TransformerConfig fields megappo sets -> the key (or the reason) that controls them.
OWNED_TRANSFORMER: dict[str, str] = {
    "tensor_model_parallel_size": "parallel.tensor_model_parallel_size",
    "pipeline_model_parallel_size": "parallel.pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size": "parallel.virtual_pipeline_model_parallel_size",
    "sequence_parallel": "parallel.sequence_parallel",
    "context_parallel_size": _LAYOUT_UNSUPPORTED,
    "expert_model_parallel_size": _LAYOUT_UNSUPPORTED,
    "expert_tensor_parallel_size": _LAYOUT_UNSUPPORTED,
    "params_dtype": "model.dtype",
    "pipeline_dtype": "model.dtype",
    "bf16": "model.dtype",
    "fp16": "model.dtype",
    "transformer_impl": "model.transformer_impl",
    "fp8": "model.fp8.format",
    "fp8_recipe": "model.fp8.recipe",
    "fp8_param": "model.fp8.param_gather",
    "fp8_amax_history_len": "model.fp8.amax_history_len",
    "fp8_amax_compute_algo": "model.fp8.amax_compute_algo",
    "recompute_granularity": "model.recompute_granularity",
    "recompute_method": "model.recompute_granularity (full recomputation is uniform)",
    "recompute_num_layers": "model.recompute_num_layers",
    **{name: _ARCH for name in (
        "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
        "normalization", "layernorm_epsilon", "gated_linear_unit", "activation_func", "add_bias_linear",
        "add_qkv_bias", "qk_layernorm", "window_size", "init_method_std", "num_moe_experts",
    )},
    "variable_seq_lengths": "set by megappo: micro-batches have variable lengths",
    "overlap_p2p_comm": "set by megappo from parallel.virtual_pipeline_model_parallel_size (Megatron-LM issue #750)",
    "batch_p2p_comm": "set by megappo from parallel.virtual_pipeline_model_parallel_size (Megatron-LM issue #750)",
}

# OptimizerConfig fields megappo sets.
OWNED_OPTIMIZER: dict[str, str] = {
    "optimizer": "megappo trains with Adam (optim.adam_beta1, optim.adam_beta2, optim.adam_eps)",
    "lr": "optim.lr (optim.critic_lr for the critic)",
    "min_lr": "optim.min_lr",
    "weight_decay": "optim.weight_decay",
    "adam_beta1": "optim.adam_beta1",
    "adam_beta2": "optim.adam_beta2",
    "adam_eps": "optim.adam_eps",
    "clip_grad": "optim.clip_grad",
    "bf16": "model.dtype",
    "fp16": "model.dtype",
    "params_dtype": "model.dtype",
    "fp8_recipe": "model.fp8.recipe",
    "use_distributed_optimizer": "parallel.use_distributed_optimizer",
    "overlap_param_gather": "optim.ddp.overlap_param_gather (megappo gives the optimizer the DDP setting)",
}

# DistributedDataParallelConfig fields megappo sets.
OWNED_DDP: dict[str, str] = {
    "use_distributed_optimizer": "parallel.use_distributed_optimizer",
    "fp8_param_gather": "model.fp8.param_gather",
    "average_in_collective": "set by megappo: the loss scaling (models.optimizer.loss_scale_factor) assumes false",
    "use_megatron_fsdp": "not supported: megappo's checkpoints and weight sync expect Megatron DDP",
    "use_custom_fsdp": "not supported: megappo's checkpoints and weight sync expect Megatron DDP",
}


@dataclasses.dataclass(frozen=True)
class PassThrough:
    """One pass-through dict: where it lives in our config and which class it feeds."""

    path: str
    module: str
    cls: str
    owned: Mapping[str, str]
    """Fields megappo sets -> the key (or reason) that controls them: an error when passed."""
    defaults: Mapping[str, Any]
    """Fields megappo chooses differently from Megatron; the dict overrides them."""


# TransformerConfig fields megappo chooses and ``model.megatron`` may override.
TRANSFORMER_DEFAULTS: dict[str, Any] = dict(
    # RL fine-tuning normally trains without dropout (Megatron's default is 0.1).
    attention_dropout=0.0,
    hidden_dropout=0.0,
    # The CPU generator initializes the weights, as parallel.state seeds it (and it works on CPU).
    use_cpu_initialization=True,
    # Fusions off: the local spec on CPU has none, and results must match transformers.
    gradient_accumulation_fusion=False,
    masked_softmax_fusion=False,
    bias_activation_fusion=False,
    bias_dropout_fusion=False,
    persist_layer_norm=False,
    apply_rope_fusion=False,
    attention_softmax_in_fp32=True,
    deallocate_pipeline_outputs=True,
    moe_token_dispatcher_type="alltoall",  # unused by dense models; allgather rejects variable_seq_lengths
)

# DistributedDataParallelConfig fields megappo chooses and ``optim.ddp`` may override.
DDP_DEFAULTS: dict[str, Any] = dict(
    grad_reduce_in_fp32=True,  # accumulate and all-reduce gradients in fp32 (matters in bf16)
    overlap_grad_reduce=False,
)

TRANSFORMER = PassThrough("model.megatron", "megatron.core.transformer.transformer_config", "TransformerConfig",
                          OWNED_TRANSFORMER, TRANSFORMER_DEFAULTS)
OPTIMIZER = PassThrough("optim.megatron", "megatron.core.optimizer.optimizer_config", "OptimizerConfig",
                        OWNED_OPTIMIZER, {})
DDP = PassThrough("optim.ddp", "megatron.core.distributed.distributed_data_parallel_config",
                  "DistributedDataParallelConfig", OWNED_DDP, DDP_DEFAULTS)
MEGATRON_SECTIONS: tuple[PassThrough, ...] = (TRANSFORMER, OPTIMIZER, DDP)

# Keys that were renamed: the old spelling is an error naming the new one.
RENAMED: dict[str, str] = {
    "model.attention_dropout": "model.megatron.attention_dropout",
    "model.hidden_dropout": "model.megatron.hidden_dropout",
}


def renamed_key_error(path: str, source: str = "") -> Optional[ConfigError]:
    """The error for a key that was renamed (None when ``path`` was not)."""
    new = RENAMED.get(path)
    if new is None:
        return None
    return ConfigError(
        f"'{path}' was renamed to '{new}' (a Megatron field passed through as it is spelled upstream){source}"
    )


@lru_cache(maxsize=None)
def _upstream_fields(module: str, cls: str) -> dict[str, Any]:
    """Field name -> annotation of an upstream dataclass (imports its module once)."""
    target = getattr(importlib.import_module(module), cls)
    fields = dataclasses.fields(target)
    hints: dict[str, Any] = {}
    if any(isinstance(f.type, str) for f in fields):  # string annotations: resolve them if they resolve
        try:
            hints = typing.get_type_hints(target)
        except Exception:  # an unresolvable name: those fields stay strings, and go unchecked
            hints = {}
    return {f.name: hints.get(f.name, f.type) for f in fields}


_PLAIN = (bool, int, float, str)


def _is_plain(tp: Any) -> bool:
    """An annotation our strict `coerce` can check: bool/int/float/str, a Literal of those,
    Optional of one, or a list of one. Anything else (dtypes, callables, enums) is not checked."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in _PLAIN:
        return True
    if origin is Literal:
        return all(isinstance(a, _PLAIN) for a in args)
    if origin in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return len(rest) == 1 and len(args) == 2 and _is_plain(rest[0])
    if origin is list and len(args) == 1:
        return _is_plain(args[0])
    return False


def _did_you_mean(key: str, valid: list[str], here: str) -> str:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    elsewhere = [
        f"{s.path}.{key}" for s in MEGATRON_SECTIONS
        if s.path != here and key not in s.owned and key in _fields_or_empty(s)
    ]
    hints = [f"'{c}'" for c in close] + [f"'{p}'" for p in elsewhere]
    return f"; did you mean {' or '.join(hints)}?" if hints else ""


def _fields_or_empty(section: PassThrough) -> dict[str, Any]:
    try:
        return _upstream_fields(section.module, section.cls)
    except ImportError:
        return {}


def check_owned(path: str, values: Mapping[str, Any], owned: Mapping[str, str]) -> None:
    """A `ConfigError` for the first key of ``values`` that megappo sets itself."""
    for key in values:
        if key in owned:
            raise ConfigError(f"{path}.{key} is set by megappo, not passed through: use {owned[key]}")


def check_megatron_section(section: PassThrough, values: Mapping[str, Any]) -> dict[str, Any]:
    """Check one Megatron pass-through dict; returns it with plain values converted (``1`` ->
    ``1.0`` for a float field). Raises `ConfigError`; `ImportError` when Megatron is missing."""
    check_owned(section.path, values, section.owned)
    fields = _upstream_fields(section.module, section.cls)
    out = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(
                f"unknown key '{key}' in {section.path}: {section.cls} (megatron-core) has no such field"
                f"{_did_you_mean(key, list(fields), section.path)}"
            )
        tp = fields[key]
        out[key] = coerce(value, tp, f"{section.path}.{key}") if _is_plain(tp) else value
    return out


def check_megatron_passthrough(cfg: Any) -> list[str]:
    """Check ``model.megatron``, ``optim.megatron`` and ``optim.ddp`` of ``cfg``; returns the
    warnings (Megatron not importable: not checked)."""
    warnings = []
    for section in MEGATRON_SECTIONS:
        head, tail = section.path.split(".")
        values = getattr(getattr(cfg, head), tail)
        if not values:
            continue
        try:
            check_megatron_section(section, values)
        except ImportError as error:
            check_owned(section.path, values, section.owned)
            warnings.append(f"{section.path} was not checked against {section.cls}: megatron-core is not importable ({error})")
    return warnings


# ---------------------------------------------------------------------- SGLang ServerArgs

def upstream_field_names(cls: Any) -> Optional[frozenset[str]]:
    """The field names of a config class: a dataclass (SGLang up to 0.5.20) or a msgspec
    Struct (0.5.21 assembles ``ServerArgs`` from namespaces with ``msgspec.defstruct``)."""
    if dataclasses.is_dataclass(cls):
        names = [f.name for f in dataclasses.fields(cls)]
    else:
        names = getattr(cls, "__struct_fields__", None)
        if names is None:
            return None
    return frozenset(n for n in names if not n.startswith("_"))  # private bookkeeping is no option


# Run by ``server_args_fields`` in a child process: SGLang's ServerArgs field names, or the import error.
_FIELDS_SCRIPT = """
import json
from megappo.config.passthrough import upstream_field_names
try:
    import sglang.srt.server_args as module
except Exception as error:
    print("MEGAPPO_FIELDS " + json.dumps({"error": f"{type(error).__name__}: {error}"}))
else:
    names = upstream_field_names(getattr(module, "ServerArgs", None))
    print("MEGAPPO_FIELDS " + json.dumps({"names": None if names is None else sorted(names), "file": module.__file__}))
"""


def server_args_fields() -> tuple[Optional[frozenset[str]], str]:
    """(SGLang's ``ServerArgs`` field names or None, where they come from or why not).

    SGLang is imported in a child process (this Python, this ``sys.path``), never here: the
    trainer's first import of SGLang must be the engine's, which on CPU sets SGLang's switch
    before it (``megappo.parallel.sglang_cpu``; SGLang reads it at import), and the import
    costs seconds and pulls torch, which only a config that sets ``rollout.sglang`` for an
    SGLang engine pays."""
    try:
        found = importlib.util.find_spec("sglang") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return None, "SGLang is not installed here"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    try:
        proc = subprocess.run([sys.executable, "-c", _FIELDS_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return None, "importing sglang.srt.server_args in a child process took over 300 s"
    answer = next((line[len("MEGAPPO_FIELDS "):] for line in proc.stdout.splitlines() if line.startswith("MEGAPPO_FIELDS ")), None)
    if answer is None:
        return None, f"importing sglang.srt.server_args in a child process failed (exit status {proc.returncode}: {proc.stderr.strip()[-300:]})"
    result = json.loads(answer)
    if "error" in result:
        return None, f"importing sglang.srt.server_args failed ({result['error']})"
    if result["names"] is None:
        return None, "sglang.srt.server_args.ServerArgs is neither a dataclass nor a msgspec Struct"
    return frozenset(result["names"]), f"sglang.srt.server_args from {result['file']}"


def check_sglang_args(values: Mapping[str, Any], fields: Optional[frozenset[str]] = None, where: str = "") -> list[str]:
    """Check ``rollout.sglang``'s keys against SGLang's ``ServerArgs``: an unknown key is a
    `ConfigError` with a did-you-mean; returns a warning when SGLang is not there to check."""
    if not values:
        return []
    if fields is None:
        fields, where = server_args_fields()
    if fields is None:
        return [f"rollout.sglang keys {sorted(values)} were not checked against SGLang's ServerArgs: {where}"]
    for key in values:
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"unknown key '{key}' in rollout.sglang: SGLang's ServerArgs ({where}) has no such field{hint}")
    return []
