"""The CPU demo: ``make demo`` (``python -m megappo.demo``).

From nothing (no downloads) it builds a toy verifiable task (small-integer addition, see
``megappo.toolkit.toy``), a character-level tokenizer and a tiny Llama-shaped model, gives the
model a short supervised warm-up so it starts with some reward, saves it as a HuggingFace
directory, and then trains it with LitePPO under ``torchrun --nproc-per-node 2`` with the
embedded rollout engine (``recipes/toy_liteppo_cpu.yaml``). It prints the held-out accuracy
before and after and writes ``<out>/metrics.jsonl``, TensorBoard logs and ``<out>/metrics.png``.

    python -m megappo.demo [--out runs/demo] [--steps N] [--prepare-only]
    python -m megappo.demo --recipe recipes/toy_grpo_cpu.yaml --out runs/demo_grpo   # or toy_ppo_cpu
    python -m megappo.demo --engine sglang --out runs/demo_sglang   # SGLang on CPU: make sglang-env first
    python -m megappo.demo --moe --out runs/demo_moe   # a tiny Qwen3-MoE at EP=2 with routing replay

``--engine sglang`` trains with the real SGLang engine (``rollout.engine=sglang``) on the
CPU; the trainer then runs under the CPU SGLang environment's python (.venv-sglang), which
``make sglang-env`` (or ``make test``) builds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from megappo.metrics import plot_metrics
from megappo.parallel.sglang_cpu import environment_python
from megappo.toolkit.char_tokenizer import build_char_tokenizer
from megappo.toolkit.toy import make_toy_dataset, toy_problems, toy_sft_pairs

DEMO_KIND = "add20"
ALPHABET = "0123456789+-="
RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "toy_liteppo_cpu.yaml"
MOE_RECIPE = RECIPE.parent / "toy_liteppo_moe_cpu.yaml"
TARGET_GAIN = 0.30
"""The demo's promise: held-out accuracy at least 30 points above the warm-up level."""


