"""Log-prob parity checks behind ``tools/compare_logprobs.py`` (STYLE point 10: every fast
path against a slow reference).

Shape legend: N = sequences, S = positions, T = scored tokens (S - 1, or generated tokens).

``megatron_vs_hf``: fixed token sequences (seeded random ids, or given ones) scored by
the Megatron actor at this TP / PP (``MegatronPolicy.forward_logprobs``: log-prob of
token t+1 given tokens <= t, full vocabulary) and by ``transformers`` in float32 on the
same weights. ``engine_vs_megatron`` (when ``megappo.rollout`` is importable): the rollout
engine receives the actor's weights through ``sync_weights``, decodes greedily from the
sequences' first tokens and reports per-token log-probs, which the actor then scores
on the same tokens. Each comparison is one dict: max / mean absolute difference over the
scored tokens. ``weights_checksum``: the checksum of what that sync sent (the trainer side)
against the engine's own reading of the weights it holds (``RolloutEngine.weights_checksum``:
every weight for the embedded engine, a spot-check of a few tensors for SGLang, named in
``scope``); ``engine`` and ``match`` are null with an ``error`` when the engine cannot read
its weights back.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import torch

from megappo.config.schema import RolloutConfig
from megappo.models import BuildOptions, MegatronPolicy, ModelSpec, TokenBatch
from megappo.parallel.state import init_parallel
from megappo.rollout import RolloutEngineError, SamplingParams, build_engine, checksums_match, generate_in_group, sync_weights
from megappo.toolkit.convert import resolve_model_source
from megappo.weights.megatron_ckpt import load_megatron_model
from megappo.weights.model_io import load_hf_into_model


def fixed_sequences(vocab_size: int, num: int, length: int, seed: int) -> torch.Tensor:
    """[N, S] token ids drawn uniformly with a fixed seed."""
    return torch.randint(0, vocab_size, (num, length), generator=torch.Generator().manual_seed(seed))


def hf_logprobs_NT(hf_dir: str, ids_NS: torch.Tensor) -> torch.Tensor:
    """log p(token t+1 | tokens <= t) under ``transformers`` in float32, [N, S-1]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(ids_NS).logits.float()
    return torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids_NS[:, 1:].unsqueeze(-1)).squeeze(-1)


def summarize(name: str, a_NT: torch.Tensor, b_NT: torch.Tensor, mask_NT: torch.Tensor, **info) -> dict:
    d = (a_NT.double() - b_NT.double()).abs()[mask_NT.bool()]
    return {
        "compare": name,
        "max_abs_diff": float(d.max()) if d.numel() else 0.0,
        "mean_abs_diff": float(d.mean()) if d.numel() else 0.0,
        "num_tokens": int(d.numel()),
        **info,
    }


