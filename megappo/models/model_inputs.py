"""What ``GPTModel.forward`` gets for one micro-batch, right-padded or packed, and where
each response token's output is read back.

Shape legend: b = sequences of the micro-batch, S = their right-padded width, T = response
positions, N = packed positions (the b real lengths summed, then padded at the end to a
multiple of ``pad_multiple``), V = vocabulary shard (or 1 for the critic's value).

Right-padded (``mode="padded"``): input ids [b, S'], positions 0..S'-1, Megatron's default
causal mask, where S' is S rounded up to a multiple of ``pad_multiple`` (the extra columns
are padding after every real token: causal attention never lets a real token see them, and
no output is read there, so every loss and metric is unchanged). The output predicting
response token t of row i is at (i, prompt_len_i + t - 1).

Packed (``train.packed_sequences``): the b sequences concatenated without padding into one
row [1, N]; row i occupies [start_i, start_i + len_i), so its output is read at
start_i + prompt_len_i + t - 1. The tail padding (when N > sum of lengths) is a segment of
its own, so no real token attends to it or is attended by it. Two backends keep the
sequences apart, chosen by the layer spec:
  - ``block_mask`` (local spec: CPU, GPU without TE): a block-diagonal causal boolean
    ``attention_mask`` [1, 1, N, N], True = masked (Megatron's convention). With
    ``attn_mask_type=causal`` the local attention uses a given mask instead of its default
    causal one (``FusedScaleMaskSoftmax.forward_torch_softmax``) and fills masked scores with
    -10000, as it does for the default mask, so each block's softmax is the unpacked one.
    Position ids run 0..N-1: RoPE scores depend only on the distance between two positions,
    so a sequence at offset ``start_i`` scores as at offset 0 (equal to float rounding).
    The mask and the scores are O(N^2): a path for small models and for checking.
    Megatron replaces the given mask by its own when the attention has a sliding window,
    so packing on the local spec refuses sliding-window models (``check_packing``).
  - ``thd`` (Transformer Engine spec, GPU): ``PackedSeqParams(qkv_format="thd")`` with
    int32 ``cu_seqlens`` on the device; TE runs variable-length attention and Megatron's
    RoPE restarts positions at each boundary; no mask. Not runnable on CPU (no TE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor

from megappo.models.batch import TokenBatch

PackingMode = Literal["padded", "block_mask", "thd"]


def packing_mode(packed: bool, transformer_impl: str) -> PackingMode:
    """``padded`` unless ``train.packed_sequences``; then ``thd`` on the TE spec, else ``block_mask``."""
    if not packed:
        return "padded"
    return "thd" if transformer_impl == "transformer_engine" else "block_mask"


def check_packing(mode: PackingMode, sliding_window: Optional[int]) -> None:
    """Packing on the local spec cannot run sliding-window attention (see the module doc)."""
    if mode == "block_mask" and sliding_window:
        raise ValueError(
            f"train.packed_sequences=true on the local layer spec does not support sliding-window attention "
            f"(this model has sliding_window={sliding_window}): Megatron's local attention replaces the packing "
            "mask by its sliding-window mask, so packed sequences would see each other; use "
            "model.transformer_impl=transformer_engine on GPU, or train.packed_sequences=false"
        )


def pad_multiple(tp: int, sequence_parallel: bool, fp8_recipe: Optional[str]) -> int:
    """What every micro-batch's sequence length (a padded micro-batch's width S, a packed
    row's N) must divide by: TP with sequence parallelism (Megatron's
    ``_split_along_first_dim`` cuts the sequence over TP ranks and asserts S % TP == 0);
    16 with FP8 (TE's FP8 GEMMs assert token counts divisible by 8 or 16 by recipe: 16
    covers both), 32 with the MXFP8 recipe (its 32-element scaling blocks).
    ``fp8_recipe`` is None without FP8."""
    m = tp if sequence_parallel else 1
    if fp8_recipe is not None:
        m = math.lcm(m, 32 if fp8_recipe == "mxfp8" else 16)
    return m


def block_causal_mask(cu_seqlens: Tensor, n: int) -> Tensor:
    """bool [1, 1, N, N]: True where query q may not attend to key k, i.e. k > q or the two
    lie in different segments of ``cu_seqlens`` (segment boundaries, [0, ..., N])."""
    seg_N = torch.repeat_interleave(torch.arange(cu_seqlens.numel() - 1, device=cu_seqlens.device), cu_seqlens.diff())
    q_N1, k_1N = torch.arange(n, device=cu_seqlens.device).unsqueeze(1), torch.arange(n, device=cu_seqlens.device).unsqueeze(0)
    allowed_NN = (k_1N <= q_N1) & (seg_N.unsqueeze(1) == seg_N.unsqueeze(0))
    return (~allowed_NN).view(1, 1, n, n)


def thd_params(cu_seqlens: Tensor):
    """Megatron's ``PackedSeqParams`` for TE's THD attention over the segments of ``cu_seqlens``."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = cu_seqlens.to(torch.int32)
    longest = int(cu.diff().max())
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest
    )


