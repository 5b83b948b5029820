"""hf-to-mcore through megatron-core's writer: workers build the tensors and dist_checkpointing writes them.

Workers form a gloo world at TP=1 PP=1; each builds the model on the meta device for megatron-core's own
sharded_state_dict (keys, global shapes, the SwiGLU factory, extra-state objects), fills the entries of the units it
owns from the HF tensors the description names (`mapping.blocks_from_hf`), and the world saves them together in
rounds (`save.save_in_rounds`). Taken for dtype changes, torchrun launches, and whenever the direct path
(`direct_import.py`) is off or not confirmed.
"""
from __future__ import annotations

import time
from pathlib import Path

from llamapro_megatron.arch import LlamaArch
from llamapro_megatron.checkpoint import hf as hfio
from llamapro_megatron.checkpoint import mapping, output, units
from llamapro_megatron.progress import SharedProgress


def import_worker(job) -> None:
    """One rank of a regular import (`job`: a `convert.ImportJob`)."""
    import torch

    out = Path(job.out)
    info, tmp = output.start_release_world(out)  # prepares megatron-core: import it only after this
    from llamapro_megatron.checkpoint.save import drop_data, entries_by_unit, save_in_rounds
    from llamapro_megatron.runtime.model import build_gpt_model

    arch = LlamaArch.from_dict(job.arch)
    dtype = getattr(torch, job.dtype)
    num_layers = job.plan.num_layers
    desc = mapping.Description(arch, job.padded_vocab)
    model = build_gpt_model(arch, job.padded_vocab, dtype=job.dtype, meta_device=True, num_layers=num_layers)
    sizes = units.unit_sizes(arch, job.padded_vocab, dtype.itemsize, num_layers)
    owner = units.assign_units(list(sizes), sizes, info.world_size)
    reader = hfio.HFReader(job.hf_dir)
    # the bar counts each byte twice: once read and assembled, once written
    bar = SharedProgress(tmp / output.PROGRESS_DIR, info.rank, info.world_size, total=2 * sum(sizes.values()),
                         desc="hf-to-mcore", enabled=job.progress)
    entries = entries_by_unit(model.sharded_state_dict())

    def rounds():
        for units_now in units.worker_rounds(owner, sizes, info.rank, info.world_size, job.round_bytes):
            owned = {}
            for unit in units_now:
                for name, entry in entries.get(unit, []):
                    owned[name] = _import_entry(name, entry, job.plan, desc, reader, dtype, bar)
            yield owned
            bar.update(sum(sizes[u] for u in units_now))
            drop_data(owned)
            reader.release()  # unmap the source files: their pages would count against this worker

    t0 = time.time()
    save_in_rounds(rounds(), tmp / "release", output.release_common(job.meta_json))
    bar.close()  # after the collective save: every rank's bytes are in
    output.finish_release_world(info, tmp, out, job.meta_json, Path(job.hf_dir))
    if info.rank == 0 and job.progress:
        print(f"hf-to-mcore: wrote {out} ({len(sizes)} units on {info.world_size} workers in "
              f"{time.time() - t0:.1f}s)", flush=True)


def _import_entry(name: str, entry, plan, desc: mapping.Description, reader: hfio.HFReader, dtype, bar):
    """One meta sharded-state-dict entry filled from its HF tensors, as the main replica; returns what to save.

    A new layer's zeroed projections (identity copy) are zeros; the SwiGLU factory becomes its built halves, each
    given its block ([gate], [up]), rather than concatenating them for the factory to split them again.
    """
    import torch
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    from llamapro_megatron.checkpoint.save import entry_shape, fill_entry

    if name.endswith("._extra_state"):
        entry.replica_id = 0
        return entry
    layer, t = desc.lookup(name)
    factory = isinstance(entry, ShardedTensorFactory)
    parts = entry.build() if factory else [entry]
    if layer is not None and plan.is_new(layer) and t.zero_in_identity_copy:
        blocks = [torch.zeros(entry_shape(p), dtype=dtype) for p in parts]
    else:
        src = None if layer is None else plan.sources[layer]
        blocks = mapping.blocks_from_hf(t, lambda rel: reader.get(mapping.hf_name(rel, src)), dtype)
        if len(parts) == 1 < len(blocks):
            blocks = [torch.cat(blocks, dim=0)]
    if len(parts) != len(blocks):
        raise RuntimeError(f"{name}: megatron-core stores {len(parts)} chunks, the description {len(blocks)}")
    for part, block in zip(parts, blocks):
        fill_entry(part, block, name)
    bar.update(sum(b.numel() * b.element_size() for b in blocks))
    return parts if factory else entry
