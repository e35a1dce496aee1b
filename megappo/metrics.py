"""Metrics: TensorBoard scalars, a console line, a crash-safe ``metrics.jsonl``; timers,
progress bars and a plot.

``MetricsLogger.log(step, metrics)`` takes one flat dict of scalars per step (names like
``reward/mean``, ``time/rollout``) and, on rank 0 only,

- appends ``{"step": step, **metrics}`` as one line to ``<run_dir>/metrics.jsonl``, flushed
  and fsync'ed, so a crash loses at most the line being written (a torn last line is
  dropped on resume). Non-finite values are written as ``NaN``/``Infinity``, which
  Python's ``json`` reads back;
- writes every scalar to TensorBoard under ``<run_dir>/tensorboard`` with tensorboard's own
  event writer (no TensorFlow, no torch import);
- every ``console_every`` steps logs one line on the ``megappo.metrics`` logger: the step,
  the metrics of ``console_keys`` that are present, in that order (the rest are in the jsonl).

Nothing is written before ``start(resume_step)`` (or the first ``log``, which starts a
fresh run), so the logger can be built before the checkpoint is loaded. Resuming from a
checkpoint of step S (``start(S)``) drops the jsonl lines of steps after S and writes a
TensorBoard ``SessionLog.START`` at step S+1, which makes TensorBoard discard the old
events of those steps, so the resumed run leaves no duplicates. A fresh run (``start(0)``)
in a directory with an old ``metrics.jsonl`` moves it to ``metrics.jsonl.prev`` and
purges the old TensorBoard events from step 0.

The trainer should gather a step's metrics (training and evaluation) into one ``log`` call:
the jsonl has one line per call.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Literal, Mapping, MutableMapping, Optional, Sequence, Union

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CONSOLE_KEYS = (
    "reward/mean",
    "eval/accuracy",
    "actor/pg_loss",
    "actor/kl_ref",
    "actor/entropy",
    "critic/vf_loss",
    "response_length/mean",
    "time/step",
)
"""Metrics shown on the console line, in this order, when present (each is a name the
trainer logs: tests/test_metrics.py checks them against the code that makes them)."""

PHASES = ("time/rollout", "time/reward", "time/logprobs", "time/train", "time/sync")
"""Names of the per-phase timings of a step (seconds), for ``Timer``."""


def _scalar(name: str, value: Any) -> Union[int, float]:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    try:
        return float(value)  # floats, numpy scalars, 0-d torch tensors
    except (TypeError, ValueError):
        raise TypeError(f"metric {name!r} is not a scalar: {type(value).__name__}") from None


def _parse_record(line: str) -> Optional[dict[str, Any]]:
    """A jsonl line's record, or None for a line torn by a crash or not ours."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    if isinstance(record, dict) and isinstance(record.get("step"), int):
        return record
    return None


