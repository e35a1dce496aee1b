"""Mixture-of-experts checks of ``rollout.engine: sglang`` against the REAL ``sglang.Engine`` on
CPU (the CPU SGLang environment, .venv-sglang), run by tests/test_rollout_sglang_moe_real.py.

  python sglang_real_moe.py --out RESULT.json --work DIR

- A tiny Qwen3-MoE (2 layers, 4 experts, top-2) starts with dummy weights and
  gets every weight from megappo's weight sync, under the per-expert checkpoint names it
  streams (``mlp.experts.N.{gate,up,down}_proj``, ``mlp.gate``), through SGLang's own
  ``load_weights`` (``update_weights_from_tensor``); its sampled log-probs then equal
  transformers' on the same weights, so every expert arrived where SGLang routes to it. On
  a CPU without AMX SGLang runs the experts with its pure-torch ``moe_forward_native``.
- ``enable_return_routed_experts`` on CPU: the engine fails to start (its routed-experts host
  buffer is registered with CUDA), named in the error.
Results: ``{check: {"ok": bool, "error": str, ...figures}}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from sglang_real_engine import EOS, PROMPTS, RESULTS, check, load_hf, max_diff, start  # noqa: E402


def moe_checks(work: Path) -> None:
    from hf_fixtures import make_tiny_hf_model, read_hf_state

    from megappo.rollout.engine import SamplingParams
    from megappo.rollout.sglang_protocol import routing_layout
    from megappo.rollout.weight_sync import stream_to_engine

    path = make_tiny_hf_model(work, "qwen3_moe", layers=2, vocab=101)
    state = read_hf_state(path)
    model = load_hf(path)
    layout = routing_layout(json.loads((path / "config.json").read_text()))
    t0 = time.perf_counter()
    engine = start(path, timeout_s=120, routing=layout)
    RESULTS["moe_start"] = {"ok": True, "seconds": round(time.perf_counter() - t0, 1)}
    try:

        @check("moe_sync_per_expert_names_then_logprobs")
        def _():
            names = sorted(state)
            assert "model.layers.0.mlp.experts.3.up_proj.weight" in names and "model.layers.1.mlp.gate.weight" in names
            stats = stream_to_engine(sorted(state.items()), engine, bucket_mb=0.05)
            out = engine.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=8, temperature=0.9))
            d = max_diff(model, out, PROMPTS, 0.9)
            assert d <= 1e-4, d
            assert all(s.routed_experts is None for g in out for s in g)  # not asked: no enable_return_routed_experts
            return {"max_abs_diff": d, "tensors": len(names), "buckets": stats.num_buckets}
    finally:
        engine.shutdown()

    @check("moe_dense_layers_not_read")
    def _():
        # SGLang's Qwen3-MoE builds every layer as MoE: mlp_only_layers / decoder_sparse_step are
        # not read (a 3-layer model with layer 1 dense, loaded from disk, was off by 0.145 in
        # log-prob against transformers); megappo's dense-layer names have nowhere to go there.
        import sglang

        text = (Path(sglang.__file__).parent / "srt/models/qwen3_moe.py").read_text()
        assert "mlp_only_layers" not in text and "decoder_sparse_step" not in text

    @check("moe_return_routed_experts_cannot_start_on_cpu")
    def _():
        # In a process of its own: the failing scheduler SIGQUITs the process tree that started it.
        import subprocess

        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--try-routed-experts", str(path)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=300)
        if "STARTED" in proc.stdout:
            raise AssertionError("SGLang now returns routed experts on CPU: test the decoding against the real engine")
        assert "Torch not compiled with CUDA enabled" in proc.stdout and "_cuda_host_register" in proc.stdout, proc.stdout[-3000:]
        return {"exit": proc.returncode, "seconds": round(time.perf_counter() - t0, 1)}


def try_routed_experts(path: str) -> None:
    from megappo.rollout.sglang_protocol import routing_layout

    layout = routing_layout(json.loads((Path(path) / "config.json").read_text()))
    engine = start(path, timeout_s=120, routing=layout, extra={"enable_return_routed_experts": True})
    print("STARTED", flush=True)
    engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--work")
    parser.add_argument("--try-routed-experts", metavar="MODEL_DIR")
    args = parser.parse_args()
    from megappo.parallel import sglang_cpu

    sglang_cpu.apply()
    if args.try_routed_experts:
        try_routed_experts(args.try_routed_experts)
        os._exit(0)
    import sglang

    RESULTS["version"] = {"ok": True, "sglang": sglang.__version__}
    try:
        moe_checks(Path(args.work))
    except Exception:  # noqa: BLE001 - reported to pytest
        RESULTS["fatal"] = {"ok": False, "error": traceback.format_exc(limit=8)}
    Path(args.out).write_text(json.dumps(RESULTS, indent=1, default=str))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
