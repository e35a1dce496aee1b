#!/usr/bin/env python
"""The prepared GPU check (issue 15): one run, one JSON report. ``tools/gpu_check.sh`` (or
``make gpu-check``) installs the carried wheels and runs this; budget: 8 minutes on one
H200 with torch + CUDA, transformers, safetensors, pyyaml, tensorboard and triton (no
SGLang, no Transformer Engine: the local layer spec runs, bf16).

Sections of the report (each ran in its own process; a failed one records ``error`` and
the others still run):
  actor_update  ``tools/bench_train.py``: bf16 actor update of a Llama-3.2-1B-shaped model
                at 4096 tokens per sequence: tokens/s and MFU against the matmul ceiling
                measured in the same run.
  rl_step       two GRPO steps of the demo's tiny model with the embedded engine on the
                device (``megappo.train`` under torchrun, one process, ``train.offload``
                on): the phase times of
                step 1 (``time/*``), and the first-step checks: PPO ratio exactly 1 (old
                log-probs and the update's first forward are the same computation) and KL
                to the reference exactly 0 (the reference starts as the actor).
  probe         one process (``--probe``) with a 1B-class actor (distributed optimizer)
                and its reference: the loss-scaling self-check at bf16; one train step;
                weight sync into an embedded engine on the device (GB/s) against a device
                memcpy of the same bytes; trainer offload around a generation (device memory
                allocated / reserved before, during and after; bit-exact round trip; the
                next train step runs).
``checks`` collects the pass/fail lines; the exit status is 0 only when all pass.

    python tools/gpu_check.py --out gpu_check.json          # on the GPU machine
    python tools/gpu_check.py --cpu-smoke --out smoke.json  # tiny shapes on the CPU (tests)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("actor_update", "rl_step", "probe")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def parse_json_output(text: str) -> dict:
    """The last top-level JSON object printed in ``text`` (tools print one, maybe after logs)."""
    lines = text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("{"):
            try:
                return json.loads("\n".join(lines[i:]))
            except json.JSONDecodeError:
                continue
    raise ValueError("no JSON object in the output")


def run_section(cmd: list[str], *, timeout: float, env: Optional[dict] = None, parse: bool = True) -> dict:
    """Run one section's command; its JSON (``parse``) or ``{}``, with ``seconds``, or
    ``error`` and the output's tail when it fails or times out."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"")[-3000:]
        return {"error": f"timed out after {timeout:.0f} s", "tail": out.decode(errors="replace") if isinstance(out, bytes) else out}
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}", "seconds": seconds, "tail": (proc.stdout + proc.stderr)[-4000:]}
    if not parse:
        return {"seconds": seconds}
    try:
        return {**parse_json_output(proc.stdout), "seconds": seconds}
    except ValueError as e:
        return {"error": str(e), "seconds": seconds, "tail": proc.stdout[-3000:]}


def actor_update(smoke: bool, timeout: float) -> dict:
    cmd = [sys.executable, str(ROOT / "tools" / "bench_train.py")]
    cmd += ["--tiny", "--steps", "1", "--warmup", "1"] if smoke else ["--model", "llama-1b", "--seq-len", "4096", "--dtype", "bfloat16"]
    return run_section(cmd, timeout=timeout)


def rl_step(smoke: bool, workdir: Path, timeout: float) -> dict:
    from megappo.demo import prepare

    paths = prepare(workdir / "toy", seed=7, sft_steps=10 if smoke else 100)
    run_dir = workdir / "rl_step"
    device = "cpu" if smoke else "cuda"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
        "-m", "megappo.train", "--config", str(ROOT / "recipes" / "toy_grpo_cpu.yaml"),
        f"model.hf_path={paths['model']}", f"data.train_path={paths['train']}", f"data.eval_path={paths['eval']}",
        f"train.run_dir={run_dir}", f"parallel.device={device}", f"rollout.device={device}",
        "train.steps=2", "train.mini_batch_size=null", "algo.ppo_epochs=1", "train.eval_every=0",
        "checkpoint.save_every=0", "checkpoint.save_hf_at_end=false", "logging.progress_bar=false",
        "logging.tensorboard=false",
    ] + (["train.rollout_batch_size=8"] if smoke else ["train.offload=true"])  # offload around the rollout on the GPU
    res = run_section(cmd, timeout=timeout, env={"CUDA_VISIBLE_DEVICES": ""} if smoke else None, parse=False)
    if "error" in res:
        return res
    return {**res, **first_step_summary(run_dir / "metrics.jsonl")}