def build_tiny_model(tokenizer, *, seed: int, hidden: int = 64, layers: int = 2, moe: bool = False):
    """A random Llama-shaped model over the char vocabulary (heads divisible by TP=2), or with
    ``moe`` a Qwen3-MoE-shaped one (4 experts of width 2 x hidden, top-2, every layer routed)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    if moe:
        config = Qwen3MoeConfig(**common, head_dim=hidden // 4, intermediate_size=4 * hidden, moe_intermediate_size=2 * hidden,
                                num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                                mlp_only_layers=[], router_aux_loss_coef=0.001)
        return Qwen3MoeForCausalLM(config).float()
    return LlamaForCausalLM(LlamaConfig(**common, intermediate_size=4 * hidden)).float()


def warm_up(model, tokenizer, pairs: list[tuple[str, str]], *, steps: int, batch: int, lr: float, seed: int) -> float:
    """Supervised warm-up on (prompt, answer) pairs: cross-entropy on the answer and EOS."""
    import torch

    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        chosen = [pairs[rng.randrange(len(pairs))] for _ in range(batch)]
        seqs, labels = [], []
        for prompt, answer in chosen:
            p = tokenizer(prompt)["input_ids"]
            a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            seqs.append(p + a)
            labels.append([-100] * len(p) + a)
        width = max(map(len, seqs))
        ids = torch.full((batch, width), tokenizer.pad_token_id)
        lab = torch.full((batch, width), -100)
        for i, (s, l) in enumerate(zip(seqs, labels)):
            ids[i, : len(s)] = torch.tensor(s)
            lab[i, : len(l)] = torch.tensor(l)
        loss = model(input_ids=ids, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


def prepare(out: Path, *, seed: int, sft_steps: int, moe: bool = False) -> dict[str, str]:
    """Tokenizer, data and warmed-up model under ``out``; returns their paths."""

    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "model"
    tokenizer = build_char_tokenizer(ALPHABET)
    train_path = make_toy_dataset(out / "data" / "train.jsonl", n=len(toy_problems(DEMO_KIND, "train")), seed=seed, kind=DEMO_KIND)
    eval_path = make_toy_dataset(out / "data" / "eval.jsonl", n=len(toy_problems(DEMO_KIND, "eval")), seed=seed, kind=DEMO_KIND, split="eval")
    model = build_tiny_model(tokenizer, seed=seed, moe=moe)
    t0 = time.time()
    loss = warm_up(model, tokenizer, toy_sft_pairs(4096, seed, kind=DEMO_KIND), steps=sft_steps, batch=64, lr=3e-3, seed=seed)
    print(f"[demo] supervised warm-up: {sft_steps} steps, final loss {loss:.3f}, {time.time() - t0:.0f} s", flush=True)
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return {"model": str(model_dir), "train": str(train_path), "eval": str(eval_path)}


def trainer_python(engine: str) -> str:
    """The python that trains: this one, or for ``sglang`` on CPU the one with SGLang."""
    import importlib.util

    if engine != "sglang" or importlib.util.find_spec("sglang") is not None:
        return sys.executable
    python = environment_python()
    if python is None:
        raise ValueError(
            "--engine sglang: SGLang is not installed in this Python and the CPU SGLang environment "
            "(.venv-sglang) is not built: run `make sglang-env` (about 2 minutes, 3 GB) first"
        )
    return str(python)


def train(
    paths: dict[str, str], run_dir: Path, *, steps: int | None, extra: list[str], recipe: Path = RECIPE, python: str = sys.executable
) -> int:
    cmd = [
        python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "megappo.train", "--config", str(recipe),
        f"model.hf_path={paths['model']}", f"data.train_path={paths['train']}", f"data.eval_path={paths['eval']}",
        f"train.run_dir={run_dir}",
    ]
    if steps is not None:
        cmd.append(f"train.steps={steps}")
    cmd += extra
    print("[demo] " + " ".join(cmd), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.call(cmd, env=env)


def summarize(run_dir: Path) -> dict[str, float]:

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    if not evals:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no eval/accuracy rows: run with train.eval_every > 0 and data.eval_path set")
    png = run_dir / "metrics.png"
    plot_metrics(run_dir / "metrics.jsonl", png, keys=("reward/mean", "eval/accuracy"))
    first, last = evals[0][1], evals[-1][1]
    print(f"[demo] held-out accuracy: {first:.3f} after warm-up (step {evals[0][0]}) -> {last:.3f} at step {evals[-1][0]} "
          f"({100 * (last - first):+.1f} points)")
    if last - first < TARGET_GAIN:
        print(f"[demo] WARNING: the gain is below the demo's {100 * TARGET_GAIN:.0f}-point target "
              "(fewer steps than the recipe's, or another recipe?)")
    print(f"[demo] metrics: {run_dir / 'metrics.jsonl'}\n[demo] TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}\n[demo] plot: {png}")
    return {"warmup_accuracy": first, "final_accuracy": last}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megappo.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    ap.add_argument("--recipe", type=Path, default=None, help=f"the RL recipe (default {RECIPE.relative_to(RECIPE.parent.parent)})")
    ap.add_argument("--steps", type=int, default=None, help="RL steps (default: the recipe's)")
    ap.add_argument("--sft-steps", type=int, default=100, help="supervised warm-up steps")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--prepare-only", action="store_true", help="build tokenizer, data and warmed-up model, then stop")
    ap.add_argument("--moe", action="store_true", help=f"a tiny Qwen3-MoE model and (by default) {MOE_RECIPE.name} (EP=2)")
    ap.add_argument("--engine", choices=("embedded", "sglang"), default="embedded", help="rollout engine (sglang: make sglang-env)")
    args, extra = ap.parse_known_args(argv)
    args.recipe = args.recipe or (MOE_RECIPE if args.moe else RECIPE)
    try:
        python = trainer_python(args.engine)
    except ValueError as e:
        print(f"[demo] error: {e}", file=sys.stderr)
        return 2
    if args.engine == "sglang":
        extra = ["rollout.engine=sglang", *extra]
    out = Path(args.out)
    t0 = time.time()
    if (out / "checkpoints").exists() and not args.prepare_only:
        shutil.rmtree(out / "checkpoints")
        (out / "metrics.jsonl").unlink(missing_ok=True)
    paths = prepare(out, seed=args.seed, sft_steps=args.sft_steps, moe=args.moe)
    print(f"[demo] model {paths['model']}; data {paths['train']} (train), {paths['eval']} (held out)")
    if args.prepare_only:
        return 0
    if not args.recipe.is_file():
        print(f"[demo] error: recipe {args.recipe} not found", file=sys.stderr)
        return 2
    code = train(paths, out, steps=args.steps, extra=extra, recipe=args.recipe, python=python)
    if code != 0:
        print(f"[demo] training failed with exit status {code}", file=sys.stderr)
        return code
    summarize(out)
    print(f"[demo] done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
