"""Tokenize jsonl/parquet corpora into megatron-core indexed datasets (`PREFIX_<key>_document.bin/.idx`).

Workers tokenize batches of documents in parallel; the main process writes their results strictly in input
order, so any worker count gives byte-identical files. Bad lines (invalid JSON, missing or non-string key)
are reported with file and line, counted and skipped (`strict=True` makes them fatal). Empty documents are
skipped: megatron-core's index builder hangs on zero-length documents. Output is written under temporary
names and renamed only at the end, so an interrupted run never leaves a `.bin/.idx` pair that looks complete.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np

from llamapro_megatron.data.readers import Batch, check_inputs, iter_batches
from llamapro_megatron.errors import UserError

MAX_REPORTED = 20  # bad-line messages printed in full; the rest are only counted


@dataclass
class Options:
    json_keys: list[str]
    append_eod: bool = False
    prepend_bos: bool = False
    strict: bool = False


@dataclass
class BatchResult:
    """Per key: all kept documents' tokens concatenated plus their lengths; problems as (file, line, what)."""

    tokens: dict[str, np.ndarray]
    lengths: dict[str, list[int]]
    problems: list[tuple[str, int, str]]
    empty: int = 0


@dataclass
class Stats:
    documents: int = 0
    tokens: int = 0
    skipped_invalid: int = 0
    skipped_empty: int = 0
    seconds: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        return self.skipped_invalid + self.skipped_empty

    def summary(self) -> str:
        rate = self.tokens / self.seconds if self.seconds else 0.0
        return (
            f"documents: {self.documents}  tokens: {self.tokens}  skipped: {self.skipped} "
            f"(invalid: {self.skipped_invalid}, empty: {self.skipped_empty})  "
            f"time: {self.seconds:.1f}s  tokens/s: {rate:,.0f}"
        )


def output_prefix(out: str | Path, key: str) -> str:
    """Megatron's naming: `<out>_<key>_document` (the prefix GPTDataset blends name)."""
    return f"{out}_{key}_document"


# --- worker side ---------------------------------------------------------------------------------------
_worker_state: dict = {}


