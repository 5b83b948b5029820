"""Read documents from `.jsonl`, `.jsonl.gz` and parquet files, in batches that keep their line numbers.

Parsing happens later (in the preprocessing workers), so a batch carries raw JSON lines; parquet rows
arrive already decoded as dicts. Either way each item has a 1-based line (or row) number for messages.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from llamapro_megatron.errors import UserError

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass
class Batch:
    """Consecutive documents of one file: `items` are raw JSON lines (str) or parquet rows (dict)."""

    path: str
    first_line: int
    items: list


def input_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    raise UserError(
        f"--input {path}: unknown format; expected a .jsonl, .jsonl.gz or .parquet file (one JSON object per line)"
    )


def check_inputs(paths: list[str | Path], json_keys: list[str]) -> list[Path]:
    """Validate input paths up front (before any output is written)."""
    checked = []
    for p in map(Path, paths):
        if not p.is_file():
            raise UserError(f"--input {p}: no such file; pass existing .jsonl, .jsonl.gz or .parquet files")
        if input_format(p) == "parquet":
            import pyarrow.parquet as pq

            names = pq.ParquetFile(p).schema_arrow.names
            missing = [k for k in json_keys if k not in names]
            if missing:
                raise UserError(
                    f"--input {p}: parquet columns {names} lack {missing}; pass --json-keys naming existing columns"
                )
        checked.append(p)
    return checked


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


BATCH_CHARS = 1 << 17  # ~128K characters per batch: many batches per worker, so no worker idles at the tail


def iter_batches(
    paths: list[Path], json_keys: list[str], batch_size: int = 256, batch_chars: int = BATCH_CHARS
) -> Iterator[Batch]:
    """Yield batches of at most `batch_size` documents and about `batch_chars` characters, file by file, in order.

    Batches are bounded by size as well as by count: a corpus of large documents (source files) cut into a few
    256-document batches leaves one worker idle while the other finishes the last batch.
    """
    for path in paths:
        if input_format(path) == "parquet":
            import pyarrow.parquet as pq

            row = 1
            for record_batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=json_keys):
                rows = record_batch.to_pylist()
                sizes = (sum(len(v) for v in r.values() if isinstance(v, str)) for r in rows)
                for first, items in _cut(rows, sizes, batch_size, batch_chars):
                    yield Batch(str(path), row + first, items)
                row += len(rows)
            continue
        with _open_text(path) as f:
            lines = (line for line in f)
            for first, items in _cut(lines, None, batch_size, batch_chars):
                yield Batch(str(path), 1 + first, items)


def _cut(items: Iterable, sizes: Iterable[int] | None, max_items: int, max_chars: int) -> Iterator[tuple[int, list]]:
    """(index of the first item, items) runs of at most `max_items` items, ending once `max_chars` is reached."""
    sizes = iter(sizes) if sizes is not None else None
    run: list = []
    chars = first = 0
    for i, item in enumerate(items):
        if not run:
            first = i
        run.append(item)
        chars += next(sizes) if sizes is not None else len(item)
        if len(run) == max_items or chars >= max_chars:
            yield first, run
            run, chars = [], 0
    if run:
        yield first, run
