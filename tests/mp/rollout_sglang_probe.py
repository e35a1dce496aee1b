"""Contract checks of megappo's SGLang adapters against the installed SGLang's own code,
run in a separate process by tests/test_rollout_sglang_contract.py (SGLang patches
``transformers`` when imported, which must not leak into the test session).

On a CPU machine SGLang's ``io_struct`` imports ``torchvision`` through its multimodal
configs and the PyPI torchvision is CUDA-linked (it does not import on CPU torch). This
process therefore reads transformers' torchvision availability first (so transformers keeps
"not available") and then, only if ``import torchvision`` fails, serves an inert stand-in
for it. Nothing else is faked: requests are built with SGLang's classes, tensors go through
SGLang's serializer and bucket, the group is joined with SGLang's function.

  python rollout_sglang_probe.py --out RESULT.json [--group-port P]
With ``--group-port`` the process also joins the weight-update group as rank 1 with
``sglang.srt.utils.common.init_custom_process_group`` (gloo) and receives one flattened
bucket the way SGLang's ``_receive_bucketed_weights_from_distributed`` does; the test
process is rank 0 (``megappo.rollout.sglang_server.join_update_group``).
"""

from __future__ import annotations

import argparse
import ast
import importlib.abc
import importlib.machinery
import json
import sys
import traceback
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

RESULTS: dict[str, dict] = {}


def check(name):
    def wrap(fn):
        try:
            RESULTS[name] = {"ok": True, **(fn() or {})}
        except Exception:  # noqa: BLE001 - reported to pytest
            RESULTS[name] = {"ok": False, "error": traceback.format_exc(limit=6)}
        return fn

    return wrap


def inert_torchvision_if_broken() -> str:
    import transformers.utils.import_utils  # noqa: F401 - fixes transformers' view of torchvision first

    try:
        import torchvision  # noqa: F401

        return "real"
    except Exception:  # noqa: BLE001
        for key in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[key]

    class Meta(type):
        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return Inert

    class Inert(metaclass=Meta):
        def __init__(self, *args, **kwargs):
            pass

    class Module(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return Inert

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            if name == "torchvision" or name.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec):
            return Module(spec.name)

        def exec_module(self, module):
            module.__path__ = []

    sys.meta_path.insert(0, Finder())
    return "inert stand-in"


def probe_tensors():
    """The bucket both sides of the checks use (float32 and bfloat16 mixed)."""
    import torch

    g = torch.Generator().manual_seed(0)
    return [
        ("model.embed_tokens.weight", torch.randn(11, 8, generator=g)),
        ("model.layers.0.mlp.up_proj.weight", torch.randn(8, 8, generator=g).to(torch.bfloat16)),
        ("model.norm.weight", torch.randn(8, generator=g)),
    ]


