"""Weight-mapping checks at one parallel layout, for every family of the zoo (a phase of
``weights_launch.py``; pytest asserts on the JSON it writes):

  load_hf_into_model -> Megatron logits vs transformers logits (fp32, through the pipeline schedule)
  iter_hf_tensors    -> bit-exact against the HF files (pytest checks the union over stages)
  save_hf            -> transformers loads it; bit-exact; same logits; tokenizer copied
  critic             -> trunk loaded, value head kept
  save_mcore / load_mcore: a Megatron distributed checkpoint written at this layout / read
  at this layout (resharded) and compared with the HF weights
  compare            -> megappo.toolkit.compare at this layout (Megatron vs HF, engine vs Megatron)
"""

from __future__ import annotations

import os
import time

import torch

IDS_BS = torch.randint(0, 103, (2, 11), generator=torch.Generator().manual_seed(0))


def hf_logits(path, ids_BS):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(ids_BS).logits.float()


def megatron_logits(chunks, ids_BS, vocab):
    """Full-vocabulary logits [B, S, V] on the last stage (None elsewhere), through the
    pipeline schedule (one micro-batch per row), model-only forward."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mpu
    from megatron.core.pipeline_parallel import get_forward_backward_func

    B, S = ids_BS.shape
    pos = torch.arange(S).unsqueeze(0)

    def step(data_iter, model):
        row = next(data_iter)
        return model(row, pos, None), lambda out: (out.new_zeros(()), {"logits": out.detach()})

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


def check_actor(key, path, chunks, res, work, tag):
    import torch.distributed as dist
    from hf_fixtures import read_config, read_hf_state
    from transformers import AutoTokenizer

    from megappo.weights import iter_hf_tensors, save_hf

    ref = hf_logits(path, IDS_BS)
    mg = megatron_logits(chunks, IDS_BS, chunks[0].megappo_spec.vocab_size)
    if mg is not None:
        res[f"{key}/logits_max_abs_diff"] = float((mg - ref).abs().max())
    orig = read_hf_state(path)
    res[f"{key}/hf_names"] = sorted(orig)
    names, bad = [], []
    for name, t in iter_hf_tensors(chunks):
        names.append(name)
        if name not in orig or t.dtype != orig[name].dtype or not torch.equal(t, orig[name]):
            bad.append(name)
    res[f"{key}/iter_names"] = names
    res[f"{key}/iter_mismatch"] = bad

    out = os.path.join(work, tag, key.replace("/", "-"))
    save_hf(chunks, out, hf_config=read_config(path), tokenizer_dir=path, max_shard_bytes=40_000)
    if dist.get_rank() == 0:
        saved = read_hf_state(out)
        res[f"{key}/save_hf_names_equal"] = sorted(saved) == sorted(orig)
        res[f"{key}/save_hf_mismatch"] = [n for n in orig if n not in saved or not torch.equal(saved[n], orig[n])]
        res[f"{key}/save_hf_files"] = sorted(os.listdir(out))
        res[f"{key}/save_hf_logits_diff"] = float((hf_logits(out, IDS_BS) - ref).abs().max())
        res[f"{key}/save_hf_tokenizer_ok"] = AutoTokenizer.from_pretrained(out)("ab")["input_ids"] == AutoTokenizer.from_pretrained(path)("ab")["input_ids"]
        res[f"{key}/save_hf_no_tmp"] = not any(n.startswith(".tmp-") for n in os.listdir(os.path.dirname(out)))


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
    if critic[-1].post_process:
        head = critic[-1].output_layer
        res[f"{key}/critic_head_zero"] = bool((head.weight == 0).all() and (head.bias == 0).all())


def layout_phase(ctx, res, *, tp, pp, vpp=None, keys=None, critic_keys=(), save_mcore=None, load_mcore=None, compare=None):
    """Every check above for ``keys`` (default: the whole zoo) at TP x PP (x VPP)."""
    import json

    from megappo.models.builder import BuildOptions, build_model_chunks
    from megappo.models.spec import ModelSpec
    from megappo.parallel.state import init_parallel
    from megappo.weights import load_hf_into_model, load_megatron_model, save_megatron_model

    layout = init_parallel(tp, pp, vpp, seed=1, device="cpu")
    tag = f"tp{tp}pp{pp}" + (f"vpp{vpp}" if vpp else "")
    opts = BuildOptions(tp=tp, pp=pp, vpp=vpp)
    mcore_dir = os.path.join(ctx.work, "mcore-tp2")
    for key in keys or list(ctx.zoo):
        t0 = time.perf_counter()
        path = ctx.zoo[key]
        spec = ModelSpec.from_hf_dir(path)
        chunks = build_model_chunks(spec, "actor", opts)
        load_hf_into_model(chunks, path)
        check_actor(f"{tag}/{key}", path, chunks, res, ctx.work, tag)
        if key in critic_keys:
            check_critic(f"{tag}/{key}", path, spec, opts, res)
        if key == save_mcore:
            with open(os.path.join(path, "config.json")) as f:
                save_megatron_model(chunks, mcore_dir, hf_config=json.load(f), source_dir=path)
        if key == load_mcore:
            fresh = build_model_chunks(spec, "actor", opts)
            load_megatron_model(fresh, mcore_dir)
            check_actor(f"{tag}/{key}/from_mcore", path, fresh, res, ctx.work, tag + "-mcore")
        res[f"{tag}/{key}/seconds"] = round(time.perf_counter() - t0, 2)
    if compare is not None:
        from megappo.toolkit.compare import compare_logprobs

        key, from_mcore = compare
        rows = compare_logprobs(ctx.zoo[key], ckpt=mcore_dir if from_mcore else None, tp=tp, pp=pp, num_seqs=3, seq_len=16)
        res[f"{tag}/compare"] = rows
    res[f"{tag}/layout"] = dict(tp=layout.tp, pp=layout.pp, dp=layout.dp, tp_rank=layout.tp_rank, pp_rank=layout.pp_rank)
