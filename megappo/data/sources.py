"""Reading prompt files row by row: jsonl and parquet, with bad rows reported, not fatal.

``read_rows(path)`` yields ``(location, row)`` where ``row`` is a dict, or a ``RowProblem``
naming why the row cannot be used (not UTF-8, malformed JSON, not an object). Field
checks happen in ``dataset``; this module only knows file formats.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Union

SUFFIXES = (".jsonl", ".parquet")


@dataclass(frozen=True)
class RowProblem:
    """Why a row was skipped; ``reason`` is the aggregation key of the skip counts."""

    reason: str
    detail: str = ""


def read_rows(path: Union[str, Path], *, role: str = "") -> Iterator[tuple[str, Union[dict[str, Any], RowProblem]]]:
    """Rows of a ``.jsonl`` or ``.parquet`` file with their location ("line 7", "row 6").
    ``role`` (e.g. ``data.eval_path``) is named in the errors, so a user with two files
    knows which one is bad."""
    path = Path(path)
    named = f"{path} ({role})" if role else str(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {named}")
    if path.suffix == ".jsonl":
        yield from _jsonl_rows(path)
    elif path.suffix == ".parquet":
        yield from _parquet_rows(path, named)
    else:
        raise ValueError(f"{named}: unsupported prompt file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}")


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Union[dict[str, Any], RowProblem]]]:
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            location = f"line {number}"
            try:
                # utf-8-sig on the first line: editors on Windows start files with a byte-order
                # mark, which json.loads rejects, and the first row would be skipped.
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                yield location, RowProblem("not valid UTF-8", f"byte {error.start}")
                continue
            if not text.strip():
                continue  # blank lines (a trailing newline) are not rows
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                yield location, RowProblem("malformed JSON", error.msg)
                continue
            if not isinstance(row, dict):
                yield location, RowProblem("not a JSON object", type(row).__name__)
                continue
            yield location, row


def _parquet_rows(path: Path, named: str) -> Iterator[tuple[str, Union[dict[str, Any], RowProblem]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    index = 0
    try:
        # A broken footer fails at open, a broken page while reading its batch: pyarrow's
        # messages ("Parquet magic bytes not found", "Couldn't deserialize thrift") name no file.
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                yield f"row {index}", row
                index += 1
    except (pa.ArrowException, OSError) as error:
        where = f" after row {index - 1}" if index else ""
        reason = " ".join(str(error).split())  # pyarrow's messages span lines
        raise ValueError(f"{named}: not a readable parquet file{where} (corrupt or truncated?): {reason}") from error


def column_names(path: Union[str, Path]) -> list[str]:
    """The columns of a parquet file or the keys of a jsonl file's first object (for error
    messages that suggest the right ``data.prompt_key``)."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.ParquetFile(path).schema_arrow.names)
    for _, row in read_rows(path):
        if isinstance(row, dict):
            return list(row)
    return []
