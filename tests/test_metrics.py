"""Metrics (megappo.metrics): jsonl, TensorBoard, console, resume, timers, progress, plot."""

from __future__ import annotations

import json
import logging
import math

import pytest

from megappo.config.schema import LoggingConfig
from megappo.metrics import MetricsLogger, Timer, format_console_line, load_metrics, plot_metrics, progress


def read_tensorboard(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), purge_orphaned_data=True)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_jsonl_tensorboard_and_console(tmp_run_dir, caplog):
    with caplog.at_level(logging.INFO, logger="megappo.metrics"):
        with MetricsLogger.from_config(LoggingConfig(console_every=2), tmp_run_dir, rank=0) as metrics:
            for step in range(1, 5):
                metrics.log(step, {"time/step": 0.5 * step, "reward/mean": step / 10, "extra/count": step})
    lines = (tmp_run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": s, "time/step": 0.5 * s, "reward/mean": s / 10, "extra/count": s} for s in range(1, 5)
    ]
    console = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step")]
    assert console == ["step 2 | reward/mean 0.2 | time/step 1", "step 4 | reward/mean 0.4 | time/step 2"]
    scalars = read_tensorboard(tmp_run_dir / "tensorboard")
    assert scalars["reward/mean"] == [(s, pytest.approx(s / 10)) for s in range(1, 5)]
    assert set(scalars) == {"time/step", "reward/mean", "extra/count"}


def test_only_rank0_writes(tmp_run_dir):
    with MetricsLogger(tmp_run_dir, tensorboard=True, rank=1) as metrics:
        metrics.log(1, {"a": 1.0})
    assert list(tmp_run_dir.iterdir()) == []


def test_resume_drops_later_steps_everywhere(tmp_run_dir):
    with MetricsLogger(tmp_run_dir) as metrics:
        for step in range(1, 6):
            metrics.log(step, {"reward/mean": float(step)})
    with (tmp_run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "reward/me')  # torn by a crash
    # The checkpoint was at step 3: steps 4-6 are redone. The logger is built before the
    # checkpoint is loaded and touches nothing until start().
    with MetricsLogger(tmp_run_dir) as metrics:
        assert len(load_metrics(tmp_run_dir / "metrics.jsonl")) == 5
        metrics.start(3)
        for step in range(4, 7):
            metrics.log(step, {"reward/mean": 10.0 * step})
    records = load_metrics(tmp_run_dir / "metrics.jsonl")
    assert [(r["step"], r["reward/mean"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]
    scalars = read_tensorboard(tmp_run_dir / "tensorboard")["reward/mean"]
    assert scalars == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]


def test_resume_step_argument_and_start_twice(tmp_run_dir):
    with MetricsLogger(tmp_run_dir, tensorboard=False) as metrics:
        metrics.log(1, {"a": 1})
        metrics.log(2, {"a": 2})
        with pytest.raises(RuntimeError, match="already open"):
            metrics.start(1)
    with MetricsLogger(tmp_run_dir, tensorboard=False, resume_step=1) as metrics:
        metrics.log(2, {"a": 20})
    assert [(r["step"], r["a"]) for r in load_metrics(tmp_run_dir / "metrics.jsonl")] == [(1, 1), (2, 20)]
    with pytest.raises(RuntimeError, match="after close"):
        metrics.log(3, {"a": 3})


def test_fresh_run_moves_old_file_aside(tmp_run_dir):
    with MetricsLogger(tmp_run_dir, tensorboard=False) as metrics:
        metrics.log(1, {"a": 1})
    with MetricsLogger(tmp_run_dir, tensorboard=False) as metrics:
        metrics.log(1, {"a": 2})
    assert [r["a"] for r in load_metrics(tmp_run_dir / "metrics.jsonl")] == [2]
    assert [r["a"] for r in load_metrics(tmp_run_dir / "metrics.jsonl.prev")] == [1]


def test_values_and_errors(tmp_run_dir):
    with MetricsLogger(tmp_run_dir, tensorboard=False) as metrics:
        metrics.log(0, {"flag": True, "nan": float("nan")})
        with pytest.raises(TypeError, match="metric 'bad' is not a scalar"):
            metrics.log(1, {"bad": [1, 2]})
        with pytest.raises(ValueError, match="'step' is not a metric name"):
            metrics.log(1, {"step": 3})
    (record,) = load_metrics(tmp_run_dir / "metrics.jsonl")
    assert record["flag"] == 1 and math.isnan(record["nan"])


def test_console_line_order():
    line = format_console_line(7, {"z": 1.0, "time/step": 2.0, "reward/mean": 0.123456}, keys=("reward/mean", "time/step"))
    assert line == "step 7 | reward/mean 0.1235 | time/step 2"


def test_timer_accumulates():
    sink: dict[str, float] = {}
    calls = []
    for _ in range(2):
        with Timer("time/reward", sink, sync=lambda: calls.append(1)) as timer:
            pass
    assert sink["time/reward"] >= timer.elapsed >= 0.0 and len(calls) == 4


def test_progress_silent_without_terminal():
    bar = progress([1, 2, 3], "steps")  # pytest captures stderr: not a terminal
    assert bar.disable and list(bar) == [1, 2, 3]
    counter = progress(5, "rollout", rank=1)
    counter.update(2)
    counter.close()


def test_plot_writes_png(tmp_run_dir):
    with MetricsLogger(tmp_run_dir, tensorboard=False) as metrics:
        for step in range(5):
            metrics.log(step, {"reward/mean": step * 0.1, **({"eval/accuracy": 0.5} if step % 2 == 0 else {})})
    png = plot_metrics(tmp_run_dir / "metrics.jsonl", tmp_run_dir / "plots" / "curves.png", keys=("reward/mean", "eval/accuracy", "absent"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def _logged_names() -> set[str]:
    """Metric names the code makes: every "<group>/<name>" string literal in megappo/
    (metrics.py aside), plus "<role>/<key>" for the keys of the loss functions' metrics,
    which the trainer prefixes with the role ("actor", "critic") of the model it updates."""
    import ast
    import re
    from pathlib import Path

    import torch

    from megappo import algo

    root = Path(__file__).resolve().parent.parent / "megappo"
    names = set()
    for path in root.rglob("*.py"):
        if path.name == "metrics.py" and path.parent == root:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"[a-z_]+/[a-z_0-9]+", node.value):
                names.add(node.value)
    x = torch.zeros(2, 3)
    mask = torch.ones(2, 3)
    _, actor = algo.policy_loss(x, x, x, mask, clip_low=0.2, clip_high=0.2, entropy=x)
    _, kl = algo.kl_loss(x, x, mask)
    _, critic = algo.value_loss(x, x, x, mask)
    names |= {f"actor/{k}" for k in [*actor, *kl, "loss", "grad_norm", "lr"]}
    names |= {f"critic/{k}" for k in [*critic, "loss", "grad_norm", "lr"]}
    return names


def test_every_console_key_is_a_logged_name():
    from megappo.metrics import CONSOLE_KEYS

    logged = _logged_names()
    assert {"reward/mean", "time/step", "actor/pg_loss", "critic/vf_loss"} <= logged  # the scan finds them
    assert not {"actor/kl", "response/length_mean"} & logged  # nor names that no code makes
    assert [k for k in CONSOLE_KEYS if k not in logged] == []
