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
- every ``console_every`` steps logs one line on the ``megappo.metrics`` logger: the step
  out of ``total_steps``, the estimated time to the end, then the metrics of ``console_keys``
  that are present, in that order (the rest are in the jsonl);
- with ``wandb`` settings, logs the same scalars to Weights & Biases (one W&B run per
  session, grouped by run directory; ``mode="offline"`` writes under ``<run_dir>/wandb``
  for a later ``wandb sync``).

``log_samples(step, prompts, responses, scores)`` shows a few whole samples every
``samples_every`` steps: on the console, as TensorBoard text (tag ``samples``), in W&B as a
table, and appended in full to ``<run_dir>/samples.jsonl`` (trimmed on resume like the
metrics).

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

import importlib.util
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Literal, Mapping, MutableMapping, Optional, Sequence, Union

from megappo.metrics_sinks import WandbSettings, add_scalars, add_text, clip_text, markdown_sample, open_tensorboard, open_wandb

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
TENSORBOARD_DIR = "tensorboard"
CONSOLE_KEYS = (
    "reward/mean",
    "eval/accuracy",
    "actor/kl_ref",
    "actor/pg_clipfrac",
    "actor/grad_norm",
    "actor/lr",
    "actor/pg_loss",
    "actor/entropy",
    "critic/vf_loss",
    "response_length/mean",
    "time/step",
)
"""Metrics shown on the console line, in this order, when present (each is a name the
trainer logs: tests/test_metrics.py checks them against the code that makes them)."""

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


def _trim_jsonl(path: Path, resume_step: int) -> None:
    """Drop the records of steps after ``resume_step`` (and torn lines) from a jsonl file;
    ``resume_step`` 0 moves an earlier run's file aside to ``<name>.prev``."""
    if not path.exists() or path.stat().st_size == 0:
        return
    if resume_step <= 0:
        os.replace(path, path.with_name(path.name + ".prev"))
        logger.warning("%s is from an earlier run: moved to %s.prev", path, path.name)
        return
    raw = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    kept = [line for line in raw if (record := _parse_record(line)) is not None and record["step"] <= resume_step]
    if len(kept) != len(raw) or (kept and not kept[-1].endswith("\n")):
        _write_atomically(path, [line if line.endswith("\n") else line + "\n" for line in kept])
        logger.info("%s: dropped %d lines after step %d (resumed run)", path, len(raw) - len(kept), resume_step)


