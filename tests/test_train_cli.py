"""The entry point: --dry-run output, exit codes, rank-0 printing, hand-off to the trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from hf_fixtures import tiny_hf_config
from megappo.train import main

ROOT = Path(__file__).resolve().parent.parent
LITEPPO = str(ROOT / "recipes" / "gsm8k_liteppo.yaml")


@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def test_dry_run_prints_the_resolved_config(capsys: pytest.CaptureFixture) -> None:
    assert main(["--config", LITEPPO, "--dry-run"]) == 0
    out = capsys.readouterr().out
    for line in ("mean_level: group", "std_level: batch", "loss_agg_mode: token-mean", "preset: liteppo"):
        assert line in out
    resolved = yaml.safe_load(out)
    assert resolved["algo"]["adv_norm"] == {"mean_level": "group", "std_level": "batch", "eps": 1e-6}
    assert "DP ?" in out


def test_dry_run_overrides_and_world_size(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["--config", LITEPPO, "--dry-run", "--world-size", "8", "algo.adv_norm.std_level=group"]) == 0
    out = capsys.readouterr().out
    assert "std_level: group" in out and "world size 8 = TP 2 x PP 1 x DP 4" in out
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert main(["--config", LITEPPO, "--dry-run"]) == 0
    assert "world size 16 = TP 2 x PP 1 x DP 8" in capsys.readouterr().out


def test_dry_run_warns_about_missing_data(tmp_path: Path, capsys, caplog: pytest.LogCaptureFixture) -> None:
    assert main(["--dry-run", "rollout.num_return_sequences_in_group=4"]) == 0
    assert "data.train_path is not set" in caplog.text


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--config", LITEPPO, "--dry-run", "algo.adv_norm.mean_levl=group"], "did you mean 'mean_level'"),
        (["--config", LITEPPO, "--dry-run", "--world-size", "6"], "do not split over data-parallel size 3"),
        (["--config", LITEPPO, "--dry-run", "--world-size", "7"], "world size 7 is not divisible"),
        (["--config", "no/such/recipe.yaml", "--dry-run"], "config file not found: no/such/recipe.yaml"),
        (["--config", LITEPPO, "--dry-run", "train.steps=many"], "train.steps: expected int"),
        (["--config", LITEPPO], "world size 1 is not divisible"),  # plain `python -m`: one process
        (["--config", LITEPPO, "parallel.tensor_model_parallel_size=1"], "is not a directory"),  # training needs the files
    ],
)
def test_user_errors_exit_2_with_a_message(argv: list[str], needle: str, capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and needle in captured.err
    assert captured.out == ""


def test_bad_world_size_environment(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("WORLD_SIZE", "eight")
    assert main(["--config", LITEPPO, "--dry-run"]) == 2
    assert "WORLD_SIZE='eight' is not an integer" in capsys.readouterr().err


def test_only_rank_0_prints(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert main(["--config", LITEPPO, "--dry-run"]) == 0
    assert main(["--config", LITEPPO, "--dry-run", "train.stepz=1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    monkeypatch.setenv("LOCAL_RANK", "0")  # first rank of another node: one line per node
    assert main(["--config", LITEPPO, "--dry-run", "train.stepz=1"]) == 2
    assert capsys.readouterr().err.startswith("[rank 3] error: unknown key 'stepz'")


def test_training_hands_the_config_to_the_trainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(tiny_hf_config("llama", heads=4, kv_heads=2, layers=2, max_position_embeddings=2048)))
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    seen = []
    fake = types.ModuleType("megappo.trainer")
    fake.run = lambda cfg: seen.append(cfg) or 0
    monkeypatch.setitem(sys.modules, "megappo.trainer", fake)
    argv = [f"model.hf_path={model}", f"data.train_path={data}", "algo.preset=liteppo", "rollout.num_return_sequences_in_group=2"]
    assert main(argv) == 0
    (cfg,) = seen
    assert cfg.algo.adv_norm.std_level == "batch" and cfg.data.train_path == str(data)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*argv, "parallel.tensor_model_parallel_size=2"]) == 0  # 2 ranks = TP 2 x DP 1
    assert main([*argv, "parallel.tensor_model_parallel_size=4"]) == 2  # needs 4 ranks (and 4 heads is fine)
    fake.run = lambda cfg: 124  # the trainer's status is the process's (a preemption code, say)
    assert main(argv) == 124


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )


def test_module_dry_run_in_a_subprocess_is_fast_and_imports_no_torch() -> None:
    # rollout.sglang emptied: its keys are checked by importing SGLang (and torch) where installed.
    proc = _run("-X", "importtime", "-m", "megappo.train", "--config", "recipes/gsm8k_liteppo.yaml", "--dry-run",
                "rollout.sglang={}")
    assert proc.returncode == 0, proc.stderr
    for line in ("mean_level: group", "std_level: batch", "loss_agg_mode: token-mean"):
        assert line in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "megappo.config" in imported
    assert not {m for m in imported if m.split(".")[0] in ("torch", "megatron", "transformers")}


def test_module_user_error_in_a_subprocess_has_no_traceback() -> None:
    proc = _run("-m", "megappo.train", "--config", "recipes/gsm8k_liteppo.yaml", "--dry-run", "algo.adv_norm.mean_levl=group")
    assert proc.returncode == 2
    assert "mean_level" in proc.stderr and proc.stderr.startswith("error: ")
    assert "Traceback" not in proc.stderr
