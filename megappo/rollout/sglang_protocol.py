"""What both SGLang engines say to SGLang, kept in one place (no SGLang import here).

Supported: sglang >= 0.5.18, <= 0.5.23 (0.5.18-0.5.21 pin torch 2.13.0, 0.5.22-0.5.23
torch 2.14.1). Read against SGLang's own ``entrypoints/engine.py``,
``entrypoints/http_server.py``, ``managers/io_struct.py`` and ``server_args.py`` of 0.5.18,
0.5.21 and 0.5.23; the real-engine tests run 0.5.23, the contract tests 0.5.18 and 0.5.23.
Differences handled:
  - 0.5.21 and later only load weights between ``begin_weight_update`` and ``end_weight_update``
    (a session); 0.5.18 has neither (``Engine`` lacks the methods, the server answers 404).
  - ``ServerArgs`` is a dataclass in 0.5.18 and a ``msgspec.Struct`` in 0.5.21.

Requests (the same dict is ``Engine.generate``'s keyword arguments and ``/generate``'s JSON
body, fields of ``io_struct.GenerateReqInput``): token ids in, ``return_logprob`` on.
Answers: one dict per sample, prompt-major (prompt 0's n samples, then prompt 1's ...),
``meta_info.output_token_logprobs`` a list of ``(logprob, token_id, text)`` of every
sampled token, stop token included, and ``meta_info.finish_reason.type`` ``stop``,
``length`` or ``abort``. SGLang's log-probs are ``log(softmax(logits / T))`` over the full
vocabulary (unless the server runs with ``SGLANG_RETURN_ORIGINAL_LOGPROB``, which we refuse
for the colocated engine) and, greedy, those of T = 1: the contract of
``megappo.rollout.engine``. Seeds: SGLang's per-request ``sampling_seed`` would give the
``n`` samples of a prompt the same draws and is unsupported by its FlashInfer top-p/top-k
kernels, so it is not sent; SGLang sampling is not reproducible per call.

Routed experts (rollout routing replay; SGLang >= 0.5.18, server argument
``enable_return_routed_experts``): ``return_routed_experts`` in the request; the answer's
``meta_info["routed_experts"]`` is base64 of int32 [prompt + output - 1, num_hidden_layers,
num_experts_per_tok] in C order (``state_capturer/routed_experts.py``: the host buffer rows of
positions ``[routed_experts_start_len, seqlen - 1)``, encoded by the detokenizer's
``_b64_encode_per_request``, or the tokenizer manager when ``skip_tokenizer_init``; SGLang's
``extract_routed_experts_from_meta_info`` decodes it flat). Every layer has a slot, dense
ones included; ``decode_routed_experts`` keeps the routed layers'. A server without the
argument answers without the key. On CPU SGLang cannot return them: the capturer's host
buffer is pinned with ``cudaHostRegister`` (0.5.23: the engine dies at start with "Torch
not compiled with CUDA enabled").

Weights read back (the engines' ``weights_checksum``, a spot-check): ``get_weights_by_name``
(``Engine.get_weights_by_name(name, truncate_size)``, ``POST /get_weights_by_name`` with
``{"name", "truncate_size"}``) answers ``param.cpu().float().tolist()[:truncate_size]``:
the first rows of the named HF tensor (elements of a 1-D one) in float32, from the
engine's own fused parameter (q/k/v, gate/up sliced out; TP shards of o_proj / down_proj
gathered, others from TP rank 0, whose first rows are the tensor's), one list per
data-parallel rank when SGLang runs with dp_size > 1, ``None`` (HTTP 400) on failure.
0.5.18-0.5.23 implement it for Llama-family (Llama, Mistral), Granite, EXAONE-4 and OPT models
only (not Qwen2/Qwen3), and
converts the whole tensor to a list before truncating, so ``choose_spots`` picks small
tensors.
"""

from __future__ import annotations

import base64
import dataclasses
import difflib
import math
from typing import Any, Iterable, Sequence

import torch

from megappo.models.spec import ModelSpec
from megappo.rollout.engine import SPOT_ROWS, RolloutEngineError, Sample, SamplingParams, combine_checksums, spot_checksum