def _write_atomically(path: Path, lines: Sequence[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as out:
        out.writelines(lines)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


class MetricsLogger:
    """Per-step scalars to jsonl, TensorBoard, W&B and the console, and sample texts (see the
    module docstring)."""

    def __init__(
        self,
        run_dir: Union[str, Path],
        *,
        tensorboard: bool = True,
        console_every: int = 1,
        rank: int = 0,
        resume_step: Optional[int] = None,
        console_keys: Sequence[str] = CONSOLE_KEYS,
        total_steps: Optional[int] = None,
        samples_every: int = 0,
        num_samples: int = 2,
        wandb: Optional[WandbSettings] = None,
    ) -> None:
        for name, value in (("console_every", console_every), ("samples_every", samples_every), ("num_samples", num_samples)):
            if value < 0:
                raise ValueError(f"logging.{name} must be >= 0, got {value}")
        if wandb is not None and importlib.util.find_spec("wandb") is None:
            raise ValueError("logging.wandb is true but the wandb package is not installed (pip install wandb)")
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.tensorboard = tensorboard
        self.console_every = console_every
        self.console_keys = tuple(console_keys)
        self.total_steps = total_steps
        self.samples_every = samples_every
        self.num_samples = num_samples
        self.wandb = wandb
        self.jsonl_path = self.run_dir / METRICS_FILE
        self.samples_path = self.run_dir / SAMPLES_FILE
        self._jsonl: Optional[IO[str]] = None
        self._tb: Any = None
        self._wandb_run: Any = None
        self._clock: list[tuple[int, float]] = []  # (step, monotonic time) since start(), for the ETA
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
        _trim_jsonl(self.jsonl_path, resume_step)
        _trim_jsonl(self.samples_path, resume_step)
        self._jsonl = self.jsonl_path.open("a", encoding="utf-8")
        if self.tensorboard:
            self._tb = open_tensorboard(self.run_dir / TENSORBOARD_DIR, purge_step=resume_step + 1 if resume_step > 0 else 0)
        if self.wandb is not None:
            self._wandb_run = open_wandb(self.wandb, self.run_dir, resume_step)
        self._clock = [(resume_step, time.monotonic())]  # after the outputs: W&B takes seconds to start

    @classmethod
    def from_config(
        cls,
        logging_cfg: Any,
        run_dir: Union[str, Path],
        *,
        rank: int,
        resume_step: Optional[int] = None,
        total_steps: Optional[int] = None,
        run_config: Optional[dict] = None,
    ) -> "MetricsLogger":
        """Build from the ``logging`` config section. ``total_steps`` (``train.steps``) gives
        the console's ``step N/total`` and ETA; ``run_config`` (``config_to_dict(cfg)``) is
        recorded with a W&B run."""
        wandb = None
        if getattr(logging_cfg, "wandb", False):
            wandb = WandbSettings(logging_cfg.wandb_project, logging_cfg.wandb_name, logging_cfg.wandb_mode, run_config)
        return cls(
            run_dir,
            tensorboard=logging_cfg.tensorboard,
            console_every=logging_cfg.console_every,
            rank=rank,
            resume_step=resume_step,
            total_steps=total_steps,
            samples_every=getattr(logging_cfg, "samples_every", 0),
            num_samples=getattr(logging_cfg, "num_samples", 2),
            wandb=wandb,
        )

    def _open(self) -> bool:
        """Start a fresh run if needed; True on the rank that writes."""
        if self._state == "new":
            self.start(0)
        if self._state == "closed":
            raise RuntimeError("MetricsLogger used after close()")
        return self.rank == 0

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record one step's scalars (rank 0 only; a no-op elsewhere)."""
        if not self._open():
            return
        values = {name: _scalar(name, value) for name, value in metrics.items()}
        if "step" in values:
            raise ValueError("'step' is not a metric name: it is the key of every jsonl line")
        assert self._jsonl is not None
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        os.fsync(self._jsonl.fileno())
        if self._tb is not None:
            add_scalars(self._tb, step, values)
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=step)
        self._clock.append((step, time.monotonic()))
        if self.console_every > 0 and step % self.console_every == 0:
            logger.info("%s", format_console_line(step, values, self.console_keys, total=self.total_steps, eta_s=self.eta_seconds(values)))

    def eta_seconds(self, values: Mapping[str, Union[int, float]] = {}) -> Optional[float]:
        """Seconds to ``total_steps`` at this session's mean pace (wall time per step since
        ``start``, evaluations and saves included); before a step is done, the step's own
        ``time/step``. None without ``total_steps``."""
        if not self.total_steps or not self._clock:
            return None
        (first_step, first_time), (step, now) = self._clock[0], self._clock[-1]
        left = max(self.total_steps - step, 0)
        if step > first_step:
            return (now - first_time) / (step - first_step) * left
        per_step = values.get("time/step")
        return per_step * left if isinstance(per_step, (int, float)) and math.isfinite(per_step) else None

    def wants_samples(self, step: int) -> bool:
        """Whether ``log_samples`` records anything at ``step`` (so a caller can skip
        decoding texts): every ``samples_every`` steps, on rank 0."""
        return self.rank == 0 and self.samples_every > 0 and self.num_samples > 0 and step % self.samples_every == 0

    def log_samples(
        self,
        step: int,
        prompts: Sequence[str],
        responses: Sequence[str],
        scores: Sequence[float],
        *,
        answers: Optional[Sequence[str]] = None,
    ) -> int:
        """Show ``num_samples`` of a step's responses, spread over the batch (so different
        prompt groups), if ``wants_samples(step)``; returns how many were recorded.
        Arguments are per response, in batch order."""
        if not self.wants_samples(step) or not self._open():
            return 0
        n = len(responses)
        if not (len(prompts) == len(scores) == n and (answers is None or len(answers) == n)):
            raise ValueError(f"log_samples: prompts, responses, scores (and answers) must be per response, got lengths "
                             f"{len(prompts)}, {n}, {len(scores)}{'' if answers is None else f', {len(answers)}'}")
        picked = sorted({i * n // self.num_samples for i in range(min(self.num_samples, n))})
        rows = [{"step": step, "index": i, "prompt": prompts[i], "response": responses[i], "score": float(scores[i]),
                 **({"answer": answers[i]} if answers is not None else {})} for i in picked]
        with self.samples_path.open("a", encoding="utf-8") as out:
            out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        for k, row in enumerate(rows, 1):
            answer = f" | answer {clip_text(row['answer'], 60)}" if "answer" in row else ""
            logger.info("sample %d/%d of step %d (response %d of %d) | score %.4g%s\n  prompt:   %s\n  response: %s", k, len(rows),
                        step, row["index"], n, row["score"], answer, clip_text(row["prompt"], 400), clip_text(row["response"], 400))
        if self._tb is not None:
            add_text(self._tb, step, "samples", "\n\n---\n\n".join(map(markdown_sample, rows)))
        if self._wandb_run is not None:
            import wandb

            columns = ["step", "index", "score", "prompt", "response"]
            table = wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])
            self._wandb_run.log({"samples": table}, step=step)
        return len(rows)

    def close(self) -> None:
        self._state = "closed"
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def format_console_line(
    step: int,
    values: Mapping[str, Union[int, float]],
    keys: Sequence[str] = CONSOLE_KEYS,
    *,
    total: Optional[int] = None,
    eta_s: Optional[float] = None,
) -> str:
    """``step 12/100 | eta 3m05s | reward/mean 0.5312 | time/step 3.2``: the present
    ``keys`` in order."""
    parts = [f"step {step}" + (f"/{total}" if total else "")]
    if eta_s is not None:
        parts.append(f"eta {format_duration(eta_s)}")
    parts += [f"{key} {values[key]:.4g}" for key in keys if key in values]
    return " | ".join(parts)


def format_duration(seconds: float) -> str:
    """``45s``, ``3m05s``, ``2h07m``."""
    s = max(int(round(seconds)), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


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


PLOT_KEYS = ("reward/mean", "eval/accuracy", "actor/kl_ref", "actor/pg_clipfrac", "actor/entropy", "actor/grad_norm",
             "critic/vf_loss", "response_length/mean", "time/step")
"""What ``plot_metrics`` shows by default: those of these a run logged."""


def plot_metrics(jsonl_path: Union[str, Path], png_path: Union[str, Path], keys: Optional[Sequence[str]] = None) -> Path:
    """Plot ``keys`` (default: the ``PLOT_KEYS`` the file has) against step, one panel
    each, to a PNG (matplotlib's Agg canvas, no display and no pyplot global state). A key
    with no finite value gets an empty panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = load_metrics(jsonl_path)
    if keys is None:
        keys = [k for k in PLOT_KEYS if any(k in r for r in records)] or ["reward/mean"]
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