def first_step_summary(metrics_path: Path) -> dict:
    """Phase times of step 1 and its ratio / KL from a run's ``metrics.jsonl``."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    first = next((r for r in rows if r.get("step") == 1), None)
    if first is None:
        raise ValueError(f"{metrics_path} has no step 1")
    return {
        "phases_s": {k: v for k, v in first.items() if k.startswith("time/")},
        "ratio_min": first.get("actor/ratio_min"),
        "ratio_max": first.get("actor/ratio_max"),
        "kl_ref": first.get("actor/kl_ref"),
        "reward_mean": first.get("reward/mean"),
    }


def checks(report: dict) -> dict[str, bool]:
    """The pass/fail lines of the sections in ``report`` (a failed section fails its lines)."""
    out: dict[str, bool] = {}
    if "actor_update" in report:
        a = report["actor_update"]
        out["actor_update_ran"] = "error" not in a and (a.get("tokens_per_s") or 0) > 0 and 0 < (a.get("mfu") or 0) <= 1
    if "rl_step" in report:
        r = report["rl_step"]
        out["rl_step_ran"] = "error" not in r and bool(r.get("phases_s"))
        out["first_step_ratio_is_1"] = r.get("ratio_min") == 1.0 and r.get("ratio_max") == 1.0
        out["first_step_kl_is_0"] = r.get("kl_ref") == 0.0
    if "probe" in report:
        p = report["probe"]
        off = p.get("offload", {})
        out["loss_scaling_self_check"] = "error" not in p and p.get("loss_scaling", {}).get("passed") is True
        out["weight_sync_ran"] = (p.get("weight_sync", {}).get("gbps") or 0) > 0
        out["offload_bit_exact"] = off.get("bit_exact") is True and off.get("next_step_finite") is True
        if report.get("device") == "cuda":
            # What offload freed left the device: allocated drops by >= 90% of it; reserved
            # (after empty_cache) by >= half (a cached segment shared with a live tensor stays).
            mem, freed = p.get("memory", {}), off.get("freed_bytes") or 0
            drop = {k: mem["before"][k] - mem["offloaded"][k] for k in ("allocated", "reserved")} if mem else {}
            out["offload_frees_memory"] = bool(drop) and freed > 0 and drop["allocated"] >= 0.9 * freed \
                and drop["reserved"] >= 0.5 * freed
    return out


def probe(smoke: bool, out_path: str) -> None:
    """The one-process section (see the module doc); writes its JSON to ``out_path``."""
    import torch

    from megappo.models import BuildOptions, MegatronPolicy, ModelSpec, OptimizerSettings, TokenBatch
    from megappo.models.loss_check import check_loss_scaling
    from megappo.models.offload import MemorySnapshot, TrainerOffload, _torch_optimizers
    from megappo.parallel import destroy_parallel, init_parallel
    from megappo.rollout import SamplingParams, sync_weights
    from megappo.rollout.embedded import EmbeddedEngine
    from megappo.toolkit.throughput import PRESETS

    layout = init_parallel(1, 1, seed=0, device="cpu" if smoke else "cuda")
    dev = layout.device
    name, seq = ("tiny", 64) if smoke else ("llama-1b", 1024)
    hf = {**PRESETS[name], "architectures": [ARCHITECTURES[PRESETS[name]["model_type"]]]}
    dtype = torch.float32 if smoke else torch.bfloat16
    spec = ModelSpec.from_hf_config(hf)
    opts = BuildOptions(dtype=dtype)
    actor = MegatronPolicy(spec, "actor", opts, OptimizerSettings(lr=1e-6, use_distributed_optimizer=True),
                           max_tokens_per_microbatch=2 * seq)
    ref = MegatronPolicy(spec, "reference", opts)
    res: dict[str, Any] = {"model": name, "dtype": str(dtype).removeprefix("torch.")}

    rep = check_loss_scaling(actor, raise_on_error=False)
    res["loss_scaling"] = {"microbatch_counts": list(rep.microbatch_counts), "rel_diff_microbatches": rep.rel_diff_microbatches,
                           "rel_diff_autograd": rep.rel_diff_autograd, "tolerance": rep.tolerance,
                           "passed": max(rep.rel_diff_microbatches, rep.rel_diff_autograd or 0.0) <= rep.tolerance}

    g = torch.Generator().manual_seed(0)
    rows = 4
    batch = TokenBatch(torch.randint(0, spec.vocab_size, (rows, seq), generator=g), torch.full((rows,), 16),
                       torch.full((rows,), seq - 16))

    def step() -> float:
        m = actor.train_step(batch, lambda out, r: (-out["logprobs_BT"].sum() / (rows * (seq - 16)), {}), entropy_grad=False)
        return float(m["loss"])

    res["train_loss"] = step()
    engine = EmbeddedEngine(hf, device=dev, dtype=dtype)
    stats = sync_weights(actor.models, engine, layout, bucket_mb=512)
    src = torch.empty(stats.bytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    del src, dst
    res["weight_sync"] = {"bytes": stats.bytes, "seconds": stats.seconds, "gbps": stats.gbps, "num_buckets": stats.num_buckets,
                          "memcpy_gbps": stats.bytes / best / 1e9}

    def fingerprint() -> list[float]:
        ts = [p.data for m in actor.models for p in m.parameters()]
        for opt in _torch_optimizers(actor.optimizer):
            ts += [p.data for grp in opt.param_groups for p in grp["params"]]
            ts += [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor) and v.dim()]
        return [float(t.double().sum()) + float(t.double().abs().max()) for t in ts]

    before_fp = fingerprint()
    offload = TrainerOffload([actor, ref])
    with offload.offloaded() as off:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        prompts = [list(range(1, 17)) for _ in range(8)]
        engine.generate(prompts, SamplingParams(n=2, max_new_tokens=8 if smoke else 128, seed=0))
        during = MemorySnapshot.take(dev)
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
    mem = {k: vars(v) for k, v in off.memory.items()}
    mem["during_rollout"] = {**vars(during), "peak_allocated": peak}
    res["memory"] = mem
    res["offload"] = {"offloaded_bytes": off.offloaded_bytes, "freed_bytes": off.freed_bytes, "num_storages": off.num_storages,
                      "offload_s": off.offload_seconds, "onload_s": off.onload_seconds,
                      "bit_exact": fingerprint() == before_fp}
    loss = step()
    res["offload"]["next_step_finite"] = loss == loss and abs(loss) != float("inf")
    engine.shutdown()
    Path(out_path).write_text(json.dumps(res, indent=1))
    destroy_parallel()


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu_check.json", help="the JSON report")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (checks the script, not the GPU)")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="run only these sections")
    ap.add_argument("--section-timeout", type=float, default=240, help="seconds per section at most")
    ap.add_argument("--budget", type=float, default=460,
                    help="seconds for the whole check: a section gets at most what is left, so the report is always written")
    ap.add_argument("--probe", metavar="OUT", help=argparse.SUPPRESS)  # the probe's own process
    args = ap.parse_args(argv)
    if args.probe:
        probe(args.cpu_smoke, args.probe)
        return 0
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        ap.error("no CUDA device is visible: run on the GPU machine, or pass --cpu-smoke")
    report: dict[str, Any] = {"device": "cpu" if args.cpu_smoke else "cuda", "torch": torch.__version__}
    if not args.cpu_smoke:
        report["gpu"] = torch.cuda.get_device_name(0)
    try:
        import megatron.core

        report["megatron_core"] = megatron.core.__version__
    except ImportError as e:
        report["megatron_core"] = f"not importable: {e}"
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        smoke_env = {"CUDA_VISIBLE_DEVICES": ""} if args.cpu_smoke else None
        for section in args.only:
            t0 = time.perf_counter()
            limit = min(args.section_timeout, args.budget - (t0 - start))
            if limit < 20:
                report[section] = {"error": f"not run: the {args.budget:.0f} s budget is spent"}
            elif section == "actor_update":
                report[section] = actor_update(args.cpu_smoke, limit)
            elif section == "rl_step":
                try:
                    report[section] = rl_step(args.cpu_smoke, work, limit)
                except Exception as e:  # noqa: BLE001 - recorded in the report; the next section runs
                    report[section] = {"error": f"{type(e).__name__}: {e}"}
            else:
                out = work / "probe.json"
                cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", str(out)] + (["--cpu-smoke"] if args.cpu_smoke else [])
                res = run_section(cmd, timeout=limit, env=smoke_env, parse=False)
                report[section] = {**json.loads(out.read_text()), **res} if out.exists() and "error" not in res else res
            print(f"[gpu_check] {section}: {time.perf_counter() - t0:.0f} s"
                  + (f" ERROR {report[section]['error']}" if "error" in report[section] else ""), flush=True)
    report["total_seconds"] = time.perf_counter() - start
    report["checks"] = checks(report)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report["checks"], indent=1))
    print(f"[gpu_check] report: {args.out}")
    return 0 if all(report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
