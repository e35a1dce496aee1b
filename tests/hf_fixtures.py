"""Tiny random HuggingFace models for tests (nothing is downloaded).

Import from a test module as ``from hf_fixtures import make_tiny_hf_model`` (pytest puts
``tests/`` on ``sys.path``), or from a torchrun script after adding ``tests/`` to the path.

``make_tiny_hf_model(tmp_path, family, ...)`` builds a transformers model from a config
with seeded random weights (norm weights and biases randomized too, so a mapping that
swaps or drops one is caught), saves it with ``save_pretrained`` in float32 and returns the
directory. Families: llama, qwen2, qwen3, mistral. The signature is stable; add keyword
arguments at the end only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
MOE_FAMILIES = ("qwen3_moe", "mixtral", "qwen2_moe")

_ARCH = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
}


def tiny_hf_config(
    family: str,
    *,
    tie: bool = False,
    vocab: int = 101,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    hidden: int = 64,
    ffn: int = 96,
    head_dim: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A config.json dict for a tiny model of ``family`` (an odd vocabulary by default, so
    TP=2 needs a padded row)."""
    if family not in FAMILIES + MOE_FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES + MOE_FAMILIES}; got {family!r}")
    cfg: dict[str, Any] = dict(
        model_type=family,
        architectures=[_ARCH[family]],
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
        hidden_act="silu",
        initializer_range=0.02,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family in ("qwen3", "qwen3_moe"):
        cfg["head_dim"] = head_dim or 16
    elif head_dim is not None:
        cfg["head_dim"] = head_dim
    if family in ("mistral", "mixtral"):
        cfg["sliding_window"] = None
    if family == "qwen3_moe":
        # Tiny MoE defaults: 4 experts, top-2, experts narrower than the dense MLP.
        cfg.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=ffn // 2, norm_topk_prob=True,
                   decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.001)
    if family == "qwen2_moe":
        cfg.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=ffn // 2, norm_topk_prob=False,
                   shared_expert_intermediate_size=ffn, decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=True)
    if family == "mixtral":
        cfg.update(num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.02, router_jitter_noise=0.0)
    cfg.update(extra)
    return cfg


def make_tiny_hf_model(
    tmp_path: str | Path,
    family: str,
    *,
    tie: bool = False,
    vocab: int = 101,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    hidden: int = 64,
    ffn: int = 96,
    head_dim: int | None = None,
    seed: int = 0,
    max_shard_size: str | int | None = None,
    name: str | None = None,
    tokenizer: bool = False,
    **extra: Any,
) -> Path:
    """Save a tiny random ``family`` model under ``tmp_path/name`` and return that path.

    ``max_shard_size`` (e.g. ``"20KB"``) writes several safetensors shards and an index.
    ``tokenizer`` also writes a character-level ``tokenizer.json`` (fast tokenizer).
    ``extra`` goes into the config (e.g. ``attention_bias=True``).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = tiny_hf_config(
        family, tie=tie, vocab=vocab, layers=layers, heads=heads, kv_heads=kv_heads,
        hidden=hidden, ffn=ffn, head_dim=head_dim, **extra,
    )
    out = Path(tmp_path) / (name or f"{family}-{'tied' if tie else 'untied'}")
    config = AutoConfig.for_model(**cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif pname.endswith(".bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.05 * noise)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, **kwargs)
    if tokenizer:
        write_char_tokenizer(out, vocab)
    return out


def write_char_tokenizer(out: str | Path, vocab: int, reverse: bool = False, fused_decode: bool = False) -> None:
    """A character-level fast tokenizer with ids < ``vocab`` (specials 0-2), saved in ``out``.
    ``reverse`` numbers the characters in the opposite order (another vocabulary, same size);
    ``fused_decode`` decodes without spaces between characters (as a real tokenizer would)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)][: vocab - 3]
    if reverse:
        chars = chars[::-1]
    table = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=table, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    if fused_decode:
        tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)


def read_hf_state(path: str | Path) -> dict:
    """Every tensor of a saved HF directory (all safetensors files), by name."""
    from safetensors.torch import load_file

    state = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(f))
    return state


