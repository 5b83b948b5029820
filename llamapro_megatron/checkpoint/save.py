"""The checkpoint writer of conversion, expansion and merge: meta sharded-state-dict entries filled and saved in
rounds, so a worker never holds more than one round of tensors.

megatron-core's `dist_checkpointing.save` resolves every tensor a rank saves before it writes the first byte, so a
single save needs the rank's whole share of the model in memory. Instead each round (a few units per worker,
`units.worker_rounds`) is saved by `dist_checkpointing.save` into a directory of its own, and rank 0 then merges the
rounds' DCP metadata into one checkpoint (`dcp.merge`). megatron-core's loader reads the result like any other; the
conversion tests load it at several TP/PP layouts.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llamapro_megatron.checkpoint.units import unit_of
from llamapro_megatron.errors import UserError


def save_in_rounds(rounds: Iterator[dict], out_dir: str | Path, common: dict[str, Any]) -> None:
    """Collective: every rank yields the same number of rounds (an empty dict when it has nothing that round)."""
    import torch.distributed as dist

    from llamapro_megatron.checkpoint.dcp.merge import merge_rounds
    from llamapro_megatron.runtime.dist_ckpt import partial_saves_allowed, save

    out_dir = Path(out_dir)
    round_dirs = []
    for k, sharded in enumerate(rounds):
        d = out_dir / f".round{k:04d}"
        d.mkdir(parents=True, exist_ok=True)  # dist_checkpointing.save wants an existing directory
        dist.barrier()
        # a round covers part of each stacked tensor by design; coverage is checked once merged
        with partial_saves_allowed():
            save({"model": sharded, **common}, str(d), validate_access_integrity=False)
        round_dirs.append(d)
    dist.barrier()
    if dist.get_rank() == 0:
        merge_rounds(round_dirs, out_dir)
    dist.barrier()


def entries_by_unit(sharded: dict) -> dict[str, list]:
    """A model's sharded-state-dict entries grouped by unit."""
    grouped: dict[str, list] = {}
    for name, entry in sharded.items():
        grouped.setdefault(unit_of(name), []).append((name, entry))
    return grouped


def entry_shape(entry) -> tuple[int, ...]:
    """Local shape of a ShardedTensor, or of the tensor behind a factory (SwiGLU fc1)."""
    shape = getattr(entry, "local_shape", None)
    return tuple(shape if shape is not None else entry.data.shape)


def fill_entry(entry, tensor, name: str) -> None:
    """Give a meta sharded-state-dict entry (ShardedTensor or SwiGLU factory) real data, as the main replica."""
    expected = entry_shape(entry)
    if tuple(tensor.shape) != expected:
        raise UserError(f"{name}: converted tensor has shape {list(tensor.shape)}, the model expects "
                        f"{list(expected)}")
    entry.data = tensor
    entry.replica_id = 0


def load_buffers(entries: list[tuple[str, Any]], dtype) -> dict[str, Any]:
    """Load requests for a round's entries: empty tensors of the checkpoint's dtype, this worker the one reader.

    Objects (TE extra state) are not requested. A SwiGLU factory is read as megatron-core's two stored halves
    ([gate; up]) as they are, instead of letting the factory concatenate them only for the caller to split them."""
    import torch
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensorFactory

    request = {}
    for name, entry in entries:
        if isinstance(entry, ShardedObject):
            continue
        parts = entry.build() if isinstance(entry, ShardedTensorFactory) else [entry]
        for part in parts:
            part.data = torch.empty(entry_shape(part), dtype=dtype)
            part.replica_id = 0
        request[name] = parts if isinstance(entry, ShardedTensorFactory) else entry
    return request


def drop_data(entries: dict) -> None:
    """Drop the tensors of entries already used, so a round's memory is freed before the next."""
    for entry in entries.values():
        for e in entry if isinstance(entry, list) else [entry]:
            if hasattr(e, "data"):
                e.data = None
