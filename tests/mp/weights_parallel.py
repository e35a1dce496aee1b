"""Multi-rank weight checks, run by tests/test_weights_parallel.py under torchrun (or as a
plain process for world 1). One launch runs every family of the zoo at one layout:

  load_hf_into_model -> Megatron logits vs transformers logits (fp32)
  iter_hf_tensors    -> bit-exact against the HF files (union over stages checked by pytest)
  save_hf            -> transformers loads it; bit-exact; same logits
  critic             -> trunk loaded, value head kept
  --save-megatron / --load-megatron: a Megatron distributed checkpoint written at this
  layout / read at this layout (resharding) and compared with the HF weights.

Each rank writes OUT/rank{r}.json; pytest asserts on them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def hf_logits(path, ids_BS):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(ids_BS).logits.float()


def megatron_logits(chunks, ids_BS, vocab):
    """Full-vocabulary logits [B, S, V] on the last stage (None elsewhere), through the
    pipeline schedule (one micro-batch per row)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu
    from megatron.core.pipeline_parallel import get_forward_backward_func

    B, S = ids_BS.shape
    pos = torch.arange(S).unsqueeze(0)

    def step(data_iter, model):
        row = next(data_iter)
        out = model(row, pos, None)
        return out, lambda o: (o.new_zeros(()), {"logits": o.detach()})

    mbs = [ids_BS[i : i + 1] for i in range(B)]
    data = iter(mbs) if len(chunks) == 1 else [iter(mbs) for _ in chunks]
    with torch.no_grad():
        store = get_forward_backward_func()(
            forward_step_func=step, data_iterator=data, model=chunks, num_microbatches=B,
            seq_length=S, micro_batch_size=1, forward_only=True,
        )
    if not mpu.is_pipeline_last_stage():
        return None
    local = torch.cat([s["logits"] for s in store])
    tp = mpu.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(parts, local.contiguous(), group=mpu.get_tensor_model_parallel_group())
        local = torch.cat(parts, dim=-1)
    return local[..., :vocab]


def check_actor(key, path, chunks, ids_BS, res, work, rank, layout_tag):
    from hf_fixtures import read_config, read_hf_state

    from megappo.weights import iter_hf_tensors, save_hf

    spec = chunks[0].megappo_spec
    ref = hf_logits(path, ids_BS)
    mg = megatron_logits(chunks, ids_BS, spec.vocab_size)
    if mg is not None:
        res[f"{key}/logits_max_abs_diff"] = float((mg - ref).abs().max())
    orig = read_hf_state(path)
    names, bad = [], []
    for name, t in iter_hf_tensors(chunks):
        names.append(name)
        if name not in orig or t.dtype != orig[name].dtype or not torch.equal(t, orig[name]):
            bad.append(name)
    res[f"{key}/iter_names"] = names
    res[f"{key}/iter_mismatch"] = bad

    out = os.path.join(work, f"{key}-{layout_tag}")
    save_hf(chunks, out, hf_config=read_config(path), tokenizer_dir=path, max_shard_bytes=40_000)
    if rank == 0:
        from transformers import AutoTokenizer

        saved = read_hf_state(out)
        res[f"{key}/save_hf_names_equal"] = sorted(saved) == sorted(orig)
        res[f"{key}/save_hf_mismatch"] = [n for n in orig if n not in saved or not torch.equal(saved[n], orig[n])]
        res[f"{key}/save_hf_files"] = sorted(os.listdir(out))
        res[f"{key}/save_hf_logits_diff"] = float((hf_logits(out, ids_BS) - ref).abs().max())
        res[f"{key}/save_hf_tokenizer_ok"] = AutoTokenizer.from_pretrained(out)("ab")["input_ids"] == AutoTokenizer.from_pretrained(path)("ab")["input_ids"]
        res[f"{key}/save_hf_no_tmp"] = not any(n.startswith(".tmp-") for n in os.listdir(work))


