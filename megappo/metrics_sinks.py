"""Where ``megappo.metrics.MetricsLogger`` writes besides its jsonl files: TensorBoard
event files (scalars and markdown text, with tensorboard's own writer: no TensorFlow, no
torch import), Weights & Biases runs, and the plain-text rendering of sample responses for
the console and TensorBoard. Imported only by ``megappo.metrics``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Union


@dataclass(frozen=True)
class WandbSettings:
    """Where a run's W&B scalars go (``logging.wandb_*``)."""

    project: str = "megappo"
    name: Optional[str] = None
    """Run name; None: the run directory's name."""
    mode: Literal["online", "offline"] = "online"
    config: Optional[dict] = None
    """The resolved config, recorded with the W&B run."""


def open_tensorboard(logdir: Path, *, purge_step: int) -> Any:
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    writer = EventFileWriter(str(logdir), flush_secs=10)
    # As torch's SummaryWriter(purge_step=...): TensorBoard drops older events at steps >= purge_step.
    writer.add_event(Event(step=purge_step, wall_time=time.time(), file_version="brain.Event:2"))
    writer.add_event(Event(step=purge_step, wall_time=time.time(), session_log=SessionLog(status=SessionLog.START)))
    return writer


def add_scalars(writer: Any, step: int, values: Mapping[str, Union[int, float]]) -> None:
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary

    summary = Summary(value=[Summary.Value(tag=name, simple_value=float(value)) for name, value in values.items()])
    writer.add_event(Event(step=step, wall_time=time.time(), summary=summary))


def add_text(writer: Any, step: int, tag: str, markdown: str) -> None:
    """A TensorBoard text summary (the text plugin renders markdown), as torch's
    ``SummaryWriter.add_text`` writes it: a 1-element string tensor."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    from tensorboard.plugins.text.metadata import create_summary_metadata

    tensor = TensorProto(dtype="DT_STRING", string_val=[markdown.encode("utf-8")], tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]))
    value = Summary.Value(tag=tag, metadata=create_summary_metadata(display_name=tag, description=""), tensor=tensor)
    writer.add_event(Event(step=step, wall_time=time.time(), summary=Summary(value=[value])))


def clip_text(text: str, limit: int) -> str:
    """One console line's worth of ``text``: newlines shown as ``\\n``, long texts cut in
    the middle (the end of a response holds its answer)."""
    flat = str(text).replace("\n", "\\n")
    return flat if len(flat) <= limit else f"{flat[: limit // 2]} [... {len(flat) - limit} chars ...] {flat[-limit // 2 :]}"


def markdown_sample(row: Mapping[str, Any]) -> str:
    answer = f" · **answer** `{row['answer']}`" if "answer" in row else ""
    fence = "````"  # longer than any ``` a model writes in its response
    return (f"**response {row['index']}** · **score** {row['score']:.4g}{answer}\n\n**prompt**\n\n{fence}\n{row['prompt']}\n{fence}"
            f"\n\n**response**\n\n{fence}\n{row['response']}\n{fence}")


def open_wandb(settings: WandbSettings, run_dir: Path, resume_step: int) -> Any:
    """One W&B run per session (a resumed session is a new W&B run in the same group whose
    steps continue after ``resume_step``: W&B cannot rewrite the steps it already has)."""
    import wandb

    name = settings.name or run_dir.resolve().name
    return wandb.init(
        project=settings.project, name=name if resume_step <= 0 else f"{name}@{resume_step}", group=name,
        dir=str(run_dir), mode=settings.mode, config=settings.config or {}, reinit="create_new",
        settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),  # our console line is the log
    )