@dataclass(frozen=True)
class ModelInputs:
    """The model inputs of one micro-batch and the output positions of its response tokens."""

    input_ids: Tensor
    """[b, S] right-padded, or [1, N] packed."""
    out_index_bT: Tensor
    """int64 [b, T]: index of each response token's predicting output in the model output
    flattened over (rows, positions); on response padding it points at some valid output
    (read, then masked)."""
    mode: PackingMode = "padded"
    cu_seqlens: Optional[Tensor] = None
    """Packed only: segment boundaries [0, start_1, ..., sum of lengths(, N)], int64."""

    @property
    def seq_length(self) -> int:
        return self.input_ids.shape[1]

    @property
    def micro_batch_size(self) -> int:
        return self.input_ids.shape[0]

    def forward_args(self) -> tuple[tuple, dict]:
        """``(args, kwargs)`` of ``GPTModel.forward``: (input_ids, position_ids, attention_mask)
        and ``packed_seq_params`` for THD. Builds the N x N mask here, not per micro-batch
        up front, so only the running micro-batch holds one."""
        ids = self.input_ids
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
        if self.mode == "block_mask":
            return (ids, pos, block_causal_mask(self.cu_seqlens, ids.shape[1])), {}
        if self.mode == "thd":
            return (ids, pos, None), {"packed_seq_params": thd_params(self.cu_seqlens)}
        return (ids, pos, None), {}

    def gather(self, output: Tensor) -> Tensor:
        """[b, S, V] or [1, N, V] model output -> [b, T, V] at the response positions."""
        flat = output.reshape(-1, output.shape[-1])
        return flat.index_select(0, self.out_index_bT.reshape(-1)).view(*self.out_index_bT.shape, flat.shape[-1])


def model_inputs(mb: TokenBatch, mode: PackingMode = "padded", multiple: int = 1) -> ModelInputs:
    """The inputs of micro-batch ``mb`` (already cut to its longest row) in ``mode``."""
    if multiple < 1:
        raise ValueError(f"the sequence-length multiple must be >= 1, got {multiple}")
    pos_bT = mb.output_positions_BT()
    if mode == "padded":
        width = math.ceil(mb.S / multiple) * multiple
        ids_bS = torch.nn.functional.pad(mb.input_ids_BS, (0, width - mb.S)) if width > mb.S else mb.input_ids_BS
        rows_b1 = torch.arange(mb.B, device=pos_bT.device).unsqueeze(1)
        return ModelInputs(ids_bS, rows_b1 * width + pos_bT)
    lens_b = mb.seq_lens_B.to(mb.input_ids_BS.device)
    total = int(lens_b.sum())
    n = math.ceil(total / multiple) * multiple
    keep_bS = torch.arange(mb.S, device=lens_b.device).unsqueeze(0) < lens_b.unsqueeze(1)
    ids_1N = mb.input_ids_BS.new_zeros(1, n)
    ids_1N[0, :total] = mb.input_ids_BS[keep_bS]
    ends_b = lens_b.cumsum(0)
    bounds = [lens_b.new_zeros(1), ends_b] + ([lens_b.new_full((1,), n)] if n > total else [])
    cu_seqlens = torch.cat(bounds)
    index_bT = ((ends_b - lens_b).unsqueeze(1) + pos_bT.to(lens_b.device)).clamp(max=n - 1)
    return ModelInputs(ids_1N, index_bT, mode, cu_seqlens)
