"""One torch_dist checkpoint written in rounds, so a worker never holds more than one round of tensors.

megatron-core's `dist_checkpointing.save` resolves every tensor a rank saves before it writes the first byte, so a
single save needs the rank's whole share of the model in memory. Instead each round (a few layers per worker) is
saved by `dist_checkpointing.save` into a directory of its own, and rank 0 then merges the rounds' PyTorch DCP
metadata (`torch.distributed.checkpoint.metadata.Metadata`: the union of every tensor's chunks and of the
chunk -> file map, with each round's data files renamed) into one checkpoint. megatron-core's loader reads the
result like any other; the conversion tests load it at several TP/PP layouts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DCP_METADATA = ".metadata"
# written identically by every round's save; taken from the first round
MEGATRON_FILES = ("metadata.json", "common.pt")


def plan_rounds(units: list[str], sizes: dict[str, int], budget: int) -> list[list[str]]:
    """Split a worker's units, in order, into rounds of at most `budget` bytes (a larger unit goes alone)."""
    rounds, current, used = [], [], 0
    for u in units:
        if current and used + sizes[u] > budget:
            rounds.append(current)
            current, used = [], 0
        current.append(u)
        used += sizes[u]
    if current:
        rounds.append(current)
    return rounds


def save_in_rounds(rounds: Iterator[dict], out_dir: str | Path, common: dict[str, Any]) -> None:
    """Collective: every rank yields the same number of rounds (an empty dict when it has nothing that round)."""
    import torch.distributed as dist

    from llamapro_megatron.runtime.checkpointing import save

    out_dir = Path(out_dir)
    round_dirs = []
    for k, sharded in enumerate(rounds):
        d = out_dir / f".round{k:04d}"
        d.mkdir(parents=True, exist_ok=True)  # dist_checkpointing.save wants an existing directory
        dist.barrier()
        # a round covers part of each stacked tensor by design; coverage is checked once merged
        with _partial_rounds_allowed():
            save({"model": sharded, **common}, str(d), validate_access_integrity=False)
        round_dirs.append(d)
    dist.barrier()
    if dist.get_rank() == 0:
        merge_rounds(round_dirs, out_dir)
    dist.barrier()


@contextlib.contextmanager
def _partial_rounds_allowed():
    """PyTorch's save planner rejects a save whose chunks do not fill each tensor ("invalid fill"); a round fills
    only part of the stacked layer tensors. Drop that one error while a round saves (the overlap and bounds checks
    stay); `merge_rounds` checks that the merged chunks fill every tensor."""
    import torch.distributed.checkpoint.default_planner as planner

    original = getattr(planner, "_validate_global_plan", None)
    if original is None:  # another torch: nothing to relax (a failing round save would say so)
        yield
        return

    # the planner logs each error as a warning: captured here, not shown (the fill errors are expected)
    log = logging.getLogger(planner.__name__)
    saved = log.level, log.propagate

    def validate(global_plan, metadata):
        capture = _Capture()
        log.addHandler(capture)
        try:
            result = original(global_plan, metadata)
        finally:
            log.removeHandler(capture)
        if isinstance(result, bool):  # torch 2.11 (seen) and older: True when valid, the reasons only logged
            return result or bool(capture.messages) and all("invalid fill" in m for m in capture.messages)
        return [e for e in result if "invalid fill" not in e]  # newer torch: the list of errors

    planner._validate_global_plan = validate
    log.setLevel(logging.WARNING)
    log.propagate = False
    try:
        yield
    finally:
        planner._validate_global_plan = original
        log.setLevel(saved[0])
        log.propagate = saved[1]


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def merge_rounds(round_dirs: list[Path], out_dir: Path) -> None:
    """Merge round checkpoints into `out_dir` (moves their data files; removes the round directories)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    merged = None
    for k, d in enumerate(round_dirs):
        md, storage = _move_saved_files(d, out_dir, f"__round{k}")
        if merged is None:
            merged, md.storage_data = md, storage
            for name in MEGATRON_FILES:
                if (d / name).exists():
                    os.replace(d / name, out_dir / name)
            continue
        for key, value in md.state_dict_metadata.items():
            have = merged.state_dict_metadata.get(key)
            if isinstance(value, TensorStorageMetadata) and isinstance(have, TensorStorageMetadata):
                if have.size != value.size:
                    raise RuntimeError(f"round {k}: {key} has global size {value.size}, earlier {have.size}")
                have.chunks.extend(value.chunks)
            else:
                merged.state_dict_metadata[key] = value
        merged.storage_data.update(storage)
        if isinstance(merged.planner_data, dict) and isinstance(md.planner_data, dict):
            merged.planner_data.update(md.planner_data)
        if hasattr(md, "mcore_data"):  # megatron-core's extra planner metadata (flattened tensors)
            merged.mcore_data = {**getattr(merged, "mcore_data", {}), **md.mcore_data}
    write_metadata(merged, out_dir)
    for d in round_dirs:
        shutil.rmtree(d)


def _move_saved_files(d: Path, out_dir: Path, prefix: str):
    """Move a save's data files from `d` into `out_dir` as `prefix + name`; returns its DCP metadata and storage
    map with the new names."""
    with open(d / DCP_METADATA, "rb") as f:
        md = pickle.load(f)
    renamed = {}
    for info in md.storage_data.values():
        if info.relative_path not in renamed:
            renamed[info.relative_path] = f"{prefix}{info.relative_path}"
            os.replace(d / info.relative_path, out_dir / renamed[info.relative_path])
    storage = {index: dataclasses.replace(info, relative_path=renamed[info.relative_path])
               for index, info in md.storage_data.items()}
    return md, storage


def write_metadata(md, out_dir: Path) -> None:
    """Check that the chunks of every tensor fill it, then write the DCP metadata (atomically)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    for key, value in md.state_dict_metadata.items():
        if isinstance(value, TensorStorageMetadata) and len(value.size):
            filled = sum(math.prod(c.sizes) for c in value.chunks)
            if filled != math.prod(value.size):
                raise RuntimeError(f"merged checkpoint: {key} has {filled} of {math.prod(value.size)} elements")
    tmp = out_dir / (DCP_METADATA + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(md, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_dir / DCP_METADATA)


def add_saved_objects(save_dir: Path, out_dir: Path, chunks: list[tuple]) -> None:
    """Complete a checkpoint in `out_dir` whose tensor chunks were written there directly (`direct`): move in what
    megatron-core saved into `save_dir` (objects, common.pt, metadata.json) and write DCP metadata covering both.

    `chunks`: `direct.Chunk.descriptor()` tuples (key, global shape, offsets, shape, dtype, file, offset, length).
    """
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    md, storage = _move_saved_files(save_dir, out_dir, "__objects")
    for name in MEGATRON_FILES:
        os.replace(save_dir / name, out_dir / name)
    for key, global_shape, offsets, shape, dtype, file, offset, length in chunks:
        entry = md.state_dict_metadata.get(key)
        if entry is None:
            entry = md.state_dict_metadata[key] = TensorStorageMetadata(
                properties=TensorProperties(dtype=getattr(torch, dtype)), size=torch.Size(global_shape), chunks=[])
        entry.chunks.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(shape)))
        storage[MetadataIndex(fqn=key, offset=torch.Size(offsets))] = _StorageInfo(file, offset, length)
    md.storage_data = storage
    write_metadata(md, out_dir)
    shutil.rmtree(save_dir)