def check_critic(key, path, spec, opts, res):
    from hf_fixtures import read_hf_state

    from megappo.models.builder import build_model_chunks
    from megappo.weights import iter_hf_tensors, load_hf_into_model

    critic = build_model_chunks(spec, "critic", opts)
    load_hf_into_model(critic, path)
    orig = read_hf_state(path)
    got = dict(iter_hf_tensors(critic))
    res[f"{key}/critic_names"] = sorted(got)
    res[f"{key}/critic_mismatch"] = [n for n, t in got.items() if not torch.equal(t, orig[n])]
    last = critic[-1]
    if last.post_process:
        res[f"{key}/critic_head_zero"] = bool((last.output_layer.weight == 0).all() and (last.output_layer.bias == 0).all())


def run_layout(args, zoo, tp, pp, vpp, keys, tag, res):
    import torch.distributed as dist

    from megappo.models.builder import BuildOptions, build_model_chunks
    from megappo.models.spec import ModelSpec
    from megappo.parallel.state import init_parallel
    from megappo.weights import load_hf_into_model, load_megatron_model, save_megatron_model

    layout = init_parallel(tp, pp, vpp, seed=1, device="cpu")
    rank = dist.get_rank()
    ids_BS = torch.randint(0, 103, (2, 11), generator=torch.Generator().manual_seed(0))
    opts = BuildOptions(tp=tp, pp=pp, vpp=vpp)
    for key in keys:
        t0 = time.perf_counter()
        path = zoo[key]
        spec = ModelSpec.from_hf_dir(path)
        chunks = build_model_chunks(spec, "actor", opts)
        load_hf_into_model(chunks, path)
        check_actor(f"{tag}/{key}", path, chunks, ids_BS, res, args.work, rank, tag)
        if key in args.critic:
            check_critic(f"{tag}/{key}", path, spec, opts, res)
        if args.save_megatron and key == args.save_megatron[0]:
            with open(os.path.join(path, "config.json")) as f:
                save_megatron_model(chunks, args.save_megatron[1], hf_config=json.load(f))
        if args.load_megatron and key == args.load_megatron[0]:
            fresh = build_model_chunks(spec, "actor", opts)
            load_megatron_model(fresh, args.load_megatron[1])
            check_actor(f"{tag}/{key}/from_mcore", path, fresh, ids_BS, res, args.work, rank, tag + "-mcore")
        res[f"{tag}/{key}/seconds"] = time.perf_counter() - t0
    res[f"{tag}/layout"] = dict(tp=layout.tp, pp=layout.pp, dp=layout.dp, tp_rank=layout.tp_rank, pp_rank=layout.pp_rank)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", required=True, help="JSON {key: hf_dir}")
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--vpp-key", default=None, help="after the main layout, rerun this key at PP=2 x VPP=2")
    ap.add_argument("--critic", nargs="*", default=[])
    ap.add_argument("--save-megatron", nargs=2, metavar=("KEY", "DIR"), help="save KEY's model as a Megatron checkpoint")
    ap.add_argument("--load-megatron", nargs=2, metavar=("KEY", "DIR"), help="load KEY's model from a Megatron checkpoint")
    args = ap.parse_args()
    zoo = json.loads(args.zoo)

    from megappo.parallel.state import destroy_parallel

    res: dict = {}
    tag = f"tp{args.tp}pp{args.pp}"
    run_layout(args, zoo, args.tp, args.pp, None, list(zoo), tag, res)
    if args.vpp_key:
        # Same processes, new Megatron groups (re-creating the gloo world group fails).
        from megatron.core import parallel_state as mpu

        from megappo.parallel import state

        mpu.destroy_model_parallel()
        state._LAYOUT = None
        run_layout(args, zoo, 1, 2, 2, [args.vpp_key], "tp1pp2vpp2", res)
    import torch.distributed as dist

    rank = dist.get_rank()
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    destroy_parallel()


if __name__ == "__main__":
    sys.exit(main())
