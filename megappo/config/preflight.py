"""What a training run needs beyond a valid config, checked from files alone.

`check_runnable` is what ``--dry-run`` and the start of a run call (``megappo.train``)
before anything expensive, so that a wrong model directory or data file fails in a second,
not after the start-up (or, on Slurm, after the queue). Two kinds of problems:

- *absent* things (a path not set or not there, no GPU for ``backend=nccl``, a run directory
  not writable): the dry run may run on a login node that does not see them, so it warns;
  a run stops with a `ConfigError`;
- *wrong* things that are there (a ``config.json`` that is malformed or names an
  unsupported architecture, a tokenizer with more tokens than the model's vocabulary, a data
  file that is not ``.jsonl``/``.parquet``, a run directory that is a file, an unknown
  ``rollout.sglang`` key): an error in both.

Keys of ``rollout.sglang`` are checked only where SGLang is installed; elsewhere a warning
says they were not. The reward name needs the reward registry (``megappo.data``, a layer
above this one), so the entry point checks it (``megappo.train``).
"""

from __future__ import annotations

import glob
import logging
import os
from typing import Optional

from megappo.config.errors import ConfigError
from megappo.config.model_files import check_hf_model_dir, check_tokenizer_fits, tokenizer_size
from megappo.config.passthrough import check_sglang_args
from megappo.config.presets import uses_critic
from megappo.config.schema import Config

log = logging.getLogger("megappo.config")

DATA_SUFFIXES = (".jsonl", ".parquet")


def gpu_visible() -> bool:
    """An NVIDIA device is visible to this process (device files, ``CUDA_VISIBLE_DEVICES``):
    read without importing torch, so the dry run stays light."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        return False
    return bool(glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/dxg"))  # dxg: CUDA under WSL2


def _existing_ancestor(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _directory_problems(key: str, path: str, errors: list[str], absent: list[str]) -> None:
    """A directory the run writes: it (or the ancestor it is created under) must be a
    writable directory, not a file."""
    if os.path.exists(path) and not os.path.isdir(path):
        errors.append(f"{key}={path!r} is a file, not a directory")
        return
    base = _existing_ancestor(path)
    if not os.path.isdir(base):
        errors.append(f"{key}={path!r} cannot be created: {base!r} is a file, not a directory")
    elif not os.access(base, os.W_OK | os.X_OK):
        what = "is" if base == os.path.abspath(path) else f"would be created under {base!r}, which is"
        absent.append(f"{key}={path!r} {what} not writable (read-only file system or no permission)")


def _model_problems(cfg: Config, errors: list[str]) -> None:
    vocab: dict[str, int] = {}
    for key in ("model.hf_path", "model.critic_hf_path"):
        path = cfg.model.hf_path if key == "model.hf_path" else cfg.model.critic_hf_path
        if path is None or not os.path.isdir(path) or (key == "model.critic_hf_path" and not uses_critic(cfg)):
            continue
        try:
            vocab[key] = check_hf_model_dir(path, key)
        except ValueError as error:
            errors.append(str(error))
    tok_dir = cfg.data.tokenizer_path or cfg.model.hf_path
    if not vocab or tok_dir is None or not os.path.isdir(tok_dir):
        return
    try:
        size = tokenizer_size(tok_dir)
    except ValueError as error:
        errors.append(str(error))
        return
    if size is None:
        log.info("%s has no tokenizer.json: its size against the model's vocabulary is checked at start-up", tok_dir)
        return
    tok_key = "data.tokenizer_path" if cfg.data.tokenizer_path else "model.hf_path"
    for key, vocab_size in vocab.items():
        try:
            check_tokenizer_fits(size, vocab_size, f"{tok_key}={tok_dir!r}", f"{key}={getattr(cfg.model, key.split('.')[1])!r}")
        except ValueError as error:
            errors.append(str(error))


def check_runnable(cfg: Config, *, strict: bool) -> list[str]:
    """Check what a run reads and writes. Wrong things raise `ConfigError` (all of them in
    one message); absent things raise too when ``strict`` and are otherwise (``--dry-run``)
    logged as warnings and returned."""
    errors: list[str] = []
    absent: list[str] = []
    if cfg.model.hf_path is None:
        absent.append("model.hf_path is not set: training needs the model's HF directory (config and tokenizer)")
    for key, value in (("model.hf_path", cfg.model.hf_path), ("model.critic_hf_path", cfg.model.critic_hf_path),
                       ("data.tokenizer_path", cfg.data.tokenizer_path)):
        if value is not None and not os.path.isdir(value):
            (errors if os.path.exists(value) else absent).append(f"{key}={value!r} is not a directory")
    if cfg.model.load_megatron is not None and not os.path.exists(cfg.model.load_megatron):
        absent.append(f"model.load_megatron={cfg.model.load_megatron!r} does not exist")
    _model_problems(cfg, errors)
    if cfg.data.train_path is None:
        absent.append("data.train_path is not set: training needs a .jsonl or .parquet file of prompts")
    for key, value in (("data.train_path", cfg.data.train_path), ("data.eval_path", cfg.data.eval_path)):
        if value is None:
            continue
        if os.path.splitext(value)[1] not in DATA_SUFFIXES:
            errors.append(f"{key}={value!r}: unsupported prompt file type; use one of {', '.join(DATA_SUFFIXES)}")
        elif os.path.isdir(value):
            errors.append(f"{key}={value!r} is a directory, not a file")
        elif not os.path.isfile(value):
            absent.append(f"{key}={value!r} is not a file")
    _directory_problems("train.run_dir", cfg.train.run_dir, errors, absent)
    if cfg.checkpoint.dir is not None:
        _directory_problems("checkpoint.dir", cfg.checkpoint.dir, errors, absent)
    if cfg.parallel.backend == "nccl" and cfg.parallel.device == "auto" and not gpu_visible():
        absent.append("parallel.backend=nccl needs GPUs, and none is visible here (no /dev/nvidia* device; set parallel.backend=auto or gloo)")
    unchecked: list[str] = []  # warned in both modes: the check needs a package this machine lacks
    if cfg.rollout.engine != "embedded":
        try:
            unchecked = check_sglang_args(cfg.rollout.sglang)
        except ConfigError as error:
            errors.append(str(error))
    if errors:
        raise ConfigError("; ".join(errors + (absent if strict else [])))
    if strict and absent:
        raise ConfigError("; ".join(absent))
    for message in absent + unchecked:
        log.warning(message)
    return absent + unchecked