def method_params(source: Path, cls: str) -> dict[str, list[str]]:
    """Methods of class ``cls`` in ``source`` and their parameter names (read, not imported)."""
    tree = ast.parse(source.read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            out = {}
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    a = item.args
                    out[item.name] = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
            return out
    raise AssertionError(f"class {cls} not found in {source}")


def sglang_encoder(path: Path):
    """The detokenizer's ``_b64_encode_per_request``, SGLang's own code: imported, or (where the
    detokenizer's other imports are missing, as in the 0.5.18 folder) compiled from its source."""
    try:
        from sglang.srt.managers.detokenizer_manager import DetokenizerManager

        return DetokenizerManager._b64_encode_per_request
    except ImportError:
        import typing

        import pybase64

        tree = ast.parse(path.read_text())
        fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_b64_encode_per_request")
        fn.decorator_list = []
        space = {"pybase64": pybase64, "torch": __import__("torch"), **{k: getattr(typing, k) for k in ("Optional", "List")}}
        exec(compile(ast.Module([fn], type_ignores=[]), str(path), "exec"), space)
        return space["_b64_encode_per_request"]


def pybase64_of(t) -> str:
    """What SGLang's tokenizer manager writes into ``meta_info["routed_experts"]`` itself."""
    import pybase64

    return pybase64.b64encode(t.numpy().tobytes()).decode("utf-8")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--group-port", type=int)
    args = ap.parse_args()
    RESULTS["torchvision"] = {"ok": True, "mode": inert_torchvision_if_broken()}

    import torch

    torch.multiprocessing.set_sharing_strategy("file_system")
    import sglang

    from megappo.rollout.engine import SamplingParams, checksum_of
    from megappo.rollout.sglang_engine import engine_server_args, flattened_bucket_payload
    from megappo.rollout.sglang_protocol import (
        check_server_args,
        flatten_bucket,
        generate_request,
        init_group_request,
        update_distributed_request,
        version_supported,
        weights_by_name_request,
    )

    root = Path(sglang.__file__).parent / "srt"
    RESULTS["version"] = {"ok": version_supported(sglang.__version__), "version": sglang.__version__}
    named = probe_tensors()

    @check("server_args")
    def _():
        from sglang.srt.server_args import ServerArgs

        ours = engine_server_args("/m", {"mem_fraction_static": 0.5, "context_length": 4096}, tp_size=2, gpu_id=0, seed=1)
        check_server_args(ours, ServerArgs)
        try:
            check_server_args({"mem_fraction_statc": 0.5}, ServerArgs)
        except ValueError as e:
            assert "did you mean mem_fraction_static" in str(e), e
        else:
            raise AssertionError("a misspelled key passed")
        return {"kind": type(ServerArgs).__name__}

    @check("generate_request")
    def _():
        from sglang.srt.managers.io_struct import GenerateReqInput
        from sglang.srt.sampling.sampling_params import SamplingParams as SGLSamplingParams

        params = SamplingParams(n=3, temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=16, stop_token_ids=(5,))
        body = generate_request([[1, 2, 3], [4, 5]], params, eos_token_ids=[2])
        req = GenerateReqInput(**body)
        req.normalize_batch_and_arguments()
        assert req.batch_size == 2 and req.parallel_sample_num == 3, (req.batch_size, req.parallel_sample_num)
        flags = req.return_logprob if isinstance(req.return_logprob, list) else [req.return_logprob]
        assert all(f is True for f in flags), req.return_logprob
        sp = SGLSamplingParams(**body["sampling_params"])
        sp.verify(vocab_size=100)
        assert sp.stop_token_ids == {2, 5} and sp.n == 3 and sp.max_new_tokens == 16, sp
        greedy = SGLSamplingParams(**generate_request([[1]], SamplingParams(temperature=0), [2])["sampling_params"])
        greedy.verify(vocab_size=100)

    @check("control_requests")
    def _():
        from sglang.srt.managers import io_struct

        bodies = {
            "InitWeightsUpdateGroupReqInput": init_group_request("10.0.0.1", 1234, 1, 3, "nccl"),
            "UpdateWeightsFromDistributedReqInput": update_distributed_request(named, flush_cache=False),
            "DestroyWeightsUpdateGroupReqInput": {"group_name": "megappo_weight_sync"},
            "BeginWeightUpdateReqInput": {},
            "EndWeightUpdateReqInput": {},
            "GetWeightsByNameReqInput": weights_by_name_request("model.norm.weight"),
        }
        found = {}
        for cls_name, body in bodies.items():
            cls = getattr(io_struct, cls_name, None)
            if cls is None:
                found[cls_name] = "absent"
                continue
            fields = set(getattr(cls, "__struct_fields__", ()))
            assert set(body) <= fields, (cls_name, set(body) - fields)
            obj = cls(**body)
            for k, v in body.items():
                assert getattr(obj, k) == v, (cls_name, k)
            found[cls_name] = "ok"
        dist = io_struct.UpdateWeightsFromDistributedReqInput(**bodies["UpdateWeightsFromDistributedReqInput"])
        assert [getattr(torch, d) for d in dist.dtypes] == [t.dtype for _, t in named]
        return {"classes": found}

    @check("flattened_bucket_roundtrip")
    def _():
        from sglang.srt.managers.io_struct import UpdateWeightsFromTensorReqInput
        from sglang.srt.utils import MultiprocessingSerializer
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket, FlattenedTensorMetadata

        assert callable(monkey_patch_torch_reductions)  # applied by the adapter for CUDA tensors only
        payloads = flattened_bucket_payload(named)
        serialized = [MultiprocessingSerializer.serialize(p, output_str=True) for p in payloads]
        req = UpdateWeightsFromTensorReqInput(serialized_named_tensors=serialized * 2, load_format="flattened_bucket", flush_cache=False)
        got = []
        for data in req.serialized_named_tensors[: len(payloads)]:
            d = MultiprocessingSerializer.deserialize(data)  # what each SGLang TP rank does
            meta = [FlattenedTensorMetadata(name=m.name, shape=m.shape, dtype=m.dtype, start_idx=m.start_idx, end_idx=m.end_idx, numel=m.numel) for m in d["metadata"]]
            got += FlattenedTensorBucket(flattened_tensor=d["flattened_tensor"], metadata=meta).reconstruct_tensors()
        assert [n for n, _ in got] == [n for n, _ in named]
        for (_, a), (_, b) in zip(got, named):
            assert a.dtype == b.dtype and torch.equal(a, b)
        ours = flatten_bucket(named)
        theirs = FlattenedTensorBucket(named_tensors=named).get_flattened_tensor()
        assert torch.equal(ours, theirs), "flat layout differs"
        return {"payloads": len(payloads)}

    @check("engine_api")
    def _():
        m = method_params(root / "entrypoints/engine.py", "Engine")
        need = {
            "generate": {"input_ids", "sampling_params", "return_logprob"},
            "update_weights_from_tensor": {"named_tensors", "load_format", "flush_cache"},
            "release_memory_occupation": {"tags"},
            "resume_memory_occupation": {"tags"},
            "flush_cache": set(),
            "shutdown": set(),
            "get_server_info": set(),
            "get_weights_by_name": {"name", "truncate_size"},
        }
        for meth, params in need.items():
            assert meth in m and params <= set(m[meth]), (meth, m.get(meth))
        if "begin_weight_update" in m:
            assert "end_weight_update" in m
        return {"sessions": "begin_weight_update" in m}

    @check("http_routes")
    def _():
        text = (root / "entrypoints/http_server.py").read_text()
        routes = ["/generate", "/health", "/get_server_info", "/flush_cache", "/init_weights_update_group",
                  "/update_weights_from_distributed", "/destroy_weights_update_group", "/get_weights_by_name"]
        missing = [r for r in routes if f'"{r}"' not in text]
        assert not missing, missing
        return {"sessions": '"/begin_weight_update"' in text and '"/end_weight_update"' in text}

    @check("weights_read_back")
    def _():
        # The spot-check reads the first rows of a tensor (sglang_protocol.spot_tensor):
        # Llama's get_weights_by_name answers the whole parameter, as float32 lists, cut to
        # truncate_size rows; the exporter hands the name through to the model.
        llama = (root / "models/llama.py").read_text()
        body = llama[llama.index("def get_weights_by_name"):]
        body = body[: body.index("\n    def ", 10)]
        assert ".to(torch.float32).numpy().tolist()[:truncate_size]" in body, "truncation semantics changed"
        assert "stacked_params_mapping" in body and "all_gather" in body
        runner = [root / "model_executor/model_runner_components/weight_exporter.py", root / "model_executor/model_runner.py"]
        assert any(p.exists() and ".get_weights_by_name(" in p.read_text() for p in runner)

    @check("bucketed_distributed_receive")
    def _():
        text = (root / "model_executor/model_runner_components/weight_updater.py").read_text()
        # 0.5.18-0.5.21 build the receive bucket from named tensors, 0.5.23 with
        # FlattenedTensorBucket.empty(names, dtypes, shapes, device); the bytes-end-to-end layout
        # is checked for real against 0.5.23 servers (tests/test_rollout_sglang_server_real.py).
        assert 'load_format == "flattened_bucket"' in text
        assert "FlattenedTensorBucket(named_tensors=" in text or "FlattenedTensorBucket.empty(names, dtypes, shapes" in text

    @check("logprobs_after_temperature")
    def _():
        text = (root / "layers/sampler.py").read_text()
        assert "SGLANG_RETURN_ORIGINAL_LOGPROB" in text and "logits.div_(sampling_info.temperatures)" in text

    @check("routed_experts")
    def _():
        # Rollout routing replay: the request flag, the server argument, and the answer's
        # encoding, produced by SGLang's own encoder and read back by its own decoder and ours.
        from sglang.srt.managers.io_struct import GenerateReqInput
        from sglang.srt.server_args import ServerArgs
        from sglang.srt.state_capturer.routed_experts import extract_routed_experts_from_meta_info

        from megappo.rollout.sglang_protocol import RoutingLayout, decode_routed_experts, parse_samples, server_arg_names

        assert "enable_return_routed_experts" in server_arg_names(ServerArgs)
        req = GenerateReqInput(**generate_request([[1, 2, 3]], SamplingParams(n=2), [2], routed_experts=True))
        assert req.return_routed_experts is True and "return_routed_experts" not in generate_request([[1]], SamplingParams(), [2])
        assert "return_routed_experts" in method_params(root / "entrypoints/engine.py", "Engine")["generate"]
        # The capturer's layout: int32 [seqlen - 1 - start_len, num_hidden_layers, num_experts_per_tok].
        capturer = (root / "state_capturer/routed_experts.py").read_text()
        base = (root / "state_capturer/base.py").read_text()
        assert "topk_size = model_config.hf_text_config.num_experts_per_tok" in capturer
        assert "num_layers = model_config.hf_text_config.num_hidden_layers" in capturer
        assert "dtype=torch.int32" in base and "[start_len : seqlen - 1]" in base
        prompt, tokens, layout = [1, 5, 6, 7], [9, 10, 11], RoutingLayout(num_layers=3, moe_layers=(0, 2), topk=2)
        rows = len(prompt) + len(tokens) - 1
        held = torch.randint(0, 4, (rows, 3, 2), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
        (encoded,) = sglang_encoder(root / "managers/detokenizer_manager.py")([held])
        assert encoded == pybase64_of(held)  # the tokenizer manager's own encoding (skip_tokenizer_init)
        flat = extract_routed_experts_from_meta_info({"meta_info": {"routed_experts": encoded}})
        assert flat.tolist() == held.flatten().tolist()
        ours = decode_routed_experts(encoded, layout, rows, "probe")
        assert ours.dtype == torch.int32 and torch.equal(ours, held[:, [0, 2]])
        answer = {"meta_info": {"finish_reason": {"type": "length"}, "routed_experts": encoded,
                                "output_token_logprobs": [[-0.5, t, None] for t in tokens]}}
        (sample,), = parse_samples([answer], 1, 1, "probe", prompts=[prompt], routing=layout)
        assert torch.equal(sample.routed_experts, held[:, [0, 2]])
        return {"rows": rows}

    if args.group_port:

        @check("update_group_interop")
        def _():
            import torch.distributed as dist
            from sglang.srt.utils.common import init_custom_process_group
            from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

            pg = init_custom_process_group(
                backend="gloo", init_method=f"tcp://127.0.0.1:{args.group_port}", world_size=2, rank=1, group_name="megappo_weight_sync"
            )
            body = update_distributed_request(named, flush_cache=False)
            empty = [(n, torch.empty(s, dtype=getattr(torch, d))) for n, d, s in zip(body["names"], body["dtypes"], body["shapes"])]
            bucket = FlattenedTensorBucket(named_tensors=empty)
            dist.broadcast(bucket.get_flattened_tensor(), src=0, group=pg)
            received = bucket.reconstruct_tensors()
            dist.destroy_process_group(pg)
            return {"checksum": checksum_of(received)}

    Path(args.out).write_text(json.dumps(RESULTS, indent=1))


if __name__ == "__main__":
    main()
