"""Several DCP saves merged into one checkpoint; chunks written by other means added to a save's metadata.

Relies on (torch 2.4 - 2.13, read in `torch/distributed/checkpoint/metadata.py` and `filesystem.py`):
- `Metadata.state_dict_metadata`: key -> `TensorStorageMetadata(properties, size, chunks)` (chunks:
  `ChunkStorageMetadata(offsets, sizes)`) or `BytesStorageMetadata`; `Metadata.storage_data`:
  `MetadataIndex(fqn, offset)` -> `filesystem._StorageInfo(relative_path, offset, length)`; `planner_data` a dict;
- the file system reader opens `relative_path` under the checkpoint directory and reads `length` bytes at `offset`,
  so data files may be renamed as long as `storage_data` says so;
- megatron-core adds `mcore_data` (its flattened tensors) to the metadata object; kept as it is.
A merged metadata is checked before it is written: the chunks of every tensor must fill it.
"""
from __future__ import annotations

import dataclasses
import math
import os
import pickle
import shutil
from pathlib import Path

DCP_METADATA = ".metadata"
# written identically by every save of one job (megatron-core's own files): taken from the first
MEGATRON_FILES = ("metadata.json", "common.pt")


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
    from llamapro_megatron.runtime.safe_load import load_metadata

    md = load_metadata(d / DCP_METADATA)
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
    """Complete a checkpoint in `out_dir` whose tensor chunks were written there directly (`direct_import`): move in
    what megatron-core saved into `save_dir` (objects, common.pt, metadata.json) and write DCP metadata covering both.

    `chunks`: `direct_import.Chunk.descriptor()` tuples (key, global shape, offsets, shape, dtype, file, offset,
    length).
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
        if (save_dir / name).exists():  # common.pt: not from megatron-core 0.19 on (its common state is in DCP)
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