def _write_atomically(path: Path, lines: Sequence[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as out:
        out.writelines(lines)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


class MetricsLogger:
    """Per-step scalars to jsonl, TensorBoard and the console (see the module docstring)."""

    def __init__(
        self,
        run_dir: Union[str, Path],
        *,
        tensorboard: bool = True,
        console_every: int = 1,
        rank: int = 0,
        resume_step: Optional[int] = None,
        console_keys: Sequence[str] = CONSOLE_KEYS,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.tensorboard = tensorboard
        self.console_every = console_every
        self.console_keys = tuple(console_keys)
        self.jsonl_path = self.run_dir / METRICS_FILE
        self._jsonl: Optional[IO[str]] = None
        self._tb: Any = None
        self._state: Literal["new", "open", "closed"] = "new"
        if resume_step is not None:
            self.start(resume_step)

    def start(self, resume_step: int = 0) -> None:
        """Open the outputs. ``resume_step``: the step of the checkpoint this run resumed
        from, whose later records are dropped; 0 for a fresh run, whose directory's old
        records are set aside. Call it after loading the checkpoint and before the first
        ``log``, which otherwise calls ``start(0)``."""
        if self._state != "new":
            raise RuntimeError(f"MetricsLogger.start() called on a logger that is already {self._state}")
        self._state = "open"
        if self.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._prepare_jsonl(resume_step)
        self._jsonl = self.jsonl_path.open("a", encoding="utf-8")
        if self.tensorboard:
            self._tb = _open_tensorboard(self.run_dir / TENSORBOARD_DIR, purge_step=resume_step + 1 if resume_step > 0 else 0)

    @classmethod
    def from_config(
        cls, logging_cfg: Any, run_dir: Union[str, Path], *, rank: int, resume_step: Optional[int] = None
    ) -> "MetricsLogger":
        """Build from the ``logging`` config section (``tensorboard``, ``console_every``)."""
        return cls(
            run_dir,
            tensorboard=logging_cfg.tensorboard,
            console_every=logging_cfg.console_every,
            rank=rank,
            resume_step=resume_step,
        )

    def _prepare_jsonl(self, resume_step: int) -> None:
        path = self.jsonl_path
        if not path.exists() or path.stat().st_size == 0:
            return
        if resume_step <= 0:
            os.replace(path, path.with_name(path.name + ".prev"))
            logger.warning("%s is from an earlier run: moved to %s.prev", path, path.name)
            return
        raw = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        kept = []
        for line in raw:
            record = _parse_record(line)
            if record is not None and record["step"] <= resume_step:
                kept.append(line)
        if len(kept) != len(raw) or (kept and not kept[-1].endswith("\n")):
            _write_atomically(path, [line if line.endswith("\n") else line + "\n" for line in kept])
            logger.info("%s: dropped %d lines after step %d (resumed run)", path, len(raw) - len(kept), resume_step)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record one step's scalars (rank 0 only; a no-op elsewhere)."""
        if self._state == "new":
            self.start(0)
        if self._state == "closed":
            raise RuntimeError("MetricsLogger.log() after close()")
        if self.rank != 0:
            return
        values = {name: _scalar(name, value) for name, value in metrics.items()}
        if "step" in values:
            raise ValueError("'step' is not a metric name: it is the key of every jsonl line")
        assert self._jsonl is not None
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        os.fsync(self._jsonl.fileno())
        if self._tb is not None:
            _add_scalars(self._tb, step, values)
        if self.console_every > 0 and step % self.console_every == 0:
            logger.info("%s", format_console_line(step, values, self.console_keys))

    def close(self) -> None:
        self._state = "closed"
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def format_console_line(step: int, values: Mapping[str, Union[int, float]], keys: Sequence[str] = CONSOLE_KEYS) -> str:
    """``step 12 | reward/mean 0.5312 | time/step 3.2``: the present ``keys`` in order."""
    parts = [f"step {step}"]
    parts += [f"{key} {values[key]:.4g}" for key in keys if key in values]
    return " | ".join(parts)


def _open_tensorboard(logdir: Path, *, purge_step: int) -> Any:
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    writer = EventFileWriter(str(logdir), flush_secs=10)
    # As torch's SummaryWriter(purge_step=...): TensorBoard drops older events at steps >= purge_step.
    writer.add_event(Event(step=purge_step, wall_time=time.time(), file_version="brain.Event:2"))
    writer.add_event(Event(step=purge_step, wall_time=time.time(), session_log=SessionLog(status=SessionLog.START)))
    return writer


def _add_scalars(writer: Any, step: int, values: Mapping[str, Union[int, float]]) -> None:
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary

    summary = Summary(value=[Summary.Value(tag=name, simple_value=float(value)) for name, value in values.items()])
    writer.add_event(Event(step=step, wall_time=time.time(), summary=summary))


class Timer:
    """Wall time of a block: ``with Timer("time/rollout", metrics): ...`` adds the seconds
    to ``metrics["time/rollout"]`` (summing repeated blocks of one step). ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs at both ends so asynchronous GPU work is counted."""

    def __init__(
        self,
        name: str = "",
        sink: Optional[MutableMapping[str, float]] = None,
        *,
        sync: Optional[Callable[[], Any]] = None,
    ) -> None:
        self.name = name
        self.sink = sink
        self.sync = sync
        self.elapsed = 0.0
        self._start = 0.0

    def __enter__(self) -> "Timer":
        if self.sync is not None:
            self.sync()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.sync is not None:
            self.sync()
        self.elapsed = time.perf_counter() - self._start
        if self.sink is not None:
            self.sink[self.name] = self.sink.get(self.name, 0.0) + self.elapsed


def progress(
    iterable: Union[Iterable[Any], int, None] = None, desc: str = "", *, enabled: bool = True, rank: int = 0, leave: bool = True
) -> Any:
    """A tqdm bar over ``iterable`` (or ``progress(total)`` for manual ``update``; ``total``
    may grow), shown only on rank 0, when ``enabled`` (``logging.progress_bar``) and stderr
    is a terminal; otherwise a silent tqdm that iterates and updates as usual (its
    ``update`` returns at once). ``leave=False`` erases the bar when it closes (a bar per
    step under the bar over steps). Redraws at most every 0.1 s, so frequent ``update``
    calls cost microseconds."""
    from tqdm.auto import tqdm

    total = iterable if isinstance(iterable, int) else None
    items = None if isinstance(iterable, int) else iterable
    active = enabled and rank == 0 and sys.stderr.isatty()
    return tqdm(items, total=total, desc=desc, disable=not active, dynamic_ncols=True, leave=leave)


def load_metrics(jsonl_path: Union[str, Path]) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (torn or foreign lines skipped)."""
    with Path(jsonl_path).open("r", encoding="utf-8", errors="replace") as lines:
        return [record for record in map(_parse_record, lines) if record is not None]


def plot_metrics(
    jsonl_path: Union[str, Path],
    png_path: Union[str, Path],
    keys: Sequence[str] = ("reward/mean", "eval/accuracy"),
) -> Path:
    """Plot ``keys`` against step, one panel each, to a PNG (matplotlib's Agg canvas, no
    display and no pyplot global state). A key with no finite value gets an empty panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = load_metrics(jsonl_path)
    figure = Figure(figsize=(7, 2.6 * len(keys)), constrained_layout=True)
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(keys), 1, squeeze=False)[:, 0]
    for ax, key in zip(axes, keys):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="." if len(points) < 50 else None)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png_path, dpi=100)
    return png_path
