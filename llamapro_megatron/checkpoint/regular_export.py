"""mcore-to-hf through megatron-core's reader: workers each load some units (a TP=1 PP=1 world: megatron-core
reshards any saved layout on load) and write one safetensors shard per unit.

Taken for dtype changes, torchrun launches, trainable-only saves and checkpoints the direct reader does not handle
(`direct_export.py`). Rounds bound a worker's memory; loading is collective, so every rank takes part in every
round (with an empty request when it has nothing left).
"""
from __future__ import annotations

import json
from pathlib import Path

from llamapro_megatron.arch import LlamaArch, dtype_bytes
from llamapro_megatron.checkpoint import hf as hfio
from llamapro_megatron.checkpoint import mapping, output, units
from llamapro_megatron.checkpoint.mcore import TOKENIZER_DIR, CheckpointMeta
from llamapro_megatron.progress import SharedProgress


def export_worker(job) -> None:
    """One rank of a regular export (`job`: a `convert.ExportJob`)."""
    import torch
    import torch.distributed as dist

    from llamapro_megatron.runtime.distributed import destroy_distributed, init_distributed

    info = init_distributed(tp=1, pp=1)  # prepares megatron-core: import it only after this
    from llamapro_megatron.checkpoint.load import load
    from llamapro_megatron.checkpoint.save import drop_data, entries_by_unit, load_buffers
    from llamapro_megatron.runtime.model import build_gpt_model

    meta = CheckpointMeta.from_json(job.meta_json)
    arch = meta.arch
    out = Path(job.out)
    tmp = output.partial_dir(out)
    if info.rank == 0:
        output.start_output(out)
    dist.barrier()

    desc = mapping.Description(arch, meta.padded_vocab_size)
    model = build_gpt_model(arch, meta.padded_vocab_size, dtype=meta.dtype, meta_device=True)
    ckpt_dtype, out_dtype = getattr(torch, meta.dtype), getattr(torch, job.dtype)
    sizes = units.unit_sizes(arch, meta.padded_vocab_size, ckpt_dtype.itemsize, arch.num_layers)
    unit_names = list(sizes)
    owner = units.assign_units(unit_names, sizes, info.world_size)
    bar = SharedProgress(tmp / output.PROGRESS_DIR, info.rank, info.world_size, total=sum(sizes.values()),
                         desc="mcore-to-hf", enabled=job.progress)
    entries = entries_by_unit(model.sharded_state_dict())
    for units_now in units.worker_rounds(owner, sizes, info.rank, info.world_size, job.round_bytes):
        request = load_buffers([e for unit in units_now for e in entries.get(unit, [])], ckpt_dtype)
        # A round reads part of each stacked tensor by design, so megatron's full-coverage check does not apply.
        loaded = load({"model": request}, job.ckpt_dir, meta).get("model", {})  # absent: nothing asked this round
        drop_data(request)
        for unit in units_now:
            tensors = {}
            for name, _ in entries.get(unit, []):
                if name in loaded:
                    layer, t = desc.lookup(name)
                    value = loaded.pop(name)
                    for rel, tensor in mapping.hf_from_blocks(t, value if isinstance(value, list) else [value]).items():
                        tensors[mapping.hf_name(rel, layer)] = tensor.to(out_dtype)
            hfio.write_shard(tmp / hfio.shard_name(unit_names.index(unit), len(unit_names)), tensors)
            bar.update(sizes[unit])
        del loaded
    dist.barrier()
    bar.close()
    if info.rank == 0:
        finish_export(tmp, out, arch, unit_names, job.dtype, Path(job.ckpt_dir), job.progress)
    dist.barrier()
    destroy_distributed()


def finish_export(tmp: Path, out: Path, arch: LlamaArch, unit_names: list[str], dtype: str, ckpt_dir: Path,
                  progress: bool) -> None:
    """Once every shard (one per unit) is in `tmp`: the index, configs and tokenizer files; then rename to `out`."""
    shapes = mapping.expected_hf_shapes(arch)
    weight_map = {name: hfio.shard_name(unit_names.index(units.hf_unit_of(name)), len(unit_names))
                  for name in shapes}
    total = hfio.write_index(tmp, weight_map, shapes, dtype_bytes(dtype))
    config = arch.to_hf_config(dtype)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps(hfio.generation_config(config), indent=2) + "\n")
    hfio.copy_tokenizer_files(ckpt_dir / TOKENIZER_DIR, tmp)
    output.commit_output(tmp, out)
    if progress:
        print(f"mcore-to-hf: wrote {out} ({len(unit_names)} shards, {total / 1e9:.2f} GB)", flush=True)
