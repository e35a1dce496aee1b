"""The checkpoint directory's bookkeeping (no torch): which checkpoints exist, in which order
they were saved, which one a run starts from, and what is pruned or set aside.

Rules (issue 14, bug 2):

- Pruning keeps the ``keep_last`` most recent *saves* (``meta.json``'s ``saved_ns``; the file's
  modification time for checkpoints older than that field), never the highest step numbers,
  and never deletes the checkpoint ``latest`` names. A run that restarted at a lower step
  therefore never deletes the checkpoint it has just written.
- A run never mixes its checkpoints with another lineage's. Checkpoints that would be
  (``checkpoint.resume=never`` over an existing directory; a resume from an earlier step,
  ``checkpoint.resume_from`` or an edited ``latest``, with later checkpoints present) are
  moved, not deleted, to ``CKPT_DIR/set_aside/<UTC time>-<reason>/``, with a warning that
  names the place.
- ``hf/step_N`` exports are pruned to the ``checkpoint.keep_last_hf`` most recent ones.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from typing import Optional

from megappo.weights.export import fsync_dir

log = logging.getLogger("megappo")

META = "meta.json"
LATEST = "latest"
SET_ASIDE = "set_aside"
STEP_DIR = re.compile(r"^step_(\d+)$")


def complete_steps(ckpt_dir: str) -> list[int]:
    """Steps of the complete checkpoints (those with ``meta.json``) in ``ckpt_dir``, sorted."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in os.listdir(ckpt_dir):
        m = STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(ckpt_dir, name, META)):
            found.append(int(m.group(1)))
    return sorted(found)