SUPPORTED_VERSIONS = (">=0.5.18", "<=0.5.23")
INSTALL_HINT = "pip install megappo[sglang]  (sglang>=0.5.18,<=0.5.23; on CPU, for tests only: make sglang-env)"
GROUP_NAME = "megappo_weight_sync"


def import_sglang():
    """``import sglang`` or an error saying how to install it; warns outside the tested range."""
    try:
        import sglang
    except Exception as e:  # ImportError, or a CUDA library missing on a CPU machine
        raise ImportError(
            f"rollout.engine needs SGLang, which does not import here ({type(e).__name__}: {e}). "
            f"Install it with: {INSTALL_HINT}"
        ) from e
    version = getattr(sglang, "__version__", "0")
    if not version_supported(version):
        import logging

        logging.getLogger("megappo").warning(
            "sglang %s is outside the tested range %s", version, ",".join(SUPPORTED_VERSIONS)
        )
    return sglang


def version_supported(version: str) -> bool:
    from packaging.version import Version

    v = Version(version)
    return Version("0.5.18") <= v <= Version("0.5.23")


def server_arg_names(server_args_cls: type) -> set[str]:
    """Public field names of SGLang's ``ServerArgs`` (a dataclass or a ``msgspec.Struct``)."""
    if dataclasses.is_dataclass(server_args_cls):
        names = [f.name for f in dataclasses.fields(server_args_cls)]
    else:
        names = list(getattr(server_args_cls, "__struct_fields__", ()))
    if not names:
        raise TypeError(f"cannot read the fields of {server_args_cls!r}")
    return {n for n in names if not n.startswith("_")}