def _init_worker(tokenizer_path: str, options: Options, tokenizer=None) -> None:
    """Per-process state; a forked worker inherits the parent's (already loaded) tokenizer."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker; parallelism is ours
    if tokenizer is None:
        if _worker_state.get("path") == tokenizer_path:
            tokenizer = _worker_state["tokenizer"]
        else:
            from llamapro_megatron.data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(tokenizer_path)
    _worker_state.update(
        tokenizer=tokenizer, path=tokenizer_path, options=options, dtype=token_dtype(tokenizer.vocab_size)
    )


def token_dtype(vocab_size: int) -> type:
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


def _parse(item, path: str, line: int, keys: list[str]) -> tuple[list[str] | None, str | None]:
    """The texts of one document for each key, or a problem description."""
    if isinstance(item, str):
        if not item.strip():
            return None, None  # blank line: not a document
        try:
            item = json.loads(item)
        except json.JSONDecodeError as e:
            return None, f"invalid JSON ({e.msg} at column {e.colno})"
    if not isinstance(item, dict):
        return None, f"expected a JSON object, got {type(item).__name__}"
    texts = []
    for key in keys:
        value = item.get(key)
        if value is None:
            return None, f"missing key {key!r} (keys present: {sorted(item)[:10]})"
        if not isinstance(value, str):
            return None, f"key {key!r} is {type(value).__name__}, expected a string"
        texts.append(value)
    return texts, None


def tokenize_batch(batch: Batch) -> BatchResult:
    tokenizer = _worker_state["tokenizer"]
    options: Options = _worker_state["options"]
    keys = options.json_keys
    problems: list[tuple[str, int, str]] = []
    docs: list[list[str]] = []
    for offset, item in enumerate(batch.items):
        texts, problem = _parse(item, batch.path, batch.first_line + offset, keys)
        if problem:
            problems.append((batch.path, batch.first_line + offset, problem))
        elif texts is not None:
            docs.append(texts)
    result = BatchResult(tokens={}, lengths={}, problems=problems)
    encoded = {key: tokenizer.batch_encode([d[i] for d in docs]) for i, key in enumerate(keys)}
    # A document is dropped (for every key) if any of its texts tokenizes to nothing.
    keep = [all(encoded[key][j] for key in keys) for j in range(len(docs))]
    result.empty = keep.count(False)
    prefix = [tokenizer.bos] if options.prepend_bos else []
    suffix = [tokenizer.eod] if options.append_eod else []
    extra = len(prefix) + len(suffix)
    for key in keys:
        kept = [ids for ids, k in zip(encoded[key], keep) if k]
        result.lengths[key] = [len(ids) + extra for ids in kept]
        # One pass from Python ints to the output dtype (no per-document lists or arrays).
        flat = chain.from_iterable(chain(prefix, ids, suffix) for ids in kept) if extra else chain.from_iterable(kept)
        result.tokens[key] = np.fromiter(flat, dtype=_worker_state["dtype"], count=sum(result.lengths[key]))
    return result


# --- main side ---------------------------------------------------------------------------------------
class _Output:
    """An IndexedDatasetBuilder writing under temporary names; `commit` renames into place."""

    def __init__(self, prefix: str, dtype: type) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix = prefix
        self.tmp = f"{prefix}.partial-{os.getpid()}"
        self.builder = IndexedDatasetBuilder(self.tmp + ".bin", dtype=dtype)

    def add(self, tokens: np.ndarray, lengths: list[int]) -> None:
        import torch

        start = 0
        for n in lengths:
            self.builder.add_item(torch.from_numpy(tokens[start : start + n]))
            self.builder.end_document()
            start += n

    def commit(self) -> None:
        self.builder.finalize(self.tmp + ".idx")
        # Drop a previous .idx first: until the new one is in place there is no matching pair.
        Path(self.prefix + ".idx").unlink(missing_ok=True)
        os.replace(self.tmp + ".bin", self.prefix + ".bin")
        os.replace(self.tmp + ".idx", self.prefix + ".idx")

    def discard(self) -> None:
        self.builder.data_file.close()
        for suffix in (".bin", ".idx"):
            Path(self.tmp + suffix).unlink(missing_ok=True)


def _ordered_results(batches, workers: int, tokenizer_path: str, options: Options):
    """Results in input order; at most a few batches per worker in flight (bounded memory).

    The caller has run _init_worker in this process: in-process work and forked workers reuse its tokenizer.
    """
    if workers <= 1:
        for batch in batches:
            yield tokenize_batch(batch)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_path, options)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(tokenize_batch, (batch,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def preprocess(
    inputs: list[str | Path],
    tokenizer_path: str | Path,
    out: str | Path,
    json_keys: list[str] = ("text",),
    workers: int = 1,
    append_eod: bool = False,
    prepend_bos: bool = False,
    strict: bool = False,
    batch_size: int = 256,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> Stats:
    """Tokenize `inputs` into `output_prefix(out, key)` datasets, one per key; returns the counts."""
    from llamapro_megatron.data.tokenizer import load_tokenizer

    log = log or (lambda msg: print(msg, file=sys.stderr))
    json_keys = list(json_keys)
    if not json_keys:
        raise UserError("--json-keys: expected at least one key, e.g. --json-keys text")
    if workers < 1:
        raise UserError(f"--workers {workers}: expected a positive number of worker processes")
    paths = check_inputs(inputs, json_keys)
    tokenizer = load_tokenizer(tokenizer_path)  # fail early on a bad tokenizer, before any worker starts
    if prepend_bos and tokenizer.bos < 0 or append_eod and tokenizer.eod < 0:
        raise UserError(f"--tokenizer {tokenizer_path}: has no BOS/EOS token for --prepend-bos/--append-eod")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    options = Options(json_keys, append_eod=append_eod, prepend_bos=prepend_bos, strict=strict)
    dtype = token_dtype(tokenizer.vocab_size)
    _init_worker(str(tokenizer_path), options, tokenizer)
    outputs = {key: _Output(output_prefix(out, key), dtype) for key in json_keys}
    stats = Stats(outputs={k: o.prefix for k, o in outputs.items()})

    from tqdm import tqdm

    bar = tqdm(unit=" docs", disable=(not sys.stderr.isatty()) if progress is None else not progress)
    start = time.perf_counter()
    try:
        for result in _ordered_results(
            iter_batches(paths, json_keys, batch_size), workers, str(tokenizer_path), options
        ):
            for path, line, problem in result.problems:
                if strict:
                    raise UserError(f"{path}:{line}: {problem}; fix the line or drop --strict to skip such lines")
                if stats.skipped_invalid < MAX_REPORTED:
                    log(f"{path}:{line}: {problem}; skipped")
                stats.skipped_invalid += 1
            stats.skipped_empty += result.empty
            for key, output in outputs.items():
                output.add(result.tokens[key], result.lengths[key])
            n_docs = len(result.lengths[json_keys[0]])
            stats.documents += n_docs
            stats.tokens += sum(int(result.tokens[k].size) for k in json_keys)
            elapsed = time.perf_counter() - start
            bar.update(n_docs)
            bar.set_postfix_str(f"{stats.tokens / max(elapsed, 1e-9):,.0f} tokens/s", refresh=False)
        if stats.documents == 0:
            raise UserError(
                f"--input {', '.join(map(str, paths))}: no usable documents (skipped {stats.skipped}); "
                f"check --json-keys {' '.join(json_keys)}"
            )
        for output in outputs.values():
            output.commit()
    except BaseException:  # interrupted or failed: leave nothing that looks like a dataset
        for output in outputs.values():
            output.discard()
        raise
    finally:
        bar.close()
    if stats.skipped_invalid > MAX_REPORTED:
        log(f"... {stats.skipped_invalid - MAX_REPORTED} more bad lines not shown")
    stats.seconds = time.perf_counter() - start
    return stats
