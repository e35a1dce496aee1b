"""Single-process unit tests of megappo.models: token batches and micro-batching (padded,
packed, the interleaved schedule's count rule), packed model inputs, the loss-scale
factor, the config -> build-options mapping, and the FP8 / TE / packing errors.
None of these import Megatron (fast)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megappo.config import config_from_dict
from megappo.models.batch import TokenBatch, interleaved_schedule_accepts, microbatch_rows
from megappo.models.builder import BuildOptions, check_fp8, resolve_transformer_impl
from megappo.models.factory import build_options, optimizer_settings, resolve_dtype, total_optimizer_steps
from megappo.models.model_inputs import block_causal_mask, check_packing, model_inputs, packing_mode, pad_multiple
from megappo.models.optimizer import loss_scale_factor
from megappo.parallel.state import ParallelLayout

CPU = torch.device("cpu")


def _batch() -> TokenBatch:
    ids = torch.arange(3 * 8).view(3, 8)
    return TokenBatch(ids, torch.tensor([2, 1, 3]), torch.tensor([4, 0, 5]))


# ---------------------------------------------------------------------- TokenBatch

def test_response_mask_positions_and_ids_follow_the_contract():
    b = _batch()
    assert b.T == 5
    assert b.response_mask_BT.tolist() == [[1, 1, 1, 1, 0], [0] * 5, [1] * 5]
    pos = b.output_positions_BT()
    assert pos[0].tolist() == [1, 2, 3, 4, 5]  # prompt_len + t - 1
    assert pos[1].tolist() == [0, 1, 2, 3, 4]
    assert b.response_ids_BT[0].tolist() == [2, 3, 4, 5, 0]  # ids at prompt_len + t, 0 on padding
    assert b.response_ids_BT[2].tolist() == [19, 20, 21, 22, 23]


def test_select_trims_to_the_rows_or_keeps_the_batch_width():
    b = _batch()
    sub = b.select(torch.tensor([0, 1]))
    assert sub.S == 6 and sub.T == 4 and sub.input_ids_BS.tolist() == b.input_ids_BS[:2, :6].tolist()
    parts = [b.select(rows, trim=False) for rows in torch.arange(b.B).tensor_split(2)]
    assert [p.B for p in parts] == [2, 1] and all(p.T == 5 and p.S == b.S for p in parts)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt_lens_B=torch.tensor([0, 1, 3])), "at least one token"),
        (dict(response_lens_B=torch.tensor([4, 0, 6])), r"\[1, S=8\]"),
        (dict(input_ids_BS=torch.zeros(3, 8)), "integer"),
        (dict(response_width=3), "response_width"),
    ],
)
def test_bad_batches_are_rejected(kwargs, match):
    base = dict(input_ids_BS=torch.zeros(3, 8, dtype=torch.long), prompt_lens_B=torch.tensor([2, 1, 3]),
                response_lens_B=torch.tensor([4, 0, 5]))
    with pytest.raises(ValueError, match=match):
        TokenBatch(**{**base, **kwargs})


@settings(max_examples=60, deadline=None)
@given(
    lens=st.lists(st.integers(1, 50), min_size=1, max_size=30),
    budget=st.integers(1, 400),
    min_mb=st.integers(1, 8),
    packed=st.booleans(),
)
def test_microbatches_partition_the_rows_within_the_budget(lens, budget, min_mb, packed):
    groups = microbatch_rows(torch.tensor(lens), budget, min_microbatches=min_mb, packed=packed)
    rows = sorted(int(i) for g in groups for i in g)
    assert rows == list(range(len(lens)))  # every row exactly once
    for g in groups:
        glens = [lens[int(i)] for i in g]
        cost = sum(glens) if packed else len(g) * max(glens)  # real tokens, or padded ones
        assert len(g) == 1 or cost <= budget
    assert len(groups) >= min(min_mb, len(lens))
    again = microbatch_rows(torch.tensor(lens), budget, min_microbatches=min_mb, packed=packed)
    assert [g.tolist() for g in again] == [g.tolist() for g in groups]  # deterministic


def test_packed_budget_counts_real_tokens():
    lens = torch.tensor([10, 2, 2, 2])
    assert len(microbatch_rows(lens, 16)) == 2  # padded: [10, 2] costs 20 > 16
    assert len(microbatch_rows(lens, 16, packed=True)) == 1  # packed: 16 real tokens


def _megatron_interleaved_check(m: int, pp: int, group: int) -> bool:
    """The two checks of forward_backward_pipelining_with_interleaving (megatron-core 0.16.1)."""
    if group > m or group < pp:
        return False
    rem = m % group
    return not (0 < rem < pp)


@pytest.mark.parametrize("pp, group", [(2, 2), (4, 4), (2, 3), (3, 5)])
def test_interleaved_count_rule_is_megatrons(pp, group):
    for m in range(1, 30):
        assert interleaved_schedule_accepts(m, pp, group) == _megatron_interleaved_check(m, pp, group), m


@settings(max_examples=60, deadline=None)
@given(
    lens=st.lists(st.integers(1, 50), min_size=4, max_size=30),
    budget=st.integers(1, 400),
    min_mb=st.integers(1, 8),
    pp=st.sampled_from([2, 4]),
)
def test_interleaved_microbatch_counts_are_accepted_by_the_schedule(lens, budget, min_mb, pp):
    try:
        groups = microbatch_rows(torch.tensor(lens), budget, min_microbatches=min_mb, interleave=(pp, pp))
    except ValueError as e:
        assert f"this data-parallel rank has {len(lens)} sequences" in str(e)
        return
    assert interleaved_schedule_accepts(len(groups), pp, pp) and len(groups) >= min(min_mb, len(lens))


def test_interleaved_split_goes_up_to_the_next_accepted_count():
    lens = torch.tensor([5, 5, 5, 5, 5])
    assert len(microbatch_rows(lens, 100, min_microbatches=3, interleave=(2, 2))) == 4
    assert len(microbatch_rows(lens, 100, min_microbatches=3, interleave=(2, 3))) == 3
    with pytest.raises(ValueError, match=r"pipeline_model_parallel_size=4.*has 3 sequences.*M = 4"):
        microbatch_rows(torch.tensor([5, 5, 5]), 100, min_microbatches=4, interleave=(4, 4))


# ---------------------------------------------------------------------- packed model inputs

def test_packed_inputs_concatenate_rows_and_read_outputs_at_the_packed_positions():
    b = _batch()  # lengths 6, 1, 8
    inp = model_inputs(b, "block_mask", 4)
    assert inp.seq_length == 16 and inp.micro_batch_size == 1  # 15 tokens padded to a multiple of 4
    assert inp.cu_seqlens.tolist() == [0, 6, 7, 15, 16]  # the tail padding is a segment of its own
    ids = b.input_ids_BS
    assert inp.input_ids[0].tolist() == ids[0, :6].tolist() + ids[1, :1].tolist() + ids[2, :8].tolist() + [0]
    # Response token t of row i is predicted at start_i + prompt_i + t - 1.
    assert inp.out_index_bT[0, :4].tolist() == [1, 2, 3, 4]
    assert inp.out_index_bT[2].tolist() == [7 + 2, 7 + 3, 7 + 4, 7 + 5, 7 + 6]
    out = torch.arange(16.0).view(1, 16, 1)
    assert inp.gather(out).squeeze(-1)[2].tolist() == [9.0, 10.0, 11.0, 12.0, 13.0]
    no_response = b.select(torch.tensor([1]))  # T = 0: nothing to read
    for mode in ("padded", "block_mask"):
        assert model_inputs(no_response, mode).gather(torch.zeros(1, 1, 7)).shape == (1, 0, 7)
    padded = model_inputs(b)
    assert padded.input_ids is b.input_ids_BS and padded.cu_seqlens is None
    out_bS = torch.arange(24.0).view(3, 8, 1)
    assert padded.gather(out_bS).squeeze(-1)[2].tolist() == [18.0, 19.0, 20.0, 21.0, 22.0]


def test_block_causal_mask_keeps_sequences_apart():
    mask = block_causal_mask(torch.tensor([0, 2, 5]), 5)[0, 0]
    allowed = (~mask).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ]


def test_packing_mode_pad_multiple_and_sliding_window_error():
    assert packing_mode(False, "transformer_engine") == "padded"
    assert packing_mode(True, "local") == "block_mask" and packing_mode(True, "transformer_engine") == "thd"
    assert pad_multiple(4, False, None) == 1 and pad_multiple(4, True, None) == 4
    assert pad_multiple(4, True, "delayed") == 16 and pad_multiple(2, False, "mxfp8") == 32
    check_packing("thd", 4096)
    check_packing("block_mask", None)
    with pytest.raises(ValueError, match="sliding_window=4096.*packed_sequences=false"):
        check_packing("block_mask", 4096)


# ---------------------------------------------------------------------- loss scaling

def test_loss_scale_factor_values():
    assert loss_scale_factor(1, 1) == 1.0
    assert loss_scale_factor(3, 4) == 12.0
    with pytest.raises(ValueError):
        loss_scale_factor(0, 1)


def test_loss_scaling_undoes_megatron_averaging_for_any_split():
    """Simulate what Megatron does to the loss_fn values (divide by the rank's number of
    micro-batches; DDP averages gradients over ranks) and check that the factor restores
    the gradient of the global token-mean loss, for uneven splits."""
    torch.manual_seed(0)
    x, y = torch.randn(12, 3), torch.randn(12)
    mask = (torch.rand(12) > 0.2).float()
    w = torch.randn(3, requires_grad=True)
    n_tokens = mask.sum()

    def loss_fn(rows):  # the trainer's loss: its share of the global token mean
        return (((x[rows] @ w - y[rows]) ** 2) * mask[rows]).sum() / n_tokens

    full = torch.autograd.grad(loss_fn(torch.arange(12)), w)[0]
    ranks = [[torch.arange(0, 2), torch.arange(2, 5), torch.arange(5, 6)], [torch.arange(6, 12)]]
    dp = len(ranks)
    grad = torch.zeros(3)
    for mbs in ranks:
        factor = loss_scale_factor(len(mbs), dp)
        rank_grad = sum(torch.autograd.grad(loss_fn(r) * factor / len(mbs), w)[0] for r in mbs)
        grad += rank_grad / dp  # DDP: gradient_scaling_factor 1/dp, then all-reduce SUM
    torch.testing.assert_close(grad, full, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------- config -> options

def _layout(device=CPU) -> ParallelLayout:
    return ParallelLayout(rank=0, world_size=2, local_rank=0, tp=2, pp=1, dp=1, tp_rank=0, pp_rank=0, dp_rank=0,
                          vpp=None, device=device)


def test_build_options_and_optimizer_settings_from_config():
    cfg = config_from_dict({
        "model": {"recompute_granularity": "full", "value_head_init_std": 0.01},
        "parallel": {"tensor_model_parallel_size": 2, "use_distributed_optimizer": True},
        "optim": {"lr": 1e-5, "critic_lr": 3e-5, "lr_decay_style": "cosine", "lr_warmup_steps": 2},
        "train": {"steps": 10, "rollout_batch_size": 8, "mini_batch_size": 3},
        "algo": {"ppo_epochs": 2},
    })
    opts = build_options(cfg, _layout())
    assert (opts.tp, opts.pp, opts.dtype, opts.transformer_impl) == (2, 1, torch.float32, "local")
    assert opts.recompute_granularity == "full" and opts.value_head_init_std == 0.01
    assert total_optimizer_steps(cfg) == 10 * 2 * math.ceil(8 / 3)
    actor, critic = optimizer_settings(cfg, "actor"), optimizer_settings(cfg, "critic")
    assert (actor.lr, critic.lr) == (1e-5, 3e-5)
    assert actor.lr_decay_steps == 60 and actor.lr_warmup_steps == 2 and actor.use_distributed_optimizer
    no_critic_lr = config_from_dict({"optim": {"lr": 2e-6}})
    assert optimizer_settings(no_critic_lr, "critic").lr == 2e-6


def test_pass_through_dicts_reach_the_build_options_and_optimizer_settings():
    cfg = config_from_dict({
        "model": {"megatron": {"attention_dropout": 0.1}},
        "optim": {"megatron": {"decoupled_weight_decay": False}, "ddp": {"overlap_grad_reduce": True, "bucket_size": 64}},
    })
    assert build_options(cfg, _layout()).megatron == {"attention_dropout": 0.1}
    for role in ("actor", "critic"):
        settings = optimizer_settings(cfg, role)
        assert settings.megatron == {"decoupled_weight_decay": False}
        assert settings.ddp == {"overlap_grad_reduce": True, "bucket_size": 64}
        assert settings.overlap_grad_reduce is True  # what the policy reads to install no_sync
    plain = optimizer_settings(config_from_dict({}), "actor")
    assert plain.megatron == {} and plain.ddp == {} and plain.overlap_grad_reduce is False
    # the Megatron mirrors are gone: one spelling per option, Megatron's, in the dicts
    assert not {"attention_dropout", "hidden_dropout", "use_cpu_initialization"} & set(BuildOptions.__dataclass_fields__)
    assert not {"grad_reduce_in_fp32", "bucket_size"} & set(type(plain).__dataclass_fields__)


def test_dtype_auto_is_fp32_on_cpu_and_bf16_on_gpu():
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_dtype("bfloat16", CPU) == torch.bfloat16


# ---------------------------------------------------------------------- FP8 / TE without TE

def test_fp8_without_transformer_engine_names_what_is_missing():
    with pytest.raises(ValueError) as err:
        check_fp8(BuildOptions(fp8_format="e4m3", transformer_impl="local"))
    msg = str(err.value)
    assert "model.fp8.format=e4m3" in msg and "Transformer Engine" in msg
    assert "transformer_impl=transformer_engine" in msg and "FP8-capable GPU" in msg


def test_transformer_engine_requested_without_it_is_a_clear_error():
    assert resolve_transformer_impl("auto", CPU) == "local"
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        resolve_transformer_impl("transformer_engine", CPU)
    with pytest.raises(ValueError, match="Transformer Engine is not importable"):
        resolve_transformer_impl("transformer_engine", torch.device("cuda", 0))
