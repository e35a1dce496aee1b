"""What the dry run catches from files and config alone (issue 14), and the entry point's
one-line answers to user errors during a run. Each case failed (passed silently, or gave a
traceback) before: the model directory's config.json (missing, malformed, unsupported:
gpt2, MoE, gelu, yarn RoPE), a tokenizer larger than the vocabulary, the data path, the
reward name, nccl on CPU, the DP split of the batch, NaN/infinity, rollout.sglang keys
without SGLang, a critic warm-up as long as the run, overrides on both sides of an option,
read-only / full / file-instead-of-directory paths and Ctrl-C."""

from __future__ import annotations

import errno
import json
import logging
import sys
import types
from collections import namedtuple
from pathlib import Path

import pytest

import megappo.config.preflight as preflight
import megappo.train as train_cli
from hf_fixtures import tiny_hf_config, write_char_tokenizer
from megappo.config import ConfigError, check_runnable, load_config
from megappo.config.model_files import check_tokenizer_fits, hf_config_problems, tokenizer_size
from megappo.models.spec import ModelSpec
from megappo.train import main

N2 = "rollout.num_return_sequences_in_group=2"


@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def model_dir(tmp_path: Path, name: str = "model", config: dict | str | None = None, **changes) -> Path:
    """A model directory holding only a config.json (a tiny Llama unless ``config`` is given)."""
    out = tmp_path / name
    out.mkdir()
    if config is None:
        config = tiny_hf_config("llama", max_position_embeddings=4096, **changes)
    (out / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return out


def data_file(tmp_path: Path, name: str = "train.jsonl") -> Path:
    out = tmp_path / name
    out.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    return out


def argv(tmp_path: Path, model: Path, *extra: str, data: Path | None = None) -> list[str]:
    return ["--dry-run", N2, f"model.hf_path={model}", f"data.train_path={data or data_file(tmp_path)}",
            f"train.run_dir={tmp_path / 'run'}", "reward.fn=toy", "data.prompt_length=64", "rollout.response_length=64",
            *extra]


def dry_run_error(args: list[str], capsys: pytest.CaptureFixture) -> str:
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and "Traceback" not in captured.err
    return captured.err


def test_a_good_setup_passes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(argv(tmp_path, model_dir(tmp_path))) == 0
    assert "hf_path:" in capsys.readouterr().out


# ---------------------------------------------------------------------- the model's files

GPT2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 101}
MOE_UNSUPPORTED = {**tiny_hf_config("qwen2"), "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "n_routed_experts": 8}
MIXTRAL = {**tiny_hf_config("mistral"), "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "num_local_experts": 8}


@pytest.mark.parametrize(
    "config, needle",
    [
        ("{not json", "config.json: malformed JSON at line 1"),
        ("[1, 2]", "config.json: expected a JSON object, got list"),
        (GPT2, "unsupported model_type 'gpt2' (architectures ['GPT2LMHeadModel']); megappo supports llama"),
        (MOE_UNSUPPORTED, "unsupported model_type 'deepseek_v3'"),
        (MIXTRAL, "num_experts_per_tok missing or not a positive integer (None)"),  # Mixtral is supported; its MoE fields are checked
        ({**tiny_hf_config("llama"), "num_local_experts": 4}, "mixture-of-experts settings {'num_local_experts': 4}"),
        ({**tiny_hf_config("llama"), "hidden_act": "gelu"}, "hidden_act 'gelu' (only silu / SwiGLU is supported)"),
        ({**tiny_hf_config("llama"), "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
        ({**tiny_hf_config("llama"), "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
    ],
)
def test_dry_run_rejects_an_unusable_config_json(tmp_path, capsys, config, needle) -> None:
    model = model_dir(tmp_path, config=config)
    err = dry_run_error(argv(tmp_path, model), capsys)
    assert f"model.hf_path='{model}'" in err and needle in err
    if isinstance(config, dict):  # the same verdict as the model builder's (one check, two callers)
        with pytest.raises(ValueError) as built:
            ModelSpec.from_hf_config(config)
        assert needle.split(" (")[0] in str(built.value)


def test_dry_run_rejects_a_model_directory_without_config_json(tmp_path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no config.json (is this a HuggingFace model directory?)" in dry_run_error(argv(tmp_path, empty), capsys)


def test_supported_configs_have_no_problems() -> None:
    for family in ("llama", "qwen2", "qwen3", "mistral"):
        assert hf_config_problems(tiny_hf_config(family)) == []


def test_a_missing_model_directory_is_a_dry_run_warning_and_a_start_up_error(tmp_path, capsys, caplog) -> None:
    args = argv(tmp_path, tmp_path / "nowhere")
    assert main(args) == 0  # a login node may not see the model
    assert "model.hf_path=" in caplog.text and "is not a directory" in caplog.text
    capsys.readouterr()
    assert "is not a directory" in dry_run_error([a for a in args if a != "--dry-run"], capsys)


# ---------------------------------------------------------------------- tokenizer vs vocabulary (bug 7)

def test_tokenizer_size_is_what_transformers_counts(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    write_char_tokenizer(tmp_path, 60)
    assert tokenizer_size(str(tmp_path)) == len(AutoTokenizer.from_pretrained(tmp_path)) == 60
    assert tokenizer_size(str(tmp_path / "none")) is None


def test_a_tokenizer_larger_than_the_vocabulary_is_caught(tmp_path, capsys) -> None:
    model = model_dir(tmp_path, vocab=50)
    tok = tmp_path / "tok"
    tok.mkdir()
    write_char_tokenizer(tok, 80)  # ids up to 79 for a model with 50 embedding rows
    err = dry_run_error(argv(tmp_path, model, f"data.tokenizer_path={tok}"), capsys)
    assert f"the tokenizer (data.tokenizer_path='{tok}') has 80 tokens but the model (model.hf_path='{model}') has vocab_size=50" in err
    write_char_tokenizer(model, 50)  # the model's own tokenizer fits
    assert main(argv(tmp_path, model)) == 0
    with pytest.raises(ValueError, match="has 51 tokens but the model .* has vocab_size=50"):
        check_tokenizer_fits(51, 50, "tok", "model")  # the start-up check, given len(tokenizer)
    check_tokenizer_fits(40, 50, "tok", "model")  # fewer tokens than rows (padded vocabularies) is fine


# ---------------------------------------------------------------------- data, reward, backend

@pytest.mark.parametrize("name, needle", [
    ("train.csv", "data.train_path='{path}': unsupported prompt file type; use one of .jsonl, .parquet"),
    ("train.json", "unsupported prompt file type"),
])
def test_data_files_must_be_jsonl_or_parquet(tmp_path, capsys, name, needle) -> None:
    data = data_file(tmp_path, name)
    err = dry_run_error(argv(tmp_path, model_dir(tmp_path), data=data), capsys)
    assert needle.format(path=data) in err


def test_a_data_path_that_is_a_directory_or_missing(tmp_path, capsys, caplog) -> None:
    folder = tmp_path / "data.jsonl"
    folder.mkdir()
    assert "is a directory, not a file" in dry_run_error(argv(tmp_path, model_dir(tmp_path), data=folder), capsys)
    args = argv(tmp_path, tmp_path / "model", data=tmp_path / "missing.jsonl")
    assert main(args) == 0 and "data.train_path=" in caplog.text and "is not a file" in caplog.text
    capsys.readouterr()
    assert "missing.jsonl' is not a file" in dry_run_error([a for a in args if a != "--dry-run"], capsys)


def test_an_unknown_reward_name_is_a_dry_run_error(tmp_path, capsys) -> None:
    err = dry_run_error(argv(tmp_path, model_dir(tmp_path), "reward.fn=gsm8kk"), capsys)
    assert "reward.fn='gsm8kk' is not a registered reward function" in err and "Did you mean 'gsm8k'?" in err
    err = dry_run_error(argv(tmp_path, tmp_path / "m", "reward.fn=no_such_module_xyz:score"), capsys)
    assert "cannot import no_such_module_xyz" in err


def test_nccl_on_cpu(tmp_path, capsys, caplog, monkeypatch) -> None:
    err = dry_run_error(argv(tmp_path, model_dir(tmp_path), "parallel.backend=nccl", "parallel.device=cpu"), capsys)
    assert "parallel.backend=nccl needs GPUs, but parallel.device=cpu" in err
    monkeypatch.setattr(preflight, "gpu_visible", lambda: False)
    args = argv(tmp_path, tmp_path / "model", "parallel.backend=nccl")
    assert main(args) == 0 and "parallel.backend=nccl needs GPUs, and none is visible here" in caplog.text
    capsys.readouterr()
    assert "none is visible here" in dry_run_error([a for a in args if a != "--dry-run"], capsys)



def test_gpu_visible_honours_cuda_visible_devices(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not preflight.gpu_visible()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert preflight.gpu_visible() == bool(preflight.glob.glob("/dev/nvidia[0-9]*") or Path("/dev/dxg").exists())


# ---------------------------------------------------------------------- layout and numbers

def test_dry_run_catches_the_data_parallel_split_of_the_prompts(capsys) -> None:
    """Bug 8: 3 prompts at DP 2 passed the dry run (their responses split), then the loader refused."""
    err = dry_run_error(["--dry-run", N2, "train.rollout_batch_size=3", "--world-size", "2"], capsys)
    assert "train.rollout_batch_size=3 prompts do not split over data-parallel size 2 (world size 2 / (TP 1 x PP 1))" in err
    err = dry_run_error(["--dry-run", N2, "train.rollout_batch_size=6", "parallel.tensor_model_parallel_size=2",
                         "--world-size", "8"], capsys)
    assert "data-parallel size 4 (world size 8 / (TP 2 x PP 1))" in err
    assert main(["--dry-run", N2, "train.rollout_batch_size=8", "parallel.tensor_model_parallel_size=2",
                 "--world-size", "8"]) == 0


@pytest.mark.parametrize("override, needle", [
    ("optim.lr=.inf", "optim.lr must be a finite number, got inf"),
    ("optim.lr=-.inf", "optim.lr must be a finite number, got -inf"),
    ("algo.gamma=.nan", "algo.gamma must be a finite number, got nan"),
    ("reward.timeout_s=.inf", "reward.timeout_s must be a finite number"),
    ("model.megatron.attention_dropout=.nan", "model.megatron.attention_dropout must be a finite number"),
    ("rollout.sglang.mem_fraction_static=.inf", "rollout.sglang.mem_fraction_static must be a finite number"),
])
def test_non_finite_numbers_are_rejected(override, needle, capsys) -> None:
    """Bug 10: optim.lr=.inf passed validation and turned the weights to NaN."""
    assert needle in dry_run_error(["--dry-run", N2, override], capsys)


def test_sglang_keys_unchecked_without_sglang_is_a_warning(tmp_path, caplog, monkeypatch) -> None:
    import megappo.config.passthrough as passthrough

    monkeypatch.setattr(passthrough, "server_args_fields", lambda: (None, "SGLang is not installed here"))
    cfg = load_config(None, [N2, "rollout.engine=sglang", "parallel.device=cuda", "rollout.sglang.mem_fraction_statc=0.5",
                             f"train.run_dir={tmp_path}"])
    problems = check_runnable(cfg, strict=False)
    assert any("rollout.sglang keys ['mem_fraction_statc'] were not checked" in p for p in problems)
    assert "were not checked" in caplog.text
    fields = frozenset({"mem_fraction_static", "tp_size"})
    monkeypatch.setattr(passthrough, "server_args_fields", lambda: (fields, "sglang/srt/server_args.py"))
    with pytest.raises(ConfigError, match="unknown key 'mem_fraction_statc' in rollout.sglang.*did you mean 'mem_fraction_static'"):
        check_runnable(cfg, strict=False)


def test_critic_warmup_as_long_as_the_run_is_a_warning(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="megappo.config"):
        load_config(None, [N2, "algo.preset=ppo", "train.steps=5", "algo.critic_warmup_steps=5"])
    assert "algo.critic_warmup_steps=5 >= train.steps=5: the actor is never trained" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megappo.config"):
        load_config(None, [N2, "algo.preset=ppo", "train.steps=5", "algo.critic_warmup_steps=4"])
    assert "critic_warmup_steps" not in caplog.text


def test_overrides_on_both_sides_of_an_option(capsys) -> None:
    assert main(["train.steps=7", "--dry-run", N2, "--world-size", "1", "optim.lr=0.5"]) == 0
    out = capsys.readouterr().out
    assert "steps: 7" in out and "lr: 0.5" in out and "world size 1" in out


# ---------------------------------------------------------------------- run directories

def test_a_run_or_checkpoint_directory_that_is_a_file(tmp_path, capsys) -> None:
    model = model_dir(tmp_path)
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    err = dry_run_error(argv(tmp_path, model, f"train.run_dir={blocker}"), capsys)
    assert f"train.run_dir='{blocker}' is a file, not a directory" in err
    err = dry_run_error(argv(tmp_path, model, f"checkpoint.dir={blocker / 'ckpt'}"), capsys)
    assert f"checkpoint.dir='{blocker / 'ckpt'}' cannot be created: '{blocker}' is a file" in err


def test_a_read_only_run_directory_stops_the_start(tmp_path, capsys, caplog, monkeypatch) -> None:
    # os.access is faked: these tests may run as root, for whom every directory is writable.
    model, data = model_dir(tmp_path), data_file(tmp_path)
    run = tmp_path / "ro"
    run.mkdir()
    monkeypatch.setattr(preflight.os, "access", lambda path, mode: Path(path) != run)
    args = argv(tmp_path, model, f"train.run_dir={run}", data=data)
    assert main(args) == 0 and "is not writable (read-only file system or no permission)" in caplog.text
    capsys.readouterr()
    assert f"train.run_dir='{run}' is not writable" in dry_run_error([a for a in args if a != "--dry-run"], capsys)


# ---------------------------------------------------------------------- errors during a run

@pytest.fixture
def fake_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Train with a stand-in trainer whose ``run`` raises what the test sets."""
    fake = types.ModuleType("megappo.trainer")
    monkeypatch.setitem(sys.modules, "megappo.trainer", fake)
    args = [a for a in argv(tmp_path, model_dir(tmp_path)) if a != "--dry-run"]

    def go(error: BaseException) -> int:
        def run(cfg):
            raise error
        fake.run = run
        return main(args)

    return go


@pytest.mark.parametrize("error, code, needle", [
    (OSError(errno.ENOSPC, "No space left on device", "/run/ckpt/x.pt"), 1, "No space left on device: /run/ckpt/x.pt"),
    (OSError(errno.EROFS, "Read-only file system", "/run/metrics.jsonl"), 1, "read-only file system: /run/metrics.jsonl"),
    (PermissionError(errno.EACCES, "Permission denied", "/run"), 1, "permission denied: /run"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/run/ckpt"), 1, "a path component is a file"),
    (FileExistsError(errno.EEXIST, "File exists", "/run/ckpt"), 1, "exists and is in the way"),
    (KeyboardInterrupt(), 130, "interrupted (Ctrl-C)"),
])
def test_user_errors_during_a_run_are_one_line(fake_run, capsys, error, code, needle) -> None:
    assert fake_run(error) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_wrapped_disk_full_error_is_found_in_the_chain(fake_run, capsys) -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/ckpt/shard")
        except OSError as inner:
            raise RuntimeError("checkpoint save failed") from inner
    except RuntimeError as outer:
        wrapped = outer
    assert fake_run(wrapped) == 1 and "No space left on device: /ckpt/shard" in capsys.readouterr().err


def test_an_errno_less_error_on_a_full_disk_says_no_space(fake_run, capsys, monkeypatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(train_cli.shutil, "disk_usage", lambda path: usage(100, 100, 0))
    assert fake_run(RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")) == 1
    err = capsys.readouterr().err
    assert "No space left on device:" in err and "0 bytes free" in err and "file write failed" in err


def test_real_bugs_keep_their_traceback(fake_run) -> None:
    with pytest.raises(RuntimeError, match="a bug"):
        fake_run(RuntimeError("a bug"))
    with pytest.raises(OSError, match="Bad file descriptor"):
        fake_run(OSError(errno.EBADF, "Bad file descriptor"))