def check_server_args(args: dict[str, Any], server_args_cls: type) -> None:
    """Every key of ``args`` is a ``ServerArgs`` field; else ``ValueError`` naming the key
    and its close matches."""
    names = server_arg_names(server_args_cls)
    problems = []
    for key in args:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=3)
            problems.append(f"rollout.sglang.{key} is not an SGLang ServerArgs field" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    if problems:
        raise ValueError("; ".join(problems))


def sampling_params_dict(params: SamplingParams, eos_token_ids: Sequence[int]) -> dict[str, Any]:
    """``io_struct`` sampling parameters; EOS ids are listed as stop ids explicitly."""
    return {
        "n": params.n,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "max_new_tokens": params.max_new_tokens,
        "stop_token_ids": sorted(set(eos_token_ids) | set(params.stop_token_ids)),
        "skip_special_tokens": False,
    }


@dataclasses.dataclass(frozen=True)
class RoutingLayout:
    """What decoding SGLang's routed experts needs of the model."""

    num_layers: int
    """``num_hidden_layers``: SGLang's slots per token."""
    moe_layers: tuple[int, ...]
    """The routed layers (HF indices), whose slots ``Sample.routed_experts`` keeps, in order."""
    topk: int


def routing_layout(hf_config: dict) -> "RoutingLayout | None":
    """The layout of a mixture-of-experts model's config; None for a dense one."""
    if not any(hf_config.get(k) for k in ("num_experts", "num_local_experts")):
        return None
    spec = ModelSpec.from_hf_config(dict(hf_config))
    return RoutingLayout(spec.num_layers, tuple(spec.moe_layers), spec.moe_topk) if spec.is_moe else None


def decode_routed_experts(encoded: str, layout: RoutingLayout, rows: int, engine_name: str) -> torch.Tensor:
    """``meta_info["routed_experts"]`` -> int32 [rows, routed layers, top-k] (module doc)."""
    raw = base64.b64decode(encoded)
    width = layout.num_layers * layout.topk
    if len(raw) != 4 * rows * width:
        raise RolloutEngineError(f"{engine_name}: routed experts hold {len(raw) // 4} ids, expected {rows} positions x "
                                 f"{layout.num_layers} layers x top-{layout.topk} = {rows * width}")
    per_layer = torch.frombuffer(bytearray(raw), dtype=torch.int32).view(rows, layout.num_layers, layout.topk)
    return per_layer[:, list(layout.moe_layers)].contiguous()


def generate_request(prompts: Sequence[Sequence[int]], params: SamplingParams, eos_token_ids: Sequence[int], *,
                     routed_experts: bool = False) -> dict[str, Any]:
    """Keyword arguments of ``Engine.generate`` = JSON body of ``POST /generate``
    (``routed_experts``: ask for each token's experts, ``return_routed_experts``)."""
    body = {
        "input_ids": [list(map(int, p)) for p in prompts],
        "sampling_params": sampling_params_dict(params, eos_token_ids),
        "return_logprob": True,
    }
    if routed_experts:
        body["return_routed_experts"] = True
    return body


def parse_samples(outputs: Any, num_prompts: int, n: int, engine_name: str, *, aborted: bool = False,
                  prompts: "Sequence[Sequence[int]] | None" = None, routing: "RoutingLayout | None" = None) -> list[list[Sample]]:
    """SGLang's answer to ``generate_request`` -> ``n`` samples per prompt. ``aborted``: the
    engine asked for an abort during the call, so finish reason ``abort`` is a sample with
    its tokens so far; otherwise it is SGLang giving up on the request (out of memory, a
    rejected input) and raises. ``routing`` (with ``prompts``): decode the routed experts
    an answer carries into ``Sample.routed_experts``."""
    if isinstance(outputs, dict):
        outputs = [outputs]
    if not isinstance(outputs, list) or len(outputs) != num_prompts * n:
        got = len(outputs) if isinstance(outputs, list) else type(outputs).__name__
        raise RolloutEngineError(f"{engine_name}: expected {num_prompts * n} outputs, got {got}")
    samples = [_sample(o, engine_name, aborted) for o in outputs]
    if routing is not None and prompts is not None:
        for k, (o, s) in enumerate(zip(outputs, samples)):
            encoded = o.get("meta_info", {}).get("routed_experts")
            if encoded is not None and s.token_ids:
                rows = len(prompts[k // n]) + len(s.token_ids) - 1
                samples[k] = dataclasses.replace(s, routed_experts=decode_routed_experts(encoded, routing, rows, engine_name))
    return [samples[i * n : (i + 1) * n] for i in range(num_prompts)]


def _sample(output: dict, engine_name: str, aborted: bool) -> Sample:
    meta = output.get("meta_info", {})
    reason = meta.get("finish_reason")
    kind = reason.get("type") if isinstance(reason, dict) else reason
    if kind not in ("stop", "length") and not (kind == "abort" and aborted):
        detail = reason.get("message") if isinstance(reason, dict) else None
        raise RolloutEngineError(f"{engine_name}: request ended with finish reason {kind!r}" + (f": {detail}" if detail else ""))
    triples = meta.get("output_token_logprobs")
    if triples is None:
        raise RolloutEngineError(f"{engine_name}: the answer has no meta_info.output_token_logprobs")
    logprobs = [float(t[0]) for t in triples]
    token_ids = [int(t[1]) for t in triples]
    return Sample(token_ids, logprobs, kind)


def check_result(result: Any, what: str, engine_name: str) -> None:
    """Raise when an SGLang control call answered ``(False, message)`` or ``success=False``."""
    if isinstance(result, (tuple, list)) and len(result) >= 1 and isinstance(result[0], bool):
        ok, message = result[0], (result[1] if len(result) > 1 else "")
    elif hasattr(result, "success"):
        ok, message = bool(result.success), getattr(result, "message", "")
    elif isinstance(result, dict) and "success" in result:
        ok, message = bool(result["success"]), result.get("message", "")
    else:
        return
    if not ok:
        raise RolloutEngineError(f"{engine_name}: {what} failed: {message}")


# ---- weights ------------------------------------------------------------------------------


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (SGLang does ``getattr(torch, name)``)."""
    return str(dtype).removeprefix("torch.")


def flatten_bucket(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """The bytes of the tensors end to end (uint8), the layout of SGLang's
    ``FlattenedTensorBucket`` that its distributed receive (``load_format=flattened_bucket``)
    broadcasts into."""
    parts = [t.detach().contiguous().reshape(-1).view(torch.uint8) for _, t in named_tensors]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)


def update_distributed_request(bucket: Sequence[tuple[str, torch.Tensor]], *, flush_cache: bool, group_name: str = GROUP_NAME) -> dict[str, Any]:
    """JSON body of ``POST /update_weights_from_distributed`` for one flattened bucket."""
    return {
        "names": [name for name, _ in bucket],
        "dtypes": [dtype_name(t.dtype) for _, t in bucket],
        "shapes": [list(t.shape) for _, t in bucket],
        "group_name": group_name,
        "flush_cache": flush_cache,
        "load_format": "flattened_bucket",
    }


def init_group_request(
    master_address: str, master_port: int, rank_offset: int, world_size: int, backend: str, group_name: str = GROUP_NAME
) -> dict[str, Any]:
    """JSON body of ``POST /init_weights_update_group``."""
    return {
        "master_address": master_address,
        "master_port": master_port,
        "rank_offset": rank_offset,
        "world_size": world_size,
        "group_name": group_name,
        "backend": backend,
    }


# ---- weights read back (spot-check) -------------------------------------------------------

SPOT_COUNT = 4
SPOT_MAX_ELEMENTS = 1 << 22
"""Spot-checked tensors: at most ``SPOT_COUNT`` of at most ``SPOT_MAX_ELEMENTS`` elements
(``get_weights_by_name`` turns the whole tensor into Python floats first)."""


def choose_spots(shapes: dict[str, tuple[int, ...]]) -> tuple[str, ...]:
    """The HF names to spot-check among the synced tensors ``{name: shape}``: up to
    ``SPOT_COUNT``, evenly spread over the sorted names of the small ones (the smallest
    tensor when none is small), so different layers and kinds of weight are read."""
    small = sorted(n for n, shape in shapes.items() if math.prod(shape) <= SPOT_MAX_ELEMENTS)
    if not small:
        small = [min(sorted(shapes), key=lambda n: math.prod(shapes[n]))] if shapes else []
    k = min(SPOT_COUNT, len(small))
    picks = [small[round(i * (len(small) - 1) / (k - 1))] if k > 1 else small[0] for i in range(k)]
    return tuple(dict.fromkeys(picks))


def weights_by_name_request(name: str) -> dict[str, Any]:
    """Keyword arguments of ``Engine.get_weights_by_name`` = JSON body of its HTTP route."""
    return {"name": name, "truncate_size": SPOT_ROWS}


def spot_tensor(answer: Any, name: str, shape: tuple[int, ...], engine_name: str) -> torch.Tensor:
    """``get_weights_by_name``'s answer for ``name`` (shape ``shape`` as synced) as the
    float32 tensor of its first ``SPOT_ROWS`` rows; the first data-parallel rank's when
    the answer is one list per rank."""
    if answer is None:
        raise RolloutEngineError(
            f"{engine_name}: get_weights_by_name({name!r}) returned nothing: SGLang (0.5.18-0.5.23) reads weights back only for "
            "Llama-family (Llama, Mistral), Granite, EXAONE-4 and OPT models, so this model's weights cannot be spot-checked"
        )
    t = torch.tensor(answer, dtype=torch.float32)
    if t.dim() == len(shape) + 1:  # one answer per SGLang data-parallel rank
        t = t[0]
    expected = (min(SPOT_ROWS, shape[0]),) + tuple(shape[1:]) if shape else ()
    if tuple(t.shape) != expected:
        raise RolloutEngineError(f"{engine_name}: get_weights_by_name({name!r}) answered shape {tuple(t.shape)}, expected {expected}")
    return t


def spot_check(read, spots: dict[str, tuple[int, ...]], engine_name: str) -> float:
    """The spot-check checksum: ``read(name)`` is ``get_weights_by_name``'s answer."""
    return combine_checksums({name: spot_checksum(name, spot_tensor(read(name), name, shape, engine_name)) for name, shape in spots.items()})
