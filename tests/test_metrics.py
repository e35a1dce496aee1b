"""Metrics (megappo.metrics): jsonl, TensorBoard, console, resume, timers, progress, plot."""

from __future__ import annotations

import json
import logging
import math
import time

import pytest

from megappo.config.schema import LoggingConfig
from megappo.metrics import (
    MetricsLogger,
    Timer,
    format_console_line,
    format_duration,
    load_metrics,
    plot_metrics,
    progress,
)
from megappo.metrics_sinks import WandbSettings


def read_tensorboard(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), purge_orphaned_data=True)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_tensorboard_text(logdir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), purge_orphaned_data=True, size_guidance={"tensors": 0})
    acc.Reload()
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]


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


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_console_line_has_progress_eta_and_the_training_health_keys(tmp_run_dir, caplog, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr("megappo.metrics.time.monotonic", clock)
    actor = {"actor/kl_ref": 0.0123, "actor/pg_clipfrac": 0.05, "actor/grad_norm": 1.5, "actor/lr": 1e-6, "actor/pg_loss": -0.2}
    with caplog.at_level(logging.INFO, logger="megappo.metrics"):
        with MetricsLogger(tmp_run_dir, tensorboard=False, total_steps=10) as metrics:
            metrics.start(0)
            for step in (1, 2):
                clock.now += 6.0  # six seconds a step, evaluation and saving included
                metrics.log(step, {"reward/mean": 0.5, "time/step": 5.0, **actor})
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step")]
    health = "actor/kl_ref 0.0123 | actor/pg_clipfrac 0.05 | actor/grad_norm 1.5 | actor/lr 1e-06 | actor/pg_loss -0.2"
    assert lines == [
        f"step 1/10 | eta 54s | reward/mean 0.5 | {health} | time/step 5",
        f"step 2/10 | eta 48s | reward/mean 0.5 | {health} | time/step 5",
    ]


def test_eta_after_resume_and_before_a_step_is_done(tmp_run_dir, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr("megappo.metrics.time.monotonic", clock)
    with MetricsLogger(tmp_run_dir, tensorboard=False, total_steps=100, resume_step=40) as metrics:
        assert metrics.eta_seconds({"time/step": 2.0}) == pytest.approx(120.0)  # nothing done yet: the step's own time
        assert metrics.eta_seconds({}) is None
        clock.now += 30.0
        metrics.log(43, {"a": 1.0})  # steps 41-43 in 30 s since the resume
        assert metrics.eta_seconds() == pytest.approx(10.0 * 57)
    assert MetricsLogger(tmp_run_dir).eta_seconds() is None  # no total_steps, no ETA


def test_format_duration():
    assert [format_duration(s) for s in (0, 44.6, 60, 185, 3599, 3600, 7620, -3)] == ["0s", "45s", "1m00s", "3m05s", "59m59s", "1h00m", "2h07m", "0s"]
    assert format_console_line(3, {}, total=8, eta_s=75) == "step 3/8 | eta 1m15s"


def _batch(n):
    prompts = [f"prompt {i // 4}: what is {i // 4}+1?" for i in range(n)]  # groups of 4 responses per prompt
    responses = [f"line one\nthe answer is {i}" + ("x" * 1000 if i == 4 else "") for i in range(n)]
    return prompts, responses, [float(i % 2) for i in range(n)], [str(i // 4 + 1) for i in range(n)]


def test_samples_to_console_tensorboard_and_jsonl(tmp_run_dir, caplog):
    prompts, responses, scores, answers = _batch(8)
    with caplog.at_level(logging.INFO, logger="megappo.metrics"):
        with MetricsLogger(tmp_run_dir, samples_every=2, num_samples=2) as metrics:
            assert not metrics.wants_samples(1) and metrics.wants_samples(2)
            assert metrics.log_samples(1, prompts, responses, scores, answers=answers) == 0
            assert not (tmp_run_dir / "samples.jsonl").exists()
            assert metrics.log_samples(2, prompts, responses, scores, answers=answers) == 2
            assert metrics.log_samples(4, prompts, responses, scores) == 2
    records = [json.loads(line) for line in (tmp_run_dir / "samples.jsonl").read_text().splitlines()]
    # Spread over the batch: responses 0 and 4 are of different prompts. Texts are whole.
    assert [(r["step"], r["index"]) for r in records] == [(2, 0), (2, 4), (4, 0), (4, 4)]
    assert records[1] == {"step": 2, "index": 4, "prompt": prompts[4], "response": responses[4], "score": 0.0, "answer": "2"}
    assert "answer" not in records[2]

    console = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sample")]
    assert len(console) == 4
    assert console[0] == ("sample 1/2 of step 2 (response 0 of 8) | score 0 | answer 1\n"
                          "  prompt:   prompt 0: what is 0+1?\n  response: line one\\nthe answer is 0")
    long_line = console[1].splitlines()[2]
    assert "[... " in long_line and long_line.endswith("xxx") and len(long_line) < 480  # cut in the middle

    texts = read_tensorboard_text(tmp_run_dir / "tensorboard", "samples")
    assert [step for step, _ in texts] == [2, 4]
    assert "prompt 1: what is 1+1?" in texts[0][1] and responses[4] in texts[0][1] and "**answer** `2`" in texts[0][1]


def test_samples_resume_and_bad_arguments(tmp_run_dir):
    prompts, responses, scores, _ = _batch(4)
    with MetricsLogger(tmp_run_dir, tensorboard=False, samples_every=1, num_samples=1) as metrics:
        for step in (1, 2, 3):
            metrics.log_samples(step, prompts, responses, scores)
        with pytest.raises(ValueError, match="must be per response, got lengths 4, 3, 4"):
            metrics.log_samples(4, prompts, responses[:3], scores)
    with MetricsLogger(tmp_run_dir, tensorboard=False, samples_every=1, num_samples=1, resume_step=1) as metrics:
        metrics.log_samples(2, prompts, ["again"] * 4, scores)
    records = [json.loads(line) for line in (tmp_run_dir / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["response"]) for r in records] == [(1, responses[0]), (2, "again")]
    with MetricsLogger(tmp_run_dir, tensorboard=False, samples_every=1, num_samples=1, rank=1) as other:
        assert not other.wants_samples(2) and other.log_samples(2, prompts, responses, scores) == 0
    with pytest.raises(ValueError, match="logging.samples_every must be >= 0"):
        MetricsLogger(tmp_run_dir, samples_every=-1)
    assert LoggingConfig().samples_every > 0  # on by default


def _wandb_records(run_dir):
    """The records of the one offline W&B run under ``run_dir``: a .wandb file is a
    LevelDB-style log (7-byte file header; per record a 7-byte header: checksum, length,
    type; 32 KiB blocks) of ``wandb_internal_pb2.Record`` messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data = path.read_bytes()
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if pos + 7 + length > len(data):
            return  # a record still being written
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last fragment of one
            record = pb.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def test_wandb_offline(tmp_run_dir, monkeypatch):
    pytest.importorskip("wandb", reason="logging.wandb needs the wandb package (setup.py's test extra installs it)")
    monkeypatch.setenv("WANDB_MODE", "offline")  # belt and braces: no network in any case
    cfg = LoggingConfig(wandb=True, wandb_mode="offline", wandb_name="demo-run", samples_every=2, num_samples=1)
    prompts, responses, scores, _ = _batch(4)
    with MetricsLogger.from_config(cfg, tmp_run_dir, rank=0, total_steps=2, run_config={"algo": {"preset": "grpo"}}) as metrics:
        for step in (1, 2):
            metrics.log(step, {"reward/mean": step / 10, "actor/lr": 1e-6})
        metrics.log_samples(2, prompts, responses, scores)
    # finish() returns before W&B's service has written the run's log; the last record is "exit".
    deadline = time.monotonic() + 30
    while not any(r.WhichOneof("record_type") == "exit" for r in _wandb_records(tmp_run_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    history, config, name = {}, {}, None
    for record in _wandb_records(tmp_run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            name, group = record.run.display_name, record.run.run_group
            config = {u.key: json.loads(u.value_json) for u in record.run.config.update}
        elif kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history[row["_step"]] = row
    assert name == "demo-run" and group == "demo-run" and config["algo"] == {"preset": "grpo"}
    assert [(s, history[s]["reward/mean"], history[s]["actor/lr"]) for s in sorted(history)] == [(1, 0.1, 1e-6), (2, 0.2, 1e-6)]
    assert history[2]["samples/_type"] == "table-file" and history[2]["samples/nrows"] == 1


def test_wandb_requested_but_not_installed(tmp_run_dir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match="logging.wandb is true but the wandb package is not installed"):
        MetricsLogger.from_config(LoggingConfig(wandb=True), tmp_run_dir, rank=0)


def _plot_tool():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "tools" / "plot_metrics.py"
    spec = importlib.util.spec_from_file_location("plot_metrics_tool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plot_tool_on_any_run(tmp_run_dir, capsys, monkeypatch):
    import megappo.metrics as metrics_module

    with MetricsLogger(tmp_run_dir, tensorboard=False) as metrics:
        for step in range(1, 4):
            metrics.log(step, {"reward/mean": step / 10, "actor/kl_ref": 0.01 * step, "time/step": 1.0, "perf/x": 1.0})
    drawn = []
    real = metrics_module.plot_metrics
    monkeypatch.setattr(metrics_module, "plot_metrics", lambda *a, **k: drawn.append(k["keys"]) or real(*a, **k))
    tool = _plot_tool()
    assert tool.main([str(tmp_run_dir)]) == 0
    png = tmp_run_dir / "metrics.png"
    assert capsys.readouterr().out.strip() == str(png) and png.read_bytes()[:4] == b"\x89PNG"
    assert tool.main([str(tmp_run_dir / "metrics.jsonl"), "--keys", "perf/x", "--out", str(tmp_run_dir / "x.png")]) == 0
    assert (tmp_run_dir / "x.png").stat().st_size > 1000
    assert drawn == [None, ["perf/x"]]  # None: plot_metrics picks the usual keys the run has

    assert tool.main([str(tmp_run_dir), "--keys", "actor/kl"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no metric 'actor/kl' (did you mean 'actor/kl_ref'?)" in err
    assert tool.main([str(tmp_run_dir / "nope")]) == 2
    assert "nope: no metrics.jsonl" in capsys.readouterr().err


def test_plot_default_keys_are_those_logged(tmp_run_dir):
    from megappo.metrics import PLOT_KEYS

    assert set(PLOT_KEYS) <= _logged_names() | {"eval/accuracy"}
    with MetricsLogger(tmp_run_dir, tensorboard=False) as metrics:
        metrics.log(1, {"reward/mean": 0.1, "actor/entropy": 2.0})
    png = plot_metrics(tmp_run_dir / "metrics.jsonl", tmp_run_dir / "m.png")
    assert png.stat().st_size > 1000