def latest_name(ckpt_dir: str) -> Optional[str]:
    """What ``latest`` names (e.g. ``step_12``), or None without a pointer."""
    pointer = os.path.join(ckpt_dir, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        return f.read().strip()


def save_time_ns(step_dir: str) -> int:
    """When the checkpoint was saved: ``meta.json``'s ``saved_ns``, else the file's mtime."""
    meta_path = os.path.join(step_dir, META)
    try:
        with open(meta_path) as f:
            saved = json.load(f).get("saved_ns")
    except (OSError, ValueError):
        saved = None
    return int(saved) if isinstance(saved, int) else os.stat(meta_path).st_mtime_ns


def steps_by_save_order(ckpt_dir: str) -> list[int]:
    """Complete checkpoints' steps, oldest save first."""
    return sorted(complete_steps(ckpt_dir), key=lambda s: (save_time_ns(os.path.join(ckpt_dir, f"step_{s}")), s))


def prune(ckpt_dir: str, keep_last: int) -> list[int]:
    """Delete all but the ``keep_last`` most recent saves, sparing ``latest``'s; returns the
    steps deleted."""
    keep_name = latest_name(ckpt_dir)
    order = steps_by_save_order(ckpt_dir)
    doomed = [s for s in order[: max(0, len(order) - keep_last)] if f"step_{s}" != keep_name]
    for step in doomed:
        shutil.rmtree(os.path.join(ckpt_dir, f"step_{step}"), ignore_errors=True)
    return doomed


def set_aside(ckpt_dir: str, names: list[str], reason: str) -> Optional[str]:
    """Move ``names`` (entries of ``ckpt_dir``) into a new ``set_aside/<time>-<reason>``
    folder; returns it (None when there was nothing to move)."""
    names = [n for n in names if os.path.lexists(os.path.join(ckpt_dir, n))]
    if not names:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest = os.path.join(ckpt_dir, SET_ASIDE, f"{stamp}-{reason}")
    suffix = 1
    while os.path.exists(dest):
        suffix += 1
        dest = os.path.join(ckpt_dir, SET_ASIDE, f"{stamp}-{reason}-{suffix}")
    os.makedirs(dest)
    for name in names:
        os.rename(os.path.join(ckpt_dir, name), os.path.join(dest, name))
    return dest


def parse_resume_from(value: str, ckpt_dir: str) -> str:
    """``checkpoint.resume_from``: a step number (``12``), a checkpoint name (``step_12``) in
    the checkpoint directory, or a path to a checkpoint directory; returns its path."""
    text = str(value).strip()
    if re.fullmatch(r"\d+", text):
        text = f"step_{int(text)}"
    path = os.path.join(ckpt_dir, text) if STEP_DIR.match(text) else os.path.abspath(text)
    if not os.path.isfile(os.path.join(path, META)):
        available = ", ".join(f"step_{s}" for s in complete_steps(ckpt_dir)) or "none"
        raise ValueError(
            f"checkpoint.resume_from={value!r}: {path} is not a complete checkpoint "
            f"(complete checkpoints in {ckpt_dir}: {available})"
        )
    return path


def choose_start(ckpt_dir: str, resume: str, resume_from: Optional[str]) -> tuple[Optional[str], list[str], str]:
    """What a run starts from: (checkpoint path or None, names to set aside, the reason).
    Pure: it decides, ``start_checkpoint`` acts."""
    if resume not in ("auto", "never"):
        raise ValueError(f"checkpoint.resume must be 'auto' or 'never', got {resume!r}")
    steps = complete_steps(ckpt_dir)
    others = [f"step_{s}" for s in steps] + ([LATEST] if latest_name(ckpt_dir) is not None else [])
    if resume_from is not None:
        if resume == "never":
            raise ValueError("checkpoint.resume=never contradicts checkpoint.resume_from: set one of them")
        path = parse_resume_from(resume_from, ckpt_dir)
    elif resume == "never":
        return None, others, "resume-never"
    else:
        name = latest_name(ckpt_dir)
        if name is None:
            if steps:
                raise ValueError(
                    f"{ckpt_dir} holds checkpoints ({', '.join(others)}) but no '{LATEST}' pointer: name one with "
                    f"checkpoint.resume_from=STEP, or start afresh with checkpoint.resume=never (they are then moved "
                    f"to {os.path.join(ckpt_dir, SET_ASIDE)})"
                )
            return None, [], ""
        path = os.path.join(ckpt_dir, name)
        if not os.path.isfile(os.path.join(path, META)):
            raise ValueError(f"{os.path.join(ckpt_dir, LATEST)} names {name!r}, which is not a complete checkpoint in {ckpt_dir}")
    if os.path.dirname(os.path.abspath(path)) != os.path.abspath(ckpt_dir):
        return path, others, "resumed-elsewhere"  # another run's checkpoint: this directory's are another lineage
    start = int(STEP_DIR.match(os.path.basename(path)).group(1))
    later = [f"step_{s}" for s in steps if s > start]
    return path, later, f"after-step_{start}"


def start_checkpoint(ckpt_dir: str, resume: str = "auto", resume_from: Optional[str] = None) -> Optional[str]:
    """Decide where a run starts (``choose_start``), set aside what would mix with it, point
    ``latest`` at the start checkpoint, and return its path (None: a fresh start). One process
    only (rank 0); ``CheckpointManager.start`` wraps it for all ranks."""
    path, move, reason = choose_start(ckpt_dir, resume, resume_from)
    if move:
        dest = set_aside(ckpt_dir, move, reason)
        log.warning(
            "%s: moved %s to %s (%s); nothing was deleted",
            ckpt_dir, ", ".join(move), dest,
            "checkpoint.resume=never over existing checkpoints" if reason == "resume-never"
            else f"this run continues from {path}, and later checkpoints would be overwritten or pruned by it",
        )
    if path is not None and os.path.dirname(os.path.abspath(path)) == os.path.abspath(ckpt_dir):
        if latest_name(ckpt_dir) != os.path.basename(path):
            point_latest(ckpt_dir, os.path.basename(path))
    return path


def point_latest(ckpt_dir: str, name: str) -> None:
    """Replace ``latest`` atomically (write a temporary file, fsync, rename, fsync the dir)."""
    tmp = os.path.join(ckpt_dir, f".{LATEST}.tmp")
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(ckpt_dir, LATEST))
    fsync_dir(ckpt_dir)


def prune_hf_exports(hf_dir: str, keep_last: int) -> list[str]:
    """Delete all but the ``keep_last`` most recent ``hf_dir/step_N`` exports (by modification
    time: a restarted run's new exports count as newest); ``keep_last`` 0 keeps all. Other
    exports (``final``) are never touched. Returns the names deleted. One process only."""
    if keep_last < 0:
        raise ValueError(f"checkpoint.keep_last_hf must be >= 0 (0 keeps all), got {keep_last}")
    if keep_last == 0 or not os.path.isdir(hf_dir):
        return []
    exports = [n for n in os.listdir(hf_dir) if STEP_DIR.match(n) and os.path.isdir(os.path.join(hf_dir, n))]
    exports.sort(key=lambda n: (os.stat(os.path.join(hf_dir, n)).st_mtime_ns, int(n[5:])))
    doomed = exports[: max(0, len(exports) - keep_last)]
    for name in doomed:
        shutil.rmtree(os.path.join(hf_dir, name), ignore_errors=True)
    return doomed