def compare_logprobs(
    hf_dir: str,
    *,
    ckpt: Optional[str] = None,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    num_seqs: int = 4,
    seq_len: int = 32,
    seed: int = 0,
    token_ids: Optional[Sequence[Sequence[int]]] = None,
    engine: Optional[str] = "embedded",
    prompt_len: int = 4,
    gen_tokens: int = 8,
) -> list[dict]:
    """Run the comparisons (collective over all ranks); the results on rank 0 (an empty
    list elsewhere). ``ckpt``: load the actor from a Megatron checkpoint instead of
    ``hf_dir`` (which stays the reference). ``engine``: the rollout engine to check
    (``rollout.engine`` names; None skips it)."""
    import torch.distributed as dist


    layout = init_parallel(tp, pp, ep=ep)
    spec = ModelSpec.from_hf_dir(hf_dir)
    policy = MegatronPolicy(spec, "reference", BuildOptions(tp=tp, pp=pp, ep=ep))
    if ckpt is not None:

        src = resolve_model_source(ckpt, hf_config_dir=hf_dir)
        load_megatron_model(policy.models, src.dist_dir, spec_dict=src.spec_dict)
    else:
        load_hf_into_model(policy.models, hf_dir)

    if token_ids is not None:
        if len({len(t) for t in token_ids}) != 1:
            raise ValueError("--token-ids: every sequence must have the same length")
        ids_NS = torch.tensor([list(t) for t in token_ids], dtype=torch.long)
    else:
        ids_NS = fixed_sequences(spec.vocab_size, num_seqs, seq_len, seed)
    if ids_NS.shape[1] < 2 or int(ids_NS.max()) >= spec.vocab_size or int(ids_NS.min()) < 0:
        raise ValueError(f"token sequences need >= 2 tokens with ids in [0, {spec.vocab_size})")
    N, S = ids_NS.shape
    batch = TokenBatch(ids_NS, torch.ones(N, dtype=torch.long), torch.full((N,), S - 1))
    mg_NT = policy.forward_logprobs(batch.to(layout.device), temperature=1.0)["logprobs_BT"].cpu()

    layout_info = {"tp": tp, "pp": pp, **({"ep": ep} if ep > 1 else {}), "source": "megatron_checkpoint" if ckpt else "hf"}
    results = []
    if dist.get_rank() == 0:
        results.append(summarize("megatron_vs_hf", mg_NT, hf_logprobs_NT(hf_dir, ids_NS), batch.response_mask_BT, **layout_info))
    if engine is not None:
        rows = engine_vs_megatron(policy, hf_dir, ids_NS[:, :prompt_len], layout, engine=engine, gen_tokens=gen_tokens, seed=seed)
        if dist.get_rank() == 0:
            results += [{**row, **layout_info} for row in rows]
    return results


def checksum_row(eng, trainer_checksum: float) -> dict:
    """The ``weights_checksum`` comparison of an engine just synced (module docstring)."""

    scope = eng.checksum_scope()
    row = {"compare": "weights_checksum", "trainer": trainer_checksum, "engine": None, "match": None,
           "scope": "all" if scope is None else list(scope)}
    try:
        held = eng.weights_checksum()
    except RolloutEngineError as e:
        return {**row, "error": str(e)}
    return {**row, "engine": held, "match": checksums_match(trainer_checksum, held)}


def engine_vs_megatron(policy, hf_dir: str, prompts_NP: torch.Tensor, layout, *, engine: str, gen_tokens: int, seed: int) -> list[dict]:
    """Sync the actor into a fresh rollout engine, compare checksums, decode greedily, and
    compare the engine's log-probs with the actor's on the same tokens. The rows (the
    checksum's on the holder only)."""
    with open(os.path.join(hf_dir, "config.json")) as f:
        hf_config = json.load(f)
    eng = build_engine(RolloutConfig(engine=engine), hf_config=hf_config, hf_dir=hf_dir, layout=layout, eos_token_ids=())
    rows = []
    try:
        stats = sync_weights(policy.models, eng, layout, bucket_mb=64, checksum=True)
        if eng is not None and stats.checksum is not None:
            rows.append(checksum_row(eng, stats.checksum))
        params = SamplingParams(n=1, temperature=0.0, max_new_tokens=gen_tokens, seed=seed)
        samples = generate_in_group(eng, prompts_NP.tolist(), params, layout)
    finally:
        if eng is not None:
            eng.shutdown()
    N, P = prompts_NP.shape
    resp = [s[0].token_ids for s in samples]
    T = max(len(r) for r in resp)
    ids_NS = torch.zeros(N, P + T, dtype=torch.long)
    engine_NT = torch.zeros(N, T)
    ids_NS[:, :P] = prompts_NP
    for i, s in enumerate(samples):
        ids_NS[i, P : P + len(s[0].token_ids)] = torch.tensor(s[0].token_ids)
        engine_NT[i, : len(s[0].logprobs)] = torch.tensor(s[0].logprobs)
    batch = TokenBatch(ids_NS, torch.full((N,), P), torch.tensor([len(r) for r in resp]))
    mg_NT = policy.forward_logprobs(batch.to(layout.device), temperature=1.0)["logprobs_BT"].cpu()
    return [summarize("engine_vs_megatron", engine_NT, mg_NT, batch.response_mask_BT, engine=engine)] + rows