def read_config(path: str | Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


# ---- a shared zoo and a launcher for multi-rank scripts -------------------------------

_ZOO: dict[str, Path] = {}


def model_zoo() -> dict[str, Path]:
    """Every family tied and untied (4 layers, vocabulary 103, so TP=2 pads a row and
    PP=2 x VPP=2 has a layer per chunk), built once per test session in a temporary
    directory. Keys: ``"{family}-tied"`` / ``"{family}-untied"``; and two variants whose
    positions matter within the 16-token test sequences: ``"llama-rope-llama3"`` (Llama 3's
    RoPE frequency scaling, original context 8) and ``"mistral-window"`` (a sliding window
    of 6 tokens)."""
    if not _ZOO:
        import atexit
        import shutil
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="megappo-zoo-"))
        atexit.register(shutil.rmtree, root, True)
        for family in FAMILIES:
            for tie in (False, True):
                path = make_tiny_hf_model(root, family, tie=tie, layers=4, vocab=103, tokenizer=True)
                _ZOO[path.name] = path
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8}
        variants = {"llama-rope-llama3": ("llama", dict(rope_scaling=rope)), "mistral-window": ("mistral", dict(sliding_window=6))}
        for name, (family, extra) in variants.items():
            path = make_tiny_hf_model(root, family, layers=4, vocab=103, tokenizer=True, name=name, seed=5, **extra)
            _ZOO[name] = path
    return dict(_ZOO)


REPO_ROOT = Path(__file__).resolve().parent.parent


def run_mp(script: str | Path, nproc: int, args: list[str], *, timeout: float = 600) -> None:
    """Run a ``tests/mp`` script under ``torchrun --standalone --nproc-per-node nproc`` (a
    plain ``python`` process when ``nproc`` is 1) with the repository and ``tests/``
    importable; raise ``AssertionError`` with the output's tail when it fails.

    Output goes to a file, not a pipe: a rank killed on purpose can leave helper processes
    behind (dist_checkpointing's multiprocessing manager) that would hold a pipe open.
    Those helpers carry this launch's ``MEGAPPO_TEST_LAUNCH`` marker in their environment
    and are ended by process id afterwards.
    """
    import os
    import subprocess
    import sys
    import tempfile
    import uuid

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests"), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env["CUDA_VISIBLE_DEVICES"] = ""  # the mp scripts run Megatron on the CPU, also on a GPU host
    env["PYTHONWARNINGS"] = "ignore"
    env["MEGAPPO_TEST_LAUNCH"] = marker = uuid.uuid4().hex
    if nproc == 1:
        cmd = [sys.executable, str(script), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), str(script), *args]
    with tempfile.TemporaryFile(mode="w+") as log:
        try:
            proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
        finally:
            _end_marked_processes(marker)
        log.seek(0)
        output = log.read()
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[:6])} ... exited {proc.returncode}:\n{output[-6000:]}")


def _end_marked_processes(marker: str) -> None:
    """SIGKILL the leftover processes whose environment carries this launch's marker."""
    import os
    import signal

    needle = f"MEGAPPO_TEST_LAUNCH={marker}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    os.kill(int(pid), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


def assert_diffs_small(results: dict, *names: str, tol: float) -> None:
    """Every named check of a model-checks run (``results["diffs"]``: max abs differences)
    ran and stayed within ``tol``."""
    diffs = results["diffs"]
    missing = [n for n in names if n not in diffs]
    assert not missing, f"checks did not run: {missing}"
    bad = {n: diffs[n] for n in names if not diffs[n] <= tol}
    assert not bad, f"max abs differences above {tol}: {bad}"


# ---- reward models ------------------------------------------------------------------------

_RM_ARCH = {
    "llama": "LlamaForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
    "qwen3": "Qwen3ForSequenceClassification",
    "mistral": "MistralForSequenceClassification",
}


def make_tiny_hf_reward_model(
    tmp_path: str | Path,
    family: str,
    *,
    tie: bool = False,
    vocab: int = 103,
    layers: int = 4,
    seed: int = 0,
    num_labels: int = 1,
    name: str | None = None,
    tokenizer: bool = True,
    **extra: Any,
) -> Path:
    """A tiny random ``*ForSequenceClassification`` (``score`` head without bias, ``num_labels``
    outputs, ``pad_token_id`` 0) saved under ``tmp_path/name``, with every weight
    randomized as in ``make_tiny_hf_model``."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = tiny_hf_config(family, tie=tie, vocab=vocab, layers=layers, **extra)
    cfg["architectures"] = [_RM_ARCH[family]]
    out = Path(tmp_path) / (name or f"rm-{family}-{'tied' if tie else 'untied'}")
    config = AutoConfig.for_model(**cfg, num_labels=num_labels, pad_token_id=0)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif pname.endswith(".bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.05 * noise)
    model.save_pretrained(out)
    if tokenizer:
        write_char_tokenizer(out, vocab)
    return out


def hf_reward_scores(path: str | Path, seqs: list[list[int]]) -> "Any":
    """transformers' scores [B] of right-padded ``seqs`` (pad id 0, which the sequences
    must not contain): ``AutoModelForSequenceClassification`` pools the last non-pad token."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[:, 0].float()
